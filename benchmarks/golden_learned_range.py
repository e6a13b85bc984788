"""Golden values from diffusers' DDPMScheduler(variance_type="learned_range") for tests/test_learned_variance.py
(diffusers is not a test dependency).

    pip install -r benchmarks/requirements.txt   # diffusers pinned there
    python -m benchmarks.golden_learned_range    # writes tests/data/golden_learned_range.npz (+ .json)

Each case: our betas, a fixed toy model with 2C outputs (the prediction of benchmarks/golden_diffusers.py's toy
model, then v in (-1, 1)), the same x_T and generator, sampled with DDPMScheduler's ``set_timesteps`` + ``step``
loop (Sigma = exp(v log beta_t + (1 - v) log beta_tilde_t) of the respaced chain, Nichol & Dhariwal eq. 15).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.golden_diffusers import PREDICTION_TYPE, SHAPE, T, toy_model
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.samplers import StepRule
from ddpm.diffusion.schedules import get_beta_schedule

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden_learned_range.npz"
CASES = [
    dict(name="lr0", objective="pred_noise", schedule="linear", spacing="leading", steps=T, clip=True),
    dict(name="lr1", objective="pred_noise", schedule="linear", spacing="leading", steps=50, clip=True),
    dict(name="lr2", objective="pred_noise", schedule="cosine", spacing="linspace", steps=20, clip=False),
    dict(name="lr3", objective="pred_v", schedule="sigmoid", spacing="leading", steps=25, clip=True),
    dict(name="lr4", objective="pred_x0", schedule="cosine", spacing="linspace", steps=10, clip=True),
]


def learned_toy_model(alpha_bar: torch.Tensor, objective: str):
    """[prediction, v]: v = 0.9 sin(2x + t / 300), a fixed output in (-1, 1) that varies with x and t."""
    base = toy_model(alpha_bar, objective)

    def model(x: torch.Tensor, t) -> torch.Tensor:
        tt = torch.as_tensor(t).reshape(-1).long().view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return torch.cat([base(x, t), 0.9 * torch.sin(2 * x + tt / 300)], dim=1)

    return model


def setup(case: dict):
    """Our side: process (learned_range), model, rule, x_T, generator seed."""
    process = GaussianProcess(get_beta_schedule(case["schedule"], T), case["objective"], variance="learned_range")
    model = learned_toy_model(process.alpha_bar64, case["objective"])
    seed = int(case["name"][2:])
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2000 + seed))
    return process, model, StepRule("ddpm", 0.0, case["spacing"]), x_T, seed


def diffusers_sample(case: dict) -> np.ndarray:
    from diffusers import DDPMScheduler

    process, model, _, x_T, seed = setup(case)
    sched = DDPMScheduler(num_train_timesteps=T, trained_betas=process.betas64.float().numpy(),
                          variance_type="learned_range", clip_sample=case["clip"], clip_sample_range=1.0,
                          prediction_type=PREDICTION_TYPE[case["objective"]], timestep_spacing=case["spacing"])
    sched.set_timesteps(case["steps"])
    g, x = torch.Generator().manual_seed(seed), x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, generator=g).prev_sample
    return x.numpy()


def write_golden() -> None:
    import diffusers

    arrays = {c["name"]: diffusers_sample(c) for c in CASES}
    np.savez_compressed(GOLDEN, **arrays)
    GOLDEN.with_suffix(".json").write_text(json.dumps(
        {"diffusers": diffusers.__version__, "torch": torch.__version__, "T": T, "shape": SHAPE, "cases": CASES},
        indent=1) + "\n")
    print(f"wrote {GOLDEN} ({len(arrays)} arrays) with diffusers {diffusers.__version__}")


if __name__ == "__main__":
    write_golden()
