"""A small pipeline output tree in the contract format (COMMON.md), written under a temp root, for the report tests.

FIDs follow a formula (lower with more steps, an offset per schedule, sampler and seed); intervals are the FID
times fixed factors; comparisons.csv pairs every two configurations with an interval made from theirs
(:func:`comparisons`); the images are real digits. Nothing here imports the report code.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ddpm.app.config import Params, ReportConfig
from ddpm.data.datasets import load_dataset
from ddpm.app.names import sampler_label, set_label

FEATURES = "classifier-32d-0123abcd"
FID_COLUMNS = ["schedule", "sampler", "eta", "steps", "fid", "n_samples", "features",
               "seed", "spacing", "fid_lo", "fid_hi", "kid", "kid_std"]


def fid_value(i_sched: int, j_sampler: int, steps: int, seed: int) -> float:
    return 2.0 + 10.0 / steps + i_sched + 0.5 * j_sampler + 0.1 * seed


def fid_rows(schedules, samplers, steps, seeds, n_samples=100, spread=0.05) -> pd.DataFrame:
    rows = []
    for i, s in enumerate(schedules):
        for seed in seeds:
            for j, (name, eta) in enumerate(samplers):
                for st in steps:
                    f = fid_value(i, j, st, seed)
                    rows.append([s, name, eta, st, f, n_samples, FEATURES, seed, "linspace", f * (1 - spread),
                                 f * (1 + spread), f / 1000, f / 10000])
    return pd.DataFrame(rows, columns=FID_COLUMNS)


COMPARISON_COLUMNS = ["question", "kind", "a", "b", "effect", "lo", "hi", "p", "p_holm", "verdict", "family",
                      "family_size", "method"]


def _row(question, kind, a, b, effect, half, family):
    resolved = abs(effect) > half
    verdict = "tie" if not resolved or kind == "interaction" else f"{a} better" if effect < 0 else f"{b} better"
    return [question, kind, a, b, effect, effect - half, effect + half, 0.01 if resolved else 0.5,
            0.01 if resolved else 0.5, verdict, family, 0, "fixture: half-widths combined"]


def comparisons(fid: pd.DataFrame) -> pd.DataFrame:
    """comparisons.csv for ``fid`` (mean over seeds per configuration): family ``ranking``: every pair of finite
    configurations, effect FID(a) - FID(b) with half-width sqrt(h_a^2 + h_b^2) (h: half of each fid interval),
    resolved when that excludes 0; family ``questions``: schedule pairs over the sets and set pairs over the
    schedules, the same way, each with an interaction row that is never flagged."""
    df = fid.assign(set=[set_label(sampler_label(n, e), st)
                         for n, e, st in zip(fid["sampler"], fid["eta"], fid["steps"])])
    g = df.groupby(["schedule", "set"], sort=False).agg(fid=("fid", "mean"), lo=("fid_lo", "mean"),
                                                        hi=("fid_hi", "mean"))
    g = g[np.isfinite(g["fid"])]
    half = (g["hi"] - g["lo"]) / 2
    names = [f"{a}/{b}" for a, b in g.index]
    rows = [_row(f"{names[i]} vs {names[j]}", "pair", names[i], names[j], g["fid"].iloc[i] - g["fid"].iloc[j],
                 float(np.hypot(half.iloc[i], half.iloc[j])), "ranking")
            for i in range(len(g)) for j in range(i + 1, len(g))]
    for level, other in ((0, 1), (1, 0)):
        keys = list(dict.fromkeys(k[level] for k in g.index))
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                d = g.xs(a, level=level)["fid"] - g.xs(b, level=level)["fid"]
                h = float(np.hypot(half.xs(a, level=level), half.xs(b, level=level)).mean() / np.sqrt(len(d)))
                kind = "schedule" if level == 0 else "set"
                rows.append(_row(f"{a} vs {b}, averaged", kind, a, b, float(d.mean()), h, "questions"))
                rows.append(_row(f"does {a} vs {b} depend? largest departure at x", "interaction", a, b, 0.0, 1.0,
                                 "questions"))
    out = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    out["family_size"] = out.groupby("family")["family"].transform("size")
    return out


def write_tree(root: Path, *, schedules=("linear", "cosine"), samplers=(("ddpm", 0.0), ("ddim", 0.0)),
               steps=(5, 20), seeds=(0,), channels=1, n_images=16, fid: pd.DataFrame | None = None,
               curves: bool = True) -> Path:
    root = Path(root)
    rng = np.random.default_rng(0)
    digits = load_dataset("digits").images[:200]  # uint8 [N, 1, 8, 8]
    if channels == 3:
        digits = np.concatenate([digits, digits[:, :, ::-1], 255 - digits], axis=1)
    fid = fid_rows(schedules, samplers, steps, seeds) if fid is None else fid
    (root / "reports").mkdir(parents=True, exist_ok=True)
    fid.to_csv(root / "reports" / "fid.csv", index=False)
    comparisons(fid).to_csv(root / "reports" / "comparisons.csv", index=False)
    (root / "reports" / "fid_summary.json").write_text(json.dumps({
        "features": FEATURES, "fid_floor": 1.2345, "fid_floor_lo": 1.1, "fid_floor_hi": 1.4, "kid_floor": 0.0001,
        "kid_floor_std": 0.00005, "n_samples": 100, "interval": "95% interval from independent sample draws"}))
    (root / "featurizer").mkdir(exist_ok=True)
    (root / "featurizer" / "metrics.json").write_text(json.dumps({
        "features": FEATURES, "ruler": "shipped", "sha256": "0123abcd" + "e" * 56, "kind": "classifier",
        "val_accuracy": 0.975, "train_accuracy": 0.99, "feature_dim": 32,
        "seed_stability": {"seeds": [0, 1], "floor_rel_diff": 0.012}}))
    n = 400
    for i, s in enumerate(schedules):
        for seed in seeds:
            d = root / "models" / s / f"seed{seed}"
            d.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"step": np.arange(n),
                          "loss": 0.1 + np.exp(-np.arange(n) / 80) * (1 + i) + rng.uniform(0, 0.02, n),
                          **{f"loss_q{q}": (0.2 / (q + 1)) * (1 + rng.uniform(0, 0.1, n)) for q in range(4)},
                          }).to_csv(d / "loss.csv", index=False)
            if curves:
                pd.DataFrame({"step": [100, 200, 300], "fid": [30.0 + i, 15.0, 9.0], "floor": [2.5] * 3}).to_csv(
                    d / "fid_curve.csv", index=False)
            for name, eta in samplers:
                for st in steps:
                    path = root / "samples" / s / f"seed{seed}" / f"{name}-eta{float(eta)!r}-{st}.npz"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(path, images=digits[rng.integers(0, len(digits), n_images)])
    (root / "data" / "prepared").mkdir(parents=True, exist_ok=True)
    np.savez(root / "data" / "prepared" / "holdout.npz", images=digits[:3])
    return root


def params(timesteps: int = 50, zero_terminal_snr: bool = False, data_name: str = "digits") -> Params:
    p = Params()
    return dataclasses.replace(p, timesteps=timesteps, report=ReportConfig(grid_images=16, grid_scale=3),
                               diffusion=dataclasses.replace(p.diffusion, zero_terminal_snr=zero_terminal_snr),
                               data=dataclasses.replace(p.data, name=data_name))
