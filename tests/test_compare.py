"""Paired comparisons of FID (ddpm.metrics.compare): paired vs unpaired width, known zero, Holm, interactions, coverage."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.interval_coverage import Grid
from ddpm.metrics import compare

SCHEDULES = ["linear", "cosine", "sigmoid"]
SETS = ["ddim-eta0-10", "ddim-eta0-20"]


def _grid_cells(rng, effects, n=300, d=8, rho=0.9):
    """Cells (schedule, 0, set) sharing a latent per index; cell mean shift = effects[(schedule, set)]."""
    z = rng.normal(size=(n, d))
    return {(sc, 0, s): effects.get((sc, s), 0.0) + np.sqrt(rho) * z + np.sqrt(1 - rho) * rng.normal(size=(n, d))
            for sc in SCHEDULES for s in SETS}


def test_paired_interval_narrower_than_unpaired_on_correlated_cells():
    rng = np.random.default_rng(0)
    cells = _grid_cells(rng, {("cosine", SETS[0]): 0.2})
    ref = rng.normal(size=(500, 8))
    w = {("cosine", 0, SETS[0]): 1.0, ("linear", 0, SETS[0]): -1.0}
    paired = compare.paired_bootstrap(cells, ref, n_boot=300, seed=1).contrast(w)
    # unpaired: every cell its own noise draw and its own draw of (a copy of) the reference
    own = {k: k for k in cells}
    unpaired = compare.paired_bootstrap(cells, {k: ref for k in cells}, cell_reference=own, groups=own,
                                        n_boot=300, seed=1).contrast(w)
    assert paired.effect == pytest.approx(unpaired.effect)  # the same point estimate
    assert (paired.hi - paired.lo) < 0.85 * (unpaired.hi - unpaired.lo)  # measured: 0.78


def test_identical_cells_give_zero_difference_and_tie():
    rng = np.random.default_rng(1)
    x, ref = rng.normal(size=(300, 8)), rng.normal(size=(500, 8))
    boot = compare.paired_bootstrap({("a", 0, "s-10"): x, ("b", 0, "s-10"): x.copy()}, ref, n_boot=200)
    e = boot.contrast({("a", 0, "s-10"): 1.0, ("b", 0, "s-10"): -1.0})
    assert e.effect == 0.0 and e.lo <= 0.0 <= e.hi and e.p == 1.0
    table = compare.pairs_table(boot, [(("a", "s-10"), ("b", "s-10"))], [0], "ranking")
    assert list(table["verdict"]) == ["tie"] and table["family_size"].iloc[0] == 1


def test_bootstrap_is_seeded_and_shares_draws():
    rng = np.random.default_rng(2)
    x, ref = rng.normal(size=(100, 4)), rng.normal(size=(200, 4))
    one = compare.paired_bootstrap({"a": x, "b": x}, ref, n_boot=50, seed=3)
    two = compare.paired_bootstrap({"a": x, "b": x}, ref, n_boot=50, seed=3)
    np.testing.assert_array_equal(one.draws, two.draws)
    np.testing.assert_allclose(one.draws[:, 0], one.draws[:, 1])  # one index draw for the shared-noise cells
    with pytest.raises(ValueError, match="one sample count"):
        compare.paired_bootstrap({"a": x, "b": x[:50]}, ref, groups={"a": 0, "b": 0}, n_boot=50)


def _holm_by_definition(p, alpha):
    """Holm (1979): sort ascending; reject H_(1..j) while p_(j) <= alpha / (K - j + 1); stop at the first failure."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    rejected = set()
    for j, i in enumerate(order):
        if p[i] > alpha / (len(p) - j):
            break
        rejected.add(i)
    return rejected


def test_holm_matches_the_definition():
    p = [0.01, 0.04, 0.03, 0.005]
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    np.testing.assert_allclose(compare.holm(p), [0.03, 0.06, 0.06, 0.02])
    for alpha in (0.02, 0.03, 0.05, 0.1):
        assert {i for i, q in enumerate(compare.holm(p)) if q <= alpha} == _holm_by_definition(p, alpha)
    # weights: a hypothesis with 3x the weight is tested first at alpha * 3/4
    np.testing.assert_allclose(compare.holm([0.03, 0.01], [3.0, 1.0]), [0.04, 0.04])
    with pytest.raises(ValueError, match="weights"):
        compare.holm([0.1, 0.2], [1.0])


def test_question_table_flags_a_constructed_interaction():
    rng = np.random.default_rng(4)
    # sigmoid is worse only with ddim-eta0-10: the schedule pair's per-set differences disagree
    cells = _grid_cells(rng, {("sigmoid", SETS[0]): 0.6})
    boot = compare.paired_bootstrap(cells, rng.normal(size=(600, 8)), n_boot=400, seed=0)
    q = compare.question_table(boot, SCHEDULES, SETS, [0]).set_index(["kind", "a", "b"])
    assert len(q) == 2 * (3 + 1) and set(q["family_size"]) == {8}
    assert q.loc[("interaction", "linear", "sigmoid"), "verdict"] == "interaction"
    assert "ddim-eta0-10" in q.loc[("interaction", "linear", "sigmoid"), "question"]
    assert q.loc[("interaction", "linear", "cosine"), "verdict"] == "tie"
    assert q.loc[("schedule", "linear", "sigmoid"), "verdict"] == "linear better"
    assert q.loc[("schedule", "linear", "cosine"), "verdict"] == "tie"


def test_several_seeds_use_a_t_interval_over_seeds():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(400, 4))
    cells = {(sc, seed, "s-10"): rng.normal(size=(200, 4)) + 0.1 * seed for sc in ("a", "b") for seed in (0, 1, 2)}
    boot = compare.paired_bootstrap(cells, ref, n_boot=100)
    e = compare.estimate(boot, [{("a", s, "s-10"): 1.0, ("b", s, "s-10"): -1.0} for s in (0, 1, 2)])
    d = np.array([boot.fid[boot.index(("a", s, "s-10"))] - boot.fid[boot.index(("b", s, "s-10"))] for s in range(3)])
    half = 4.302653 * d.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    assert e.effect == pytest.approx(d.mean()) and e.hi - e.lo == pytest.approx(2 * half, rel=1e-5)
    assert "3 training seeds" in e.method


def test_difference_intervals_cover_a_known_difference():
    """Gaussians sharing a latent per index, with a known expected difference (from independent draws):
    the paired 95% intervals cover it in >= 93% of trials (the benchmark runs the full sizes)."""
    grid = Grid([(0.1, 1.3), (0.0, 1.0)], d=8, n=200, m=400, seed=0)
    rng = np.random.default_rng(1)
    target = float((grid.plug_in(rng, 1500) @ [1.0, -1.0]).mean())
    hits = []
    for i in range(120):
        feats, ref = grid.draw(rng)
        e = compare.paired_bootstrap(dict(enumerate(feats)), ref, n_boot=200, seed=i).contrast({0: 1.0, 1: -1.0})
        hits.append(e.lo <= target <= e.hi)
    assert np.mean(hits) >= 0.93


def test_ranking_pairs_name_best_and_per_step_winners():
    fids = {("a", "ddim-eta0-10"): 3.0, ("b", "ddim-eta0-10"): 2.0, ("a", "dpmpp_2m-10"): 4.0,
            ("b", "dpmpp_2m-10"): 5.0, ("a", "ddim-eta0-20"): 1.0, ("b", "dpmpp_2m-20"): 1.5,
            ("a", "x-20"): float("nan")}
    pairs = compare.ranking_pairs(fids)
    best = ("a", "ddim-eta0-20")
    assert pairs[:4] == [(best, ("b", "dpmpp_2m-20")), (best, ("b", "ddim-eta0-10")), (best, ("a", "ddim-eta0-10")),
                         (best, ("a", "dpmpp_2m-10"))]
    # at 10 steps ddim (b, 2.0) beats dpmpp_2m's best (a, 4.0); at 20 the pair is already there
    assert pairs[5:] == [(("b", "ddim-eta0-10"), ("a", "dpmpp_2m-10"))] and len(pairs) == 6


def test_grid_comparisons_and_features_file_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    cells = _grid_cells(rng, {("cosine", SETS[1]): 0.6}, n=120, d=4)
    cells = {k: v.astype(np.float32).astype(np.float64) for k, v in cells.items()}
    ref = rng.normal(size=(300, 4)).astype(np.float32)
    compare.save_features(tmp_path / "f.npz", cells, ref, space="classifier-4d-0000")
    back, ref_back, space = compare.load_features(tmp_path / "f.npz")
    assert space == "classifier-4d-0000"
    assert list(back) == list(cells) and all(np.array_equal(back[k], cells[k]) for k in cells)
    assert np.array_equal(ref_back, ref) and np.load(tmp_path / "f.npz")["features"].dtype == np.float32
    table = compare.grid_comparisons(back, ref_back, n_boot=100)
    assert list(table.columns) == compare.COLUMNS
    q, r = table[table["family"] == "questions"], table[table["family"] == "ranking"]
    assert len(q) == 2 * (3 + 1) and set(r["family_size"]) == {len(r)}
    best = r["a"].iloc[0]
    vs_best = r[r["a"] == best].set_index("b")
    assert len(vs_best) == 5 and best not in vs_best.index
    assert vs_best.loc["cosine/" + SETS[1], "verdict"] == best + " better"  # the shifted cell is clearly worse
    assert q["question"].iloc[0].startswith("linear vs cosine, averaged over the sample sets")
    with pytest.raises(ValueError, match="incomplete"):
        compare.grid_comparisons({k: v for k, v in back.items() if k != ("linear", 0, SETS[0])}, ref_back, n_boot=50)
    with pytest.raises(ValueError, match="missing array"):
        np.savez(tmp_path / "bad.npz", keys=np.array(["a|0|s-1"]))
        compare.load_features(tmp_path / "bad.npz")


def test_cross_table_pairs_cells_across_experiments():
    rng = np.random.default_rng(7)
    a = _grid_cells(rng, {}, n=150, d=4)
    # B: the same noise per index, every cell a little worse; one cell only in A
    b = {k: v + 0.6 for k, v in a.items()}
    extra = ("linear", 0, "ddpm-100")
    a[extra] = rng.normal(size=(150, 4))
    ref = rng.normal(size=(300, 4))
    t = compare.cross_table(a, ref, b, ref.copy(), n_boot=200)
    assert len(t) == 6 + 1 and set(t["family_size"]) == {7} and not t["a"].str.contains("ddpm-100").any()
    pooled = t[t["kind"] == "pooled"].iloc[0]
    per = t[t["kind"] == "config"]
    assert pooled["effect"] == pytest.approx(per["effect"].mean()) and pooled["effect"] > 0
    assert pooled["verdict"] == "A better" and pooled["hi"] - pooled["lo"] < (per["hi"] - per["lo"]).mean()
    with pytest.raises(ValueError, match="no cell in common"):
        compare.cross_table({extra: a[extra]}, ref, b, ref, n_boot=50)
