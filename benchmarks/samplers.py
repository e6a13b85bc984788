"""FID by schedule x sampler x steps x spacing, for models a pipeline run trained (issue 15's measurement).

    python benchmarks/samplers.py --root RUN [--schedules linear cosine sigmoid] [--seeds 0 1] > rows.jsonl
    python benchmarks/samplers.py --table rows.jsonl [more.jsonl ...]       # the Markdown table

RUN is a folder where `dvc repro` (or `python -m stages.prepare`, `stages.featurizer`, `stages.train
<schedule>`) has written featurizer/ and models/<schedule>/model.pt. Each row: one sample set of
400 images (the pipeline's sample.n_samples) from sample seed ``seed``, its FID in the featurizer's
space and the sampling seconds (one thread; a ratio within one run, not an absolute speed).
The ODE samplers (ddim eta 0, dpmpp_2m) start from the same x_T for a given seed, so their FIDs
compare pairwise.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import time
from pathlib import Path

import torch

from ddpm.data.convert import model_to_uint8
from ddpm.metrics.features import extract_features, load_featurizer
from ddpm.metrics.fid import feature_statistics, frechet_distance
from ddpm.app.paths import load_arrays
from ddpm.diffusion.samplers import StepRule, sample_images
from ddpm.training.checkpoint import load_model

N = 400
CONFIGS = [(n, s, "linspace") for n, steps in (("ddim", (10, 20, 50, 100)), ("dpmpp_2m", (5, 10, 15, 20, 50)),
                                               ("dpmpp_2m_sde", (10, 20, 50)), ("ddpm", (10, 50, 100)))
           for s in steps]
CONFIGS += [(n, s, sp) for n in ("ddim", "dpmpp_2m") for s in (10, 20) for sp in ("trailing", "leading")]


def measure(root: Path, schedules: list[str], seeds: list[int]) -> None:
    torch.set_num_threads(1)
    feat = load_featurizer(root / "featurizer" / "featurizer.pt")
    ref = load_arrays(root / "featurizer" / "reference.npz")
    floor = frechet_distance(*feature_statistics(ref["holdout_features"][:N]), ref["mu"], ref["sigma"])
    print(json.dumps({"floor": floor}), flush=True)
    for schedule in schedules:
        model, process, ckpt = load_model(root / "models" / schedule / "model.pt")
        for name, steps, spacing in CONFIGS:
            for seed in seeds:
                t0 = time.perf_counter()
                x = sample_images(model, process, N, tuple(ckpt["image_shape"]), steps, StepRule(name, 0.0, spacing),
                                  seed=seed, batch_size=N, clip_denoised=ckpt["diffusion"]["clip_denoised"])
                dt = time.perf_counter() - t0
                f = extract_features(feat, model_to_uint8(x).numpy())
                fid = frechet_distance(*feature_statistics(f), ref["mu"], ref["sigma"])
                print(json.dumps(dict(schedule=schedule, sampler=name, steps=steps, spacing=spacing, seed=seed,
                                      fid=round(fid, 4), seconds=round(dt, 2))), flush=True)


def table(files: list[str]) -> None:
    rows = [json.loads(line) for f in files for line in open(f) if '"fid"' in line]
    fids = collections.defaultdict(list)
    for r in rows:
        fids[(r["sampler"], r["spacing"], r["steps"], r["schedule"])].append(r["fid"])
    schedules = list(dict.fromkeys(r["schedule"] for r in rows))
    print("| sampler | spacing | steps | " + " | ".join(f"{s} (mean; per seed)" for s in schedules) + " |")
    print("|---|---|---|" + "---|" * len(schedules))
    for key in sorted({k[:3] for k in fids}, key=lambda k: (k[0], k[1] != "linspace", k[1], k[2])):
        cells = []
        for s in schedules:
            v = fids.get((*key, s), [])
            cells.append(f"{sum(v) / len(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})" if v else "")
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path)
    ap.add_argument("--schedules", nargs="+", default=["linear", "cosine", "sigmoid"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--table", nargs="+", metavar="JSONL")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    table(a.table) if a.table else measure(a.root, a.schedules, a.seeds)
