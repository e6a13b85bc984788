"""A small pipeline output tree in the contract format (COMMON.md), written under a temp root, for the report tests.

FIDs follow a formula (lower with more steps, an offset per schedule, sampler and seed); intervals are the FID
times fixed factors; the images are real digits. Nothing here imports the report code.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ddpm.config import Params, ReportConfig
from ddpm.data import load_dataset

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
