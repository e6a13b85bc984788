"""The NLL estimator (ddpm/metrics/nll.py), the nll and nll_table stages' pure parts, and the data's levels."""
import types

import numpy as np
import pytest
import torch

from ddpm.metrics.nll import (data_levels, exact_bound, paired, strata, stratified_bound, summarize, to_grid)

LN2 = np.log(2.0)


def _known_terms(T: int, dims: int):
    """A stand-in bound whose terms are known: L_t = (1 + image mean) * exp(-t / 7) + noise-mean (zero-mean noise
    part), prior = 0.01 per image; bound_exact sums them all, as the contract says."""
    def term(x0, t):
        return (1.0 + x0.flatten(1).mean(1).double()) * torch.exp(-t.double() / 7.0)

    def vb_terms(model, process, x0, t, *, bin_width, noise=None):
        return term(x0, t) + 0.01 * noise.flatten(1).mean(1).double()

    def prior_kl(process, x0):
        return torch.full((x0.shape[0],), 0.01, dtype=torch.float64)

    def bound_exact(model, process, x0, *, bin_width, generator):
        B = x0.shape[0]
        t = torch.arange(T).repeat(B, 1)
        terms = torch.stack([term(x0, t[:, i]) for i in range(T)], 1)
        return {"prior": prior_kl(process, x0), "terms": terms, "bpd": (0.01 + terms.sum(1)) / (LN2 * dims)}

    return types.SimpleNamespace(vb_terms=vb_terms, prior_kl=prior_kl, bound_exact=bound_exact, term=term)


def _setup(T=50, B=6):
    process = types.SimpleNamespace(num_timesteps=T, to=lambda device: process)  # the process interface they use
    x0 = torch.linspace(-1, 1, B * 4).reshape(B, 1, 2, 2)
    return process, x0, _known_terms(T, 4)


def test_strata_cover_1_to_T_minus_1_geometrically():
    for T, n in ((1000, 16), (1000, 32), (50, 10), (2, 1), (10, 9)):
        e = strata(T, n)
        assert e[0] == 1 and e[-1] == T and (np.diff(e) >= 1).all() and len(e) - 1 <= n
    e = strata(1000, 16)
    assert len(e) == 17 and list(e[:3]) == [1, 2, 3] and np.diff(e)[-1] > 100  # single steps first, wide last
    assert list(strata(10, 9)) == list(range(1, 11))
    with pytest.raises(ValueError, match=r"n_t .*got 50; allowed: 1..49"):
        strata(50, 50)


def test_stratified_with_one_step_per_stratum_is_the_exact_sum():
    process, x0, lk = _setup()
    g = torch.Generator().manual_seed(0)
    est = stratified_bound(None, process, x0, bin_width=0.1, n_t=49, generator=g, bound=lk)
    ex = exact_bound(None, process, x0, bin_width=0.1, generator=g, bound=lk)
    # the stand-in's zero-mean noise part is the only difference
    assert est["bpd"] == pytest.approx(ex["bpd"], abs=49 * 0.01 * 3 / (LN2 * 4))
    assert (est["t"] == np.arange(1, 50)).all() and (est["weights"] == 1).all()
    assert ex["decoder"] == pytest.approx(lk.term(x0, torch.zeros(6, dtype=torch.long)).numpy() / (LN2 * 4))


def test_stratified_estimate_is_unbiased_and_parts_add_up():
    process, x0, lk = _setup()
    ex = exact_bound(None, process, x0, bin_width=0.1, generator=None, bound=lk)
    draws = np.stack([stratified_bound(None, process, x0, bin_width=0.1, n_t=6, bound=lk,
                                       generator=torch.Generator().manual_seed(s))["bpd"] for s in range(400)])
    one = stratified_bound(None, process, x0, bin_width=0.1, n_t=6, bound=lk, generator=torch.Generator().manual_seed(0))
    assert one["bpd"] == pytest.approx(one["prior"] + one["decoder"] + one["diffusion"])
    assert one["t"].shape == (6, 6) and one["weights"].sum() == 49
    for s, (lo, hi) in enumerate(zip(strata(50, 6)[:-1], strata(50, 6)[1:])):
        assert ((one["t"][:, s] >= lo) & (one["t"][:, s] < hi)).all()
    se = draws.std(0, ddof=1) / np.sqrt(len(draws))
    assert np.abs(draws.mean(0) - ex["bpd"]).max() < 4 * se.max() + 1e-12
    assert draws.std(0).max() > 0  # it is an estimate: the draws differ


def test_same_generator_seed_gives_the_same_draws():
    process, x0, lk = _setup()
    a = stratified_bound(None, process, x0, bin_width=0.1, n_t=5, bound=lk, generator=torch.Generator().manual_seed(3))
    b = stratified_bound(None, process, x0, bin_width=0.1, n_t=5, bound=lk, generator=torch.Generator().manual_seed(3))
    assert (a["t"] == b["t"]).all() and (a["bpd"] == b["bpd"]).all()


def test_levels_are_read_from_the_data():
    digits = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
    assert data_levels(digits.reshape(1, 1, 1, 17)) == 17
    assert data_levels(np.arange(256, dtype=np.uint8)) == 256
    assert data_levels(np.array([0, 3, 255], dtype=np.uint8)) == 256  # not a uniform grid: 8-bit data
    assert data_levels(digits, {"levels": 5}) == 5
    with pytest.raises(ValueError, match="meta.json levels: got 1"):
        data_levels(digits, {"levels": 1})
    with pytest.raises(ValueError, match="dtype float"):
        data_levels(digits.astype(float))
    x = to_grid(digits, 17)
    assert x.numpy() == pytest.approx(np.arange(17) * 2 / 16 - 1)  # bin centres, 2/16 apart


def test_summary_and_paired_difference():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 0.5, 400)
    b = a + 0.1 + rng.normal(0, 0.01, 400)
    s = summarize({"bpd": a, "prior": a * 0, "decoder": a * 0, "diffusion": a})
    assert s["bpd_lo"] < 3.0 < s["bpd_hi"] and s["images"] == 400
    d = paired(b, a)
    assert d["lo"] < 0.1 < d["hi"] and d["hi"] - d["lo"] < 0.01 and d["p"] < 1e-6
    with pytest.raises(ValueError, match="same images"):
        paired(a, b[:10])


def test_nll_table_rows_terms_and_pairs():
    from stages.nll_table import pairs, term_rows

    d = {"terms": np.array([[1.0, 0.2, 0.01], [3.0, 0.4, 0.03]]), "weights": np.array([1, 3, 10])}
    rows = term_rows("linear", 0, d)
    assert [(r["t_lo"], r["t_hi"]) for r in rows] == [(1, 1), (2, 4), (5, 14)]
    assert [r["term"] for r in rows] == pytest.approx([2.0, 0.3, 0.02])
    rng = np.random.default_rng(1)
    base = rng.normal(3, 0.3, 200)
    per = {("linear", 0): base, ("cosine", 0): base + 0.05 + rng.normal(0, 0.01, 200), ("sigmoid", 0): base + 1e-4 * rng.normal(size=200)}
    t = pairs(per, ("linear", "cosine", "sigmoid"), (0,))
    v = dict(zip(zip(t["a"], t["b"]), t["verdict"]))
    assert v[("linear", "cosine")] == "linear" and v[("linear", "sigmoid")] == "tie"
    assert (t["p_holm"] >= t["p"]).all()


def test_nll_params_are_validated():
    import yaml

    from ddpm.app.config import ConfigError, params_from_dict

    raw = yaml.safe_load(open("params.yaml"))
    raw["nll"].update(estimator="mc", n_t=0, images=10**7)
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    text = str(err.value)
    assert "nll.estimator: got 'mc'" in text and "nll.n_t: got 0" in text and "nll.images: got 10000000" in text


def test_stratified_agrees_with_exact_on_a_real_model():
    """The real bound (ddpm.diffusion.likelihood) on a tiny untrained UNet, T = 10: the stratified estimate with 3
    strata, averaged over 12 draws, agrees with the mean of 12 exact evaluations per image (both Monte Carlo in the
    noise) within 4 standard errors; parts add up; a model in training mode is refused."""
    from ddpm.diffusion.process import GaussianProcess
    from ddpm.diffusion.schedules import get_beta_schedule
    from ddpm.nn.unet import Unet

    torch.manual_seed(0)
    model = Unet(dim=8, dim_mults=(1,), channels=1).eval()
    process = GaussianProcess(get_beta_schedule("linear", 10))
    x0 = to_grid(np.round(np.random.default_rng(0).integers(0, 17, (4, 1, 8, 8)) * 255 / 16).astype(np.uint8), 17)
    x0 = x0.float()
    ex = np.stack([exact_bound(model, process, x0, bin_width=2 / 16, generator=torch.Generator().manual_seed(s))["bpd"]
                   for s in range(12)])
    st = [stratified_bound(model, process, x0, bin_width=2 / 16, n_t=3, generator=torch.Generator().manual_seed(100 + s))
          for s in range(12)]
    sb = np.stack([r["bpd"] for r in st])
    se = np.sqrt(ex.var(0, ddof=1) / len(ex) + sb.var(0, ddof=1) / len(sb))
    assert np.abs(sb.mean(0) - ex.mean(0)).max() < 4 * se.max()
    assert st[0]["bpd"] == pytest.approx(st[0]["prior"] + st[0]["decoder"] + st[0]["diffusion"])
    with pytest.raises(ValueError, match="eval"):
        stratified_bound(model.train(), process, x0, bin_width=2 / 16, n_t=3, generator=torch.Generator())


def test_report_shows_the_nll_section_and_terms_figure(tmp_path):
    """nll_table's three files in a report fixture tree: the report gains the bits/dim table, the paired
    differences and the terms-against-t figure; without nll.csv there is no such section."""
    import pandas as pd

    from ddpm.app.report.build import build_report
    from ddpm.app.results import load_results
    from stages.nll_table import COLUMNS, pairs, term_rows
    from report_fixture import params, write_tree

    root = write_tree(tmp_path)
    p = params()
    plain = build_report(root / "reports", load_results(p, root))
    assert "Likelihood (bits/dim)" not in plain["markdown"].read_text()
    rng = np.random.default_rng(0)
    per = {("linear", 0): rng.normal(3.2, 0.4, 50)}
    per[("cosine", 0)] = per[("linear", 0)] + 0.3 + rng.normal(0, 0.01, 50)
    d = {"terms": np.abs(rng.normal(size=(50, 4))) / np.arange(1, 5), "weights": np.array([1, 2, 10, 36])}
    rows = [{"schedule": s, "seed": 0, "objective": "pred_noise", "variance": "fixed_small", "estimator": "stratified", "n_t": 4, "images": 50,
             "levels": 17, **summarize({"bpd": b, "prior": b * 0, "decoder": b * 0, "diffusion": b})}
            for (s, _), b in per.items()]
    pd.DataFrame(rows, columns=COLUMNS).to_csv(root / "reports" / "nll.csv", index=False)
    pd.DataFrame(term_rows("linear", 0, d) + term_rows("cosine", 0, d)).to_csv(root / "reports" / "nll_terms.csv",
                                                                               index=False)
    pairs(per, ("linear", "cosine"), (0,)).to_csv(root / "reports" / "nll_comparisons.csv", index=False)
    out = build_report(root / "reports", load_results(p, root))
    md = out["markdown"].read_text()
    assert "Likelihood (bits/dim)" in md and "nll_terms.png" in md and "bpd(a) − bpd(b)" in md
    assert f"{rows[0]['bpd']:.4g}"[:4] in md
    assert (root / "reports" / "figures" / "nll_terms.png").read_bytes()[:4] == b"\x89PNG"
    from ddpm.app.report.build import summary_metrics
    assert summary_metrics(load_results(p, root))["nll_bpd_cosine"] == pytest.approx(rows[1]["bpd"])


def test_track_puts_the_nll_row_on_the_train_run_once(tmp_path):
    import logging

    from mlflow.tracking import MlflowClient

    from ddpm.app.tracking.runs import Tracker
    from stages.track import mirror_nll

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tk = Tracker(True, "ddpm", uri=uri, pending_path=tmp_path / "pending.jsonl")
    run = tk.start_run("train-linear-seed0", tags={"kind": "train", "schedule": "linear"})
    tk.end_run(run)
    row = {"schedule": "linear", "seed": "0", "objective": "pred_noise", "estimator": "stratified", "n_t": "16",
           "images": "449", "levels": "17", "bpd": "3.17", "bpd_lo": "3.13", "bpd_hi": "3.21", "prior": "2e-05",
           "decoder": "6e-07", "diffusion": "3.17"}
    log = logging.getLogger("test")
    assert mirror_nll(tk, row, {("linear", 0): run}, log) is True
    assert mirror_nll(tk, row, {("linear", 0): run}, log) is False  # keyed by content: nothing added
    got = MlflowClient(uri).get_run(run).data
    assert got.metrics["nll_bpd"] == 3.17 and got.metrics["nll_bpd_hi"] == 3.21
    assert got.tags["nll_estimator"] == "stratified"
    assert mirror_nll(tk, row, {}, log) is False  # no train run for that model


def test_both_bounds_run_the_process_on_the_images_device():
    """A process made on the CPU scores CUDA images (found on an H200 by benchmarks/gpu_check.py): both bounds
    ask the process for a copy on x0's device before indexing it with steps made there."""
    asked = []
    process, x0, lk = _setup()
    process.to = lambda device: (asked.append(torch.device(device)), process)[1]
    exact_bound(None, process, x0, bin_width=0.1, generator=None, bound=lk)
    stratified_bound(None, process, x0, bin_width=0.1, n_t=6, bound=lk, generator=torch.Generator().manual_seed(0))
    assert asked == [x0.device, x0.device]
