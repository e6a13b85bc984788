"""Coverage of FID intervals on Gaussians at the default run's sizes (D = 32, N = 400, M = 1347).

Two parts:

* ``single``: ddpm.metrics.fid.fid_interval for one cell. The target is E[FID(N, M)], estimated from independent
  draws; the closed-form (N -> inf) distance is printed beside it to show the bias the plug-in keeps.
* ``paired``: ddpm.metrics.compare's paired difference intervals. Cells share their "noise" per sample index (a
  latent z_i common to every cell of a draw, as sample sets share x_T) and one reference set. The target
  is the expected plug-in difference E[FID_A(N, M) - FID_B(N, M)], from ``--target-draws`` independent
  draws; the closed-form difference is printed beside it. Both interval methods of
  PairedBootstrap.contrast are scored, and the unpaired (independent resampling) width for comparison.

    python3 -m benchmarks.interval_coverage --part single --reps 100
    python3 -m benchmarks.interval_coverage --part paired --reps 400 --n-boot 1000
"""
from __future__ import annotations

import argparse

import numpy as np

from ddpm.metrics import compare
from ddpm.metrics import fid


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


# ------------------------------------------------------------------------------------------------
# Paired differences
# ------------------------------------------------------------------------------------------------
PAIRED_CASES = {  # name: (per-cell (mean shift, covariance scale)), contrast weights over the cells
    "zero difference, near the floor": ([(0.0, 1.0), (0.0, 1.0)], [1.0, -1.0]),
    "small difference": ([(0.05, 1.2), (0.0, 1.0)], [1.0, -1.0]),
    "large difference": ([(0.3, 2.0), (0.1, 1.5)], [1.0, -1.0]),
    "pooled over 3 levels": ([(0.05, 1.2), (0.0, 1.0), (0.1, 1.3), (0.05, 1.1), (0.2, 1.5), (0.1, 1.5)],
                             [1 / 3, -1 / 3, 1 / 3, -1 / 3, 1 / 3, -1 / 3]),
}


class Grid:
    """Gaussian cells that share a latent per sample index: cell k = mu_k + sqrt(scale_k) L (sqrt(rho) z_i +
    sqrt(1 - rho) e_ki); the reference N(0, L L^T) has M points."""

    def __init__(self, cells, d=32, n=400, m=1347, rho=0.8, seed=0):
        rng = np.random.default_rng(seed)
        a = rng.normal(size=(d, d)) / np.sqrt(d)
        self.sigma = a @ a.T + 0.1 * np.eye(d)
        self.chol = np.linalg.cholesky(self.sigma)
        self.cells, self.d, self.n, self.m, self.rho = cells, d, n, m, rho

    def closed_form(self) -> np.ndarray:
        zero = np.zeros(self.d)
        return np.array([fid.frechet_distance(np.full(self.d, sh), sc * self.sigma, zero, self.sigma)
                         for sh, sc in self.cells])

    def draw(self, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
        z = rng.normal(size=(self.n, self.d))
        feats = []
        for shift, scale in self.cells:
            e = np.sqrt(self.rho) * z + np.sqrt(1 - self.rho) * rng.normal(size=(self.n, self.d))
            feats.append(shift + np.sqrt(scale) * e @ self.chol.T)
        return feats, rng.normal(size=(self.m, self.d)) @ self.chol.T

    def plug_in(self, rng: np.random.Generator, draws: int) -> np.ndarray:
        """[draws, K] plug-in FIDs from independent draws (the target is their mean)."""
        out = []
        for _ in range(draws):
            feats, ref = self.draw(rng)
            out.append([fid.fid_from_features(f, ref) for f in feats])
        return np.array(out)


def paired_trial(grid: Grid, weights, rng, n_boot: int, seed: int, unpaired: bool = False) -> dict:
    feats, ref = grid.draw(rng)
    cells = {k: f for k, f in enumerate(feats)}
    groups = {k: k for k in cells} if unpaired else None
    boot = compare.paired_bootstrap(cells, ref, groups=groups, n_boot=n_boot, seed=seed)
    w = dict(enumerate(weights))
    return {m: boot.contrast(w, method=m) for m in ("normal", "basic")}


def paired_case(name: str, reps: int, n_boot: int, target_draws: int, seed: int = 0) -> dict:
    cells, weights = PAIRED_CASES[name]
    grid = Grid(cells, seed=seed)
    rng = np.random.default_rng(seed + 1)
    plug = grid.plug_in(rng, target_draws) @ np.asarray(weights)
    target = float(plug.mean())
    res = [paired_trial(grid, weights, rng, n_boot, seed=i) for i in range(reps)]
    out = {"closed_form": float(grid.closed_form() @ np.asarray(weights)), "target": target,
           "target_se": float(plug.std(ddof=1) / np.sqrt(len(plug))), "sd": float(plug.std(ddof=1))}
    for m in ("normal", "basic"):
        hits = np.array([r[m].lo <= target <= r[m].hi for r in res])
        out[f"coverage_{m}"] = float(hits.mean())
        out[f"width_{m}"] = float(np.mean([r[m].hi - r[m].lo for r in res]))
        out[f"rejects_{m}"] = float(np.mean([r[m].p <= 0.05 for r in res]))
    unp = [paired_trial(grid, weights, rng, n_boot, seed=10_000 + i, unpaired=True)["normal"]
           for i in range(min(reps, 20))]
    out["width_unpaired"] = float(np.mean([e.hi - e.lo for e in unp]))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["single", "paired"], default="paired")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--target-draws", type=int, default=4000)
    ap.add_argument("--cases", default=None, help="comma-separated indices into PAIRED_CASES (default: all)")
    args = ap.parse_args()
    if args.part == "single":
        for shift, scale in [(0.0, 1.0), (0.05, 1.2), (0.3, 2.0)]:
            r = case(shift, scale, args.reps)
            print(f"shift {shift} scale {scale}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()), flush=True)
        return
    names = list(PAIRED_CASES)
    for name in [names[int(i)] for i in args.cases.split(",")] if args.cases else names:
        r = paired_case(name, args.reps, args.n_boot, args.target_draws)
        ci = {m: wilson(round(r[f"coverage_{m}"] * args.reps), args.reps) for m in ("normal", "basic")}
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items())
              + "; 95% Wilson intervals of coverage: "
              + ", ".join(f"{m} [{lo:.3f}, {hi:.3f}]" for m, (lo, hi) in ci.items()), flush=True)


if __name__ == "__main__":
    main()
