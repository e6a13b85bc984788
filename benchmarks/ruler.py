"""Which ruler for the default digits? Measures how far FIDs move when only the featurizer is retrained.

For featurizer seeds 0..K-1 the default recipe (ClassifierFeaturizer, 32-d, 15 epochs, batch 64,
lr 0.01) is trained on the seed-0 train split (75% of the 1,797 digits), and every generated sample
set of benchmarks/ruler_samples.py is scored against that split's reference statistics, at 400
images as in the default run. Printed: per-cell FID and its coefficient of variation (CV) across
featurizer seeds, the floor (held-out vs train) per seed, and the ranking per seed.

`--ship` then trains the shipped ruler: the same recipe with seed 0 on ALL 1,797 digits (so it does
not depend on the top-level `seed`, which only moves the train/holdout split), writes
ddpm/metrics/rulers/digits-classifier-32d.pt and prints its sha256 for ddpm/metrics/fid.py's SHIPPED_RULERS.

`--cross` scores the sample sets with the shipped ruler in this process and again in a child
process under ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 (other kernels, as on another
CPU) and prints how far features and FIDs move.

    python3 -m benchmarks.ruler_samples --out /tmp/trust_ruler_sets.npz   # ~1 min
    python3 -m benchmarks.ruler --sets /tmp/trust_ruler_sets.npz --seeds 4 --ship --cross
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import torch

from ddpm.data.datasets import load_dataset, split_holdout
from ddpm.metrics.features import extract_features, load_featurizer, save_featurizer, train_classifier, RULERS_DIR
from ddpm.io import file_sha256
from ddpm.metrics.fid import feature_statistics, frechet_distance

RULER_FILE = RULERS_DIR / "digits-classifier-32d.pt"


def score(net, sets: dict, ref_images: np.ndarray, held_images: np.ndarray) -> dict[str, float]:
    ref = feature_statistics(extract_features(net, ref_images))
    out = {k: frechet_distance(*feature_statistics(extract_features(net, v)), *ref) for k, v in sets.items()}
    out["floor"] = frechet_distance(*feature_statistics(extract_features(net, held_images[:400])), *ref)
    return out


def seed_spread(sets: dict, n_seeds: int) -> dict:
    data = load_dataset("digits")
    tr, ho = split_holdout(data.labels, 0.25, 0)
    table, acc = {}, {}
    for seed in range(n_seeds):
        net, m = train_classifier(data.images[tr], data.labels[tr], data.images[ho], data.labels[ho],
                                  seed=seed, progress=False)
        table[seed] = score(net, sets, data.images[tr], data.images[ho])
        acc[seed] = m["val_accuracy"]
        print(f"seed {seed}: val acc {acc[seed]:.4f}, floor {table[seed]['floor']:.3f}", flush=True)
    cells = list(table[0])
    cv = {c: float(np.std([table[s][c] for s in table], ddof=1) / np.mean([table[s][c] for s in table]))
          for c in cells}
    best = {s: min((c for c in cells if c != "floor"), key=lambda c: table[s][c]) for s in table}
    return {"fid": {c: [table[s][c] for s in table] for c in cells}, "cv": cv, "val_accuracy": acc,
            "best_per_seed": best}


def ship() -> dict:
    data = load_dataset("digits")
    tr, ho = split_holdout(data.labels, 0.25, 0)
    net, m = train_classifier(data.images, data.labels, data.images[ho], data.labels[ho], seed=0, progress=False)
    RULER_FILE.parent.mkdir(parents=True, exist_ok=True)
    save_featurizer(RULER_FILE, net, {"trained_on": "all 1797 scikit-learn digits", "seed": 0, "epochs": 15,
                                      "batch_size": 64, "lr": 0.01, "feature_dim": 32,
                                      "final_loss": m["final_loss"]})
    return {"file": str(RULER_FILE.name), "sha256": file_sha256(RULER_FILE)}


def shipped_features(sets_path: str) -> dict[str, np.ndarray]:
    sets = dict(np.load(sets_path))
    net = load_featurizer(RULER_FILE)
    data = load_dataset("digits")
    sets["real"] = data.images
    return {k: extract_features(net, v) for k, v in sets.items()}


def cross(sets_path: str) -> dict:
    here = shipped_features(sets_path)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")
    out = "/tmp/ruler_cross_features.npz"
    subprocess.run([sys.executable, "-m", "benchmarks.ruler", "--sets", sets_path, "--dump", out], env=env,
                   check=True)
    there = dict(np.load(out))
    ref_h, ref_t = feature_statistics(here.pop("real")), feature_statistics(there.pop("real"))
    res = {}
    for k in here:
        fh = frechet_distance(*feature_statistics(here[k]), *ref_h)
        ft = frechet_distance(*feature_statistics(there[k]), *ref_t)
        res[k] = {"max_abs_feature_diff": float(np.abs(here[k] - there[k]).max()), "fid": fh, "fid_other_kernels": ft,
                  "rel_diff": abs(fh - ft) / fh}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="/tmp/trust_ruler_sets.npz")
    ap.add_argument("--seeds", type=int, default=0)
    ap.add_argument("--ship", action="store_true")
    ap.add_argument("--cross", action="store_true")
    ap.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.dump:
        np.savez(args.dump, **shipped_features(args.sets))
        return
    result: dict = {"torch": torch.__version__}
    if args.seeds:
        result["seed_spread"] = seed_spread(dict(np.load(args.sets)), args.seeds)
        print(json.dumps({k: result["seed_spread"][k] for k in ("cv", "best_per_seed")}, indent=1), flush=True)
    if args.ship:
        result["shipped"] = ship()
        print(result["shipped"], flush=True)
    if args.cross:
        result["cross_machine"] = cross(args.sets)
        print(json.dumps(result["cross_machine"], indent=1))
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
