"""Does the floor mean "what a perfect model would score"? A check on real features (the default run's digits).

A perfect model draws i.i.d. from the data distribution. With 1,797 real images there are no fresh draws, so
the check splits them again: a reference of M images and a held-out set of m from the rest (split the way
``data.holdout_fraction`` splits: stratified by label, or random), and n "perfect-model" images from the rest
with multinomial class counts (i.i.d. classes; random split: a random subset). Over ``--splits`` splits it
prints the mean perfect-model FID against each split's reference (the target) beside the mean of:

* ``perfect_model_fid``: ddpm.metrics.fid.perfect_model_fid, the floor the fid stage reports, with its interval;
* ``held-out plug-in``: the floor before: the plug-in FID of the held-out set (n <= m; first n of it), or its
  FID-infinity line carried to n (n > m).

Needs the pipeline's featurizer/reference.npz and data/prepared/{train,holdout}.npz (``dvc repro fid``).

    python3 -m benchmarks.floor_check --splits 30 --out benchmarks/results/floor_check.txt
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ddpm.data.datasets import split_holdout
from ddpm.metrics.fid import fid_from_features, fid_infinity, perfect_model_fid

SETTINGS = [(900, 250, 600), (900, 300, 300), (1000, 200, 797)]  # (M, m, n): n above, equal to, far above m


def load() -> tuple[np.ndarray, np.ndarray]:
    """Every real feature (reference, then held-out) and its label, as the pipeline wrote them."""
    r = np.load("featurizer/reference.npz")
    labels = [np.load(f"data/prepared/{k}.npz")["labels"] for k in ("train", "holdout")]
    return np.concatenate([r["train_features"], r["holdout_features"]]), np.concatenate(labels)


def old_floor(held: np.ndarray, ref: np.ndarray, n: int) -> float:
    if n <= len(held):
        return fid_from_features(held[:n], ref)
    a, b = fid_infinity(held, ref)
    return a + b / n


def one_split(feats, labels, stratified: bool, setting, rep: int, rng) -> tuple[float, dict, float]:
    big_m, m, n = setting
    ref_idx, rest = split_holdout(labels if stratified else len(labels), 1 - big_m / len(labels), 200 + rep)
    _, h = split_holdout(labels[rest] if stratified else len(rest), m / len(rest), 300 + rep)
    held, ref = feats[rest[h]], feats[ref_idx]
    if stratified:
        counts = rng.multinomial(n, np.bincount(labels) / len(labels))
        draw = np.concatenate([rng.choice(rest[labels[rest] == c], k, replace=False) for c, k in enumerate(counts)])
    else:
        draw = rng.choice(rest, n, replace=False)
    return fid_from_features(feats[draw], ref), perfect_model_fid(held, ref, n, seed=rep), old_floor(held, ref, n)


def split_plugin(feats, labels, splits: int) -> list[str]:
    """The held-out plug-in FID (the floor before) over fresh splits of the pipeline's sizes (449 of 1,797 held
    out), stratified by label as data.holdout_fraction splits, and random."""
    lines = []
    for stratified in (True, False):
        v = []
        for rep in range(splits):
            ref_idx, held_idx = split_holdout(labels if stratified else len(labels), 449 / len(labels), 100 + rep)
            v.append(fid_from_features(feats[held_idx], feats[ref_idx]))
        kind = "stratified" if stratified else "random"
        lines.append(f"held-out plug-in, {kind} splits of 449 / 1,348: mean {np.mean(v):.3f} "
                     f"(sd {np.std(v, ddof=1):.3f})")
        print(lines[-1], flush=True)
    return lines


def run(splits: int) -> list[str]:
    feats, labels = load()
    lines = split_plugin(feats, labels, splits)
    for stratified in (True, False):
        for setting in SETTINGS:
            if stratified and setting[2] > 700:
                continue  # n multinomial class draws need about n / 10 images of each class in the rest
            rng = np.random.default_rng(0)
            rows = [one_split(feats, labels, stratified, setting, rep, rng) for rep in range(splits)]
            target = np.array([r[0] for r in rows])
            new = np.array([r[1]["fid"] for r in rows])
            half = np.array([(r[1]["hi"] - r[1]["lo"]) / 2 for r in rows])
            old = np.array([r[2] for r in rows])
            cover = np.mean([r[1]["lo"] <= target.mean() <= r[1]["hi"] for r in rows])
            se = target.std(ddof=1) / np.sqrt(splits)
            kind = "stratified" if stratified else "random"
            lines.append(f"{kind:10s} M={setting[0]} m={setting[1]} n={setting[2]}: "
                         f"perfect model {target.mean():.3f} (se {se:.3f}) | perfect_model_fid {new.mean():.3f} "
                         f"(sd {new.std(ddof=1):.3f}; mean half-width {half.mean():.3f}; covers the target's mean in "
                         f"{cover:.0%}) | held-out plug-in {old.mean():.3f} (sd {old.std(ddof=1):.3f})")
            print(lines[-1], flush=True)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    lines = run(args.splits)
    head = [f"$ python3 -m benchmarks.floor_check --splits {args.splits}" + (f" --out {args.out}" if args.out else ""),
            f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.splits} splits per setting, "
            f"{time.time() - t0:.0f} s", ""]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
