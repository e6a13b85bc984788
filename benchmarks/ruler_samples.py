"""Cheap generated sample sets for benchmarks/ruler.py: one small DDPM on the digits, trained briefly.

Trains the default-sized UNet (dim 16, mults 1, 2) on the scikit-learn digits through the Python API
(``ddpm.api.GaussianDiffusion``) and snapshots it after a few training lengths; each snapshot is
sampled with DDPM and DDIM at two step counts, 400 images each (the default ``sample.n_samples``).
The sets span FIDs from far-off to near the floor, which is what a ruler must rank.

    python3 -m benchmarks.ruler_samples --out /tmp/ruler_sets.npz
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from ddpm.api import GaussianDiffusion, Unet
from ddpm.data.convert import model_to_uint8
from ddpm.data.datasets import load_dataset
from ddpm.diffusion.samplers import StepRule


def make_sets(snapshots=(150, 400, 900), steps=(10, 50), n=400, seed=0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    data = load_dataset("digits")
    x = torch.from_numpy(data.images).float() / 255.0
    model = Unet(dim=16, dim_mults=(1, 2), channels=1, dropout=0.1)
    diff = GaussianDiffusion(model, image_size=8, timesteps=1000, objective="pred_noise")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    sets: dict[str, np.ndarray] = {}
    for step in range(1, max(snapshots) + 1):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = diff(x[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm, alpha=1 - d)
        if step in snapshots:
            sampler = GaussianDiffusion(ema, image_size=8, timesteps=1000)
            for rule in (StepRule("ddpm"), StepRule("ddim", 0.0)):
                for s in steps:
                    g = torch.Generator().manual_seed(1234)
                    imgs = sampler.sample(n, generator=g, steps=s, rule=rule)
                    key = f"train{step}-{rule.name}-{s}"
                    sets[key] = model_to_uint8(imgs * 2 - 1).numpy()
                    print(key, flush=True)
    return sets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/ruler_sets.npz")
    args = ap.parse_args()
    torch.set_num_threads(1)
    np.savez_compressed(args.out, **make_sets())


if __name__ == "__main__":
    main()
