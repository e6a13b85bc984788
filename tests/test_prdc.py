"""Precision, recall, density, coverage (ddpm/metrics/prdc.py): the prdc package against torch-fidelity, every
bootstrap replicate against compute_prdc on the resampled features, the intervals, and the fid stage's columns."""
import numpy as np
import pytest

from ddpm.metrics.fid import bootstrap_counts, fid_interval
from ddpm.metrics.prdc import METRICS, prdc, prdc_with_intervals, replicates


def _sets(n=300, m=400, d=8, shift=0.3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(m, d)) + shift


def test_prdc_matches_torch_fidelity_precision_recall():
    """One case, k = 5: prdc's improved precision and recall equal torch-fidelity 0.4's (its `<=` and prdc's `<`
    differ only on exact ties, which continuous features do not have)."""
    torch = pytest.importorskip("torch")
    prc = pytest.importorskip("torch_fidelity.metric_prc", reason="torch-fidelity is a dev (test) dependency")
    fake, real = _sets()
    ours = prdc(fake, real, k=5)
    p, r = prc.calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), neighborhood=5)
    assert ours["precision"] == pytest.approx(p, abs=1e-6)  # its mean is float32; one point is 1/300
    assert ours["recall"] == pytest.approx(r, abs=1e-6)
    assert 0.3 < ours["precision"] < 0.99 and 0.3 < ours["recall"] < 0.99  # a case where the balls matter


def test_every_replicate_equals_compute_prdc_on_the_resampled_features():
    """The bootstrap's shortcut (sorted neighbour lists, candidate pairs) gives exactly what resampling the
    features and calling compute_prdc gives, duplicates in the data included."""
    fake, real = _sets(200, 260)
    fake[5], real[7] = fake[6], real[8]  # exact duplicates: neighbours at distance 0
    ca, cb = bootstrap_counts(len(fake), len(real), 25, seed=3)
    rep = replicates(fake, real, ca, cb, k=5)
    for b in range(len(ca)):
        want = prdc(np.repeat(fake, ca[b].astype(int), axis=0), np.repeat(real, cb[b].astype(int), axis=0), k=5)
        for m in METRICS:
            assert rep[m][b] == pytest.approx(want[m], abs=1e-12), (b, m)
    ones = replicates(fake, real, np.ones((1, len(fake))), np.ones((1, len(real))), k=5)
    assert {m: ones[m][0] for m in METRICS} == pytest.approx(prdc(fake, real, k=5), abs=1e-12)


def test_intervals_bracket_the_value_and_separate_a_mode_dropped_set():
    """Same distribution: precision and recall high, intervals around the point value; a generator that drops
    half the real modes keeps its precision but loses recall and coverage, resolved by the intervals."""
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=6.0, size=(8, 4))
    real = centres[rng.integers(0, 8, 600)] + rng.normal(size=(600, 4))
    good = centres[rng.integers(0, 8, 400)] + rng.normal(size=(400, 4))
    half = centres[rng.integers(0, 4, 400)] + rng.normal(size=(400, 4))
    g, h = prdc_with_intervals(good, real, n_boot=100), prdc_with_intervals(half, real, n_boot=100)
    for out in (g, h):
        for m in METRICS:
            assert out[f"{m}_lo"] <= out[m] <= out[f"{m}_hi"]
    assert g["precision"] > 0.8 and h["precision"] > 0.8
    assert h["recall_hi"] < g["recall_lo"] and h["coverage_hi"] < g["coverage_lo"]
    assert h["coverage"] == pytest.approx(0.5, abs=0.1)


def test_same_resamples_as_fid_interval():
    """bootstrap_counts is what fid_interval draws: refactoring it out left FID's interval unchanged."""
    fake, real = _sets(120, 150, d=3)
    ca, cb = bootstrap_counts(len(fake), len(real), 50, seed=4)
    rng = np.random.default_rng(4)
    assert (rng.multinomial(120, np.full(120, 1 / 120), size=50) == ca).all()
    assert (rng.multinomial(150, np.full(150, 1 / 150), size=50) == cb).all()
    lo, hi = fid_interval(fake, real, n_boot=50, seed=4)
    assert 0.0 <= lo < hi


def test_bad_input_is_one_clear_error():
    fake, real = _sets(20, 30)
    with pytest.raises(ValueError, match="same D"):
        prdc(fake, real[:, :3])
    with pytest.raises(ValueError, match="k .nearest neighbours. must be in 1..19"):
        prdc(fake, real, k=20)


def test_fid_stage_measures_the_four_metrics_with_intervals():
    from stages.fid import COLUMNS, measure

    fake, real = _sets(120, 150, d=4)
    row = measure(fake, real)
    for m in METRICS:
        assert {m, f"{m}_lo", f"{m}_hi"} <= set(COLUMNS) and row[f"{m}_lo"] <= row[m] <= row[f"{m}_hi"]
    assert row["precision"] == prdc(fake, real)["precision"]


def test_fidelity_diversity_figure_draws_every_set_of_the_first_seed():
    import pandas as pd

    from ddpm.app.report.figures import _fig_png, fidelity_diversity

    rows = []
    for seed in (0, 1):
        for i, schedule in enumerate(("linear", "cosine")):
            for label, steps in (("ddim-eta0", 10), ("ddpm", 100)):
                vals = {m: 0.5 + 0.1 * i for m in METRICS}
                rows.append({"schedule": schedule, "seed": seed, "label": label, "steps": steps, **vals,
                             **{f"{m}_lo": v - 0.05 for m, v in vals.items()},
                             **{f"{m}_hi": v + 0.05 for m, v in vals.items()}})
    df = pd.DataFrame(rows)
    fig = fidelity_diversity(df, ("linear", "cosine"), seed=0)
    axes = fig.axes
    assert [a.get_xlabel() for a in axes] == ["recall (diversity)", "coverage (diversity)"]
    assert all(len(a.containers) == 4 for a in axes)  # 2 schedules x 2 sets of seed 0, one errorbar each
    assert _fig_png(fig)[:4] == b"\x89PNG"
    assert fidelity_diversity(df.drop(columns=["density"]), ("linear",), 0) is None
