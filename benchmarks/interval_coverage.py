"""Coverage of ddpm.fid.fid_interval on Gaussians at the default run's sizes (D = 32, N = 400, M = 1347).

The target is E[FID(N, M)], estimated from independent draws; the closed-form (N -> inf) distance is
printed beside it to show the bias the plug-in keeps.

    python3 -m benchmarks.interval_coverage --reps 100
"""
from __future__ import annotations

import argparse

import numpy as np

from ddpm import fid


def case(shift: float, scale: float, reps: int, d=32, n=400, m=1347, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    s2 = a @ a.T + 0.1 * np.eye(d)
    s1, mu1, mu2 = s2 * scale, np.full(d, shift), np.zeros(d)
    l1, l2 = np.linalg.cholesky(s1), np.linalg.cholesky(s2)
    draws = [(mu1 + rng.normal(size=(n, d)) @ l1.T, mu2 + rng.normal(size=(m, d)) @ l2.T) for _ in range(reps)]
    plug = np.array([fid.fid_from_features(x, y) for x, y in draws])
    target = plug.mean()
    ours = [fid.fid_interval(x, y, seed=i) for i, (x, y) in enumerate(draws)]
    cover = np.mean([lo <= target <= hi for lo, hi in ours])
    return {"closed_form": fid.frechet_distance(mu1, s1, mu2, s2), "E_fid_N": target, "sd_fid_N": plug.std(),
            "coverage": cover, "mean_width": float(np.mean([hi - lo for lo, hi in ours]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()
    for shift, scale in [(0.0, 1.0), (0.05, 1.2), (0.3, 2.0)]:
        r = case(shift, scale, args.reps)
        print(f"shift {shift} scale {scale}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
