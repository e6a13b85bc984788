"""Golden values from diffusers for tests/test_samplers.py (diffusers is not a test dependency).

    pip install -r benchmarks/requirements.txt   # diffusers pinned there
    python benchmarks/golden_diffusers.py        # writes tests/data/golden_diffusers.npz (+ .json)

For every case: the same betas (ours, from ddpm.diffusion.schedules), the same fixed deterministic toy model
(``toy_model`` below, also imported by the tests), the same x_T and generator seed, sampled with
diffusers' scheduler loop (``set_timesteps`` then ``step`` per timestep). The tests run our one
sampling loop on the same inputs and compare. Grids: diffusers' ``timesteps`` for each
``timestep_spacing`` of DDIMScheduler and DPMSolverMultistepScheduler.
Only ``write_golden`` imports diffusers, so the tests can import this module without it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.samplers import StepRule
from ddpm.diffusion.schedules import get_beta_schedule

GOLDEN = ROOT / "tests" / "data" / "golden_diffusers.npz"
T = 1000
SHAPE = (4, 1, 4, 4)
MU, S = 0.2, 0.5
PREDICTION_TYPE = {"pred_noise": "epsilon", "pred_x0": "sample", "pred_v": "v_prediction"}
SCHEDULE = {"pred_noise": "linear", "pred_x0": "cosine", "pred_v": "sigmoid"}
GRID_STEPS = (1, 2, 5, 7, 10, 20, 27, 50, 100, 250)  # 27: a step count where rounding ties matter at T=1000


def _cases() -> list[dict]:
    """Every sampling case: rule, objective, schedule, zero terminal SNR, spacing, steps, clipping."""
    out = []
    for obj in PREDICTION_TYPE:
        for spacing in ("linspace", "trailing", "leading"):
            for clip in (True, False):
                out.append(dict(rule="dpmpp_2m", objective=obj, spacing=spacing, steps=10, clip=clip))
            out.append(dict(rule="dpmpp_2m", objective=obj, spacing=spacing, steps=25, clip=True))
        out.append(dict(rule="dpmpp_2m_sde", objective=obj, spacing="linspace", steps=10, clip=True))
        for spacing in ("leading", "trailing"):  # DDIMScheduler's prev_timestep = t - T // S: the next grid
            out.append(dict(rule="ddim", objective=obj, spacing=spacing, steps=10, clip=True))  # point here
    for obj in ("pred_x0", "pred_v"):
        for spacing in ("linspace", "trailing"):
            out.append(dict(rule="dpmpp_2m", objective=obj, spacing=spacing, steps=10, clip=True, ztsnr=True))
    for i, c in enumerate(out):
        c.setdefault("ztsnr", False)
        c["schedule"] = "linear" if c["ztsnr"] else SCHEDULE[c["objective"]]
        c["name"] = f"case{i:02d}"
    return out


CASES = _cases()


def toy_model(alpha_bar: torch.Tensor, objective: str):
    """A fixed deterministic model (x [B, ...], t [B] or scalar) -> output of ``objective``: the exact
    denoiser of N(MU, S^2) pixels on the table ``alpha_bar`` plus a nonlinear term 0.05 sin(3x + t/100)."""
    ab = alpha_bar.to(torch.float64)

    def model(x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).long()
        a = ab[t].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        d = a * S**2 + 1 - a
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / d
        x0 = MU + a.sqrt() * S**2 * (x - a.sqrt() * MU) / d  # finite at alpha_bar = 0
        out = {"pred_noise": eps, "pred_x0": x0, "pred_v": a.sqrt() * eps - (1 - a).sqrt() * x0}[objective]
        return out + 0.05 * torch.sin(3 * x + t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype) / 100)

    return model


def setup(case: dict) -> tuple[GaussianProcess, object, StepRule, torch.Tensor, int]:
    """Our side of a case: process, toy model, rule, x_T and the generator seed."""
    betas = get_beta_schedule(case["schedule"], T, case["ztsnr"])
    process = GaussianProcess(betas, case["objective"])
    model = toy_model(process.alpha_bar64, case["objective"])
    rule = StepRule(case["rule"], 0.0, case["spacing"])
    seed = int(case["name"][4:])
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + seed))
    return process, model, rule, x_T, seed


def _scheduler(case: dict, betas: torch.Tensor):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=T, trained_betas=betas.numpy(), timestep_spacing=case["spacing"],
                  prediction_type=PREDICTION_TYPE[case["objective"]], rescale_betas_zero_snr=case["ztsnr"])
    if case["rule"] == "ddim":
        return DDIMScheduler(clip_sample=case["clip"], clip_sample_range=1.0, set_alpha_to_one=True, **common)
    # dynamic thresholding with sample_max_value = 1 is clamping to [-1, 1]: our clip_denoised
    algo = "sde-dpmsolver++" if case["rule"] == "dpmpp_2m_sde" else "dpmsolver++"
    return DPMSolverMultistepScheduler(algorithm_type=algo, solver_order=2, lower_order_final=True,
                                       thresholding=case["clip"], sample_max_value=1.0, **common)


def diffusers_sample(case: dict) -> np.ndarray:
    process, model, _, x_T, seed = setup(case)
    sched = _scheduler(case, process.betas64.float())
    sched.set_timesteps(case["steps"])
    g = torch.Generator().manual_seed(seed)
    x = x_T.clone()
    for t in sched.timesteps:
        out = model(x, t)
        kw = dict(eta=0.0, use_clipped_model_output=True) if case["rule"] == "ddim" else dict(generator=g)
        x = sched.step(out, t, x, **kw).prev_sample
    return x.numpy()


def grids() -> dict[str, np.ndarray]:
    """diffusers' timesteps for each scheduler kind, spacing, T and step count."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    out = {}
    for kind, cls in (("ddim", DDIMScheduler), ("dpm", DPMSolverMultistepScheduler)):
        for spacing in ("linspace", "trailing", "leading"):
            for total in (100, T):
                for steps in GRID_STEPS:
                    if steps >= total:
                        continue
                    sched = cls(num_train_timesteps=total, timestep_spacing=spacing)
                    sched.set_timesteps(steps)
                    out[f"grid-{kind}-{spacing}-{total}-{steps}"] = sched.timesteps.numpy().astype(np.int64)
    return out


def write_golden() -> None:
    import diffusers

    arrays = {c["name"]: diffusers_sample(c) for c in CASES}
    arrays.update(grids())
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(GOLDEN, **arrays)
    GOLDEN.with_suffix(".json").write_text(json.dumps(
        {"diffusers": diffusers.__version__, "torch": torch.__version__, "T": T, "shape": SHAPE,
         "cases": CASES}, indent=1) + "\n")
    print(f"wrote {GOLDEN} ({len(arrays)} arrays) with diffusers {diffusers.__version__}")


if __name__ == "__main__":
    write_golden()
