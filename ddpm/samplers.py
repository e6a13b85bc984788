"""Sampling: timestep grids, step rules, and ONE sampling loop.

Every rule maps (x_t, x0_hat, eps_hat) to x_{t_prev} = c_x0 * x0_hat + c_xt * x_t + c_eps * eps_hat + sigma * z,
with coefficients computed from alpha_bar[t] and alpha_bar[t_prev] alone. DDPM and DDIM therefore
differ only in their coefficient tables, and any grid of S <= T steps is "respacing": the chain
built from alpha_bar on the grid (Nichol & Dhariwal 2021, Sec. 4; DDIM Sec. 4.2).

Grid convention: S timesteps ``round(linspace(T-1, 0, S))`` (diffusers' ``timestep_spacing="linspace"``):
always starts at t = T-1 (the noisiest step) and ends at t = 0; S = T gives every step.
The final step (t_prev = -1, alpha_bar = 1) returns the predicted x0 with no added noise
(Ho et al. Algorithm 2, z = 0 at t = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .diffusion import GaussianProcess
from .names import sampler_label

STEP_RULES = ("ddpm", "ddpm_large", "ddim")


def timestep_grid(num_timesteps: int, steps: int) -> list[int]:
    """Descending timesteps [S]: round(linspace(T-1, 0, S)); distinct because the spacing is >= 1."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be an integer in [1, timesteps={num_timesteps}], got {steps!r}")
    if steps == 1:
        return [num_timesteps - 1]
    return [round((num_timesteps - 1) * (1 - i / (steps - 1))) for i in range(steps)]


@dataclass(frozen=True)
class StepRule:
    """A step rule: ``name`` in STEP_RULES, ``eta`` used by DDIM (0 = deterministic, 1 = DDPM posterior)."""

    name: str = "ddpm"
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in STEP_RULES:
            raise ValueError(f"unknown sampler {self.name!r}; allowed: {', '.join(STEP_RULES)}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"sampler eta must be in [0, 1], got {self.eta!r}")

    def coefficients(self, ab_t: float, ab_prev: float, last: bool) -> tuple[float, float, float, float]:
        """(c_x0, c_xt, c_eps, sigma) for one step from alpha_bar_t to alpha_bar_prev (python floats, float64)."""
        beta = 1 - ab_t / ab_prev  # the respaced chain's beta (improved-diffusion respace.py)
        if self.name == "ddim":
            # DDIM eq. 16: sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)
            sigma = self.eta * math.sqrt(max((1 - ab_prev) / (1 - ab_t) * beta, 0.0))
            # DDIM eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
            return math.sqrt(ab_prev), 0.0, math.sqrt(max(1 - ab_prev - sigma**2, 0.0)), sigma
        # Ho et al. eq. 6-7: posterior mean of q(x_prev | x_t, x0)
        c_x0 = math.sqrt(ab_prev) * beta / (1 - ab_t)
        c_xt = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
        if last:
            return c_x0, c_xt, 0.0, 0.0
        # variance: beta_tilde (eq. 7, "small") or beta_t (the sigma-hat row of DDIM's Table 1, "large")
        var = beta * (1 - ab_prev) / (1 - ab_t) if self.name == "ddpm" else beta
        return c_x0, c_xt, 0.0, math.sqrt(var)

    @property
    def label(self) -> str:
        return sampler_label(self.name, self.eta)


def predict_x0_eps(
    out: torch.Tensor, x_t: torch.Tensor, objective: str, sqrt_ab: float, sqrt_1m_ab: float, clip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Network output -> (x0_hat, eps_hat) for one timestep; clipping x0 to [-1, 1] re-derives eps from it."""
    if objective == "pred_noise":
        eps = out
        x0 = (x_t - sqrt_1m_ab * eps) / sqrt_ab
    elif objective == "pred_x0":
        x0 = out
        eps = (x_t - sqrt_ab * x0) / sqrt_1m_ab if sqrt_1m_ab > 0 else torch.zeros_like(x_t)
    else:  # pred_v, Salimans & Ho 2022 Sec. 4
        x0 = sqrt_ab * x_t - sqrt_1m_ab * out
        eps = sqrt_1m_ab * x_t + sqrt_ab * out
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
        if sqrt_1m_ab > 0:
            eps = (x_t - sqrt_ab * x0) / sqrt_1m_ab
    return x0, eps


@torch.inference_mode()
def sample_loop(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    process: GaussianProcess,
    shape: tuple[int, ...],
    steps: int,
    rule: StepRule = StepRule(),
    generator: Optional[torch.Generator] = None,
    clip_denoised: bool = True,
    device: torch.device | str = "cpu",
    x_T: Optional[torch.Tensor] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw samples [N, C, H, W] in model space from x_T ~ N(0, I) over a grid of ``steps`` timesteps.

    The only loop: the rule's coefficients are python floats computed once, the model is called once
    per step, and nothing reads a device value back (no host synchronisation per step).
    """
    device = torch.device(device)
    grid = timestep_grid(process.num_timesteps, steps)
    ab = process.alpha_bar64.tolist()
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device).clone()
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    iterator = grid
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(grid, desc=f"sampling {rule.label}, {steps} steps", leave=False)
    try:
        for i, t in enumerate(iterator):
            last = i == len(grid) - 1
            ab_t, ab_prev = ab[t], (1.0 if last else ab[grid[i + 1]])
            c_x0, c_xt, c_eps, sigma = rule.coefficients(ab_t, ab_prev, last)
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(x, t_batch)
            x0, eps = predict_x0_eps(out.float(), x, process.objective, math.sqrt(ab_t), math.sqrt(1 - ab_t), clip_denoised)
            x_prev = c_x0 * x0
            if c_xt:
                x_prev = x_prev + c_xt * x
            if c_eps:
                x_prev = x_prev + c_eps * eps
            if sigma:
                x_prev = x_prev + sigma * torch.randn(shape, generator=generator, device=device)
            x = x_prev
    finally:
        if was_training:
            model.train()
    return x


def chunk_generator(seed: int, chunk: int, device: torch.device | str) -> torch.Generator:
    """The generator of sample chunk ``chunk``: a pure function of (seed, chunk), so chunks can be drawn
    in any order or by several processes and still give the same images."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(chunk) * 7_919 + 12_345) % (2**63 - 1))
    return g


def sample_images(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    process: GaussianProcess,
    num_samples: int,
    image_shape: tuple[int, int, int],
    steps: int,
    rule: StepRule,
    seed: int,
    batch_size: int = 256,
    clip_denoised: bool = True,
    device: torch.device | str = "cpu",
    autocast_dtype: Optional[torch.dtype] = None,
    chunks: Optional[list[int]] = None,
    progress: bool = False,
) -> torch.Tensor:
    """``num_samples`` images [N, C, H, W] in model space, drawn in chunks of ``batch_size``; chunk k uses
    ``chunk_generator(seed, k)``. ``chunks`` selects a subset (for splitting work); the default is all."""
    n_chunks = math.ceil(num_samples / batch_size)
    chunks = list(range(n_chunks)) if chunks is None else chunks
    out = []
    iterator = chunks
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(chunks, desc=f"sample {rule.label} x{steps}", unit="batch")
    for k in iterator:
        n = min(batch_size, num_samples - k * batch_size)
        g = chunk_generator(seed, k, device)
        out.append(
            sample_loop(model, process, (n, *image_shape), steps, rule, g, clip_denoised, device,
                        autocast_dtype=autocast_dtype).cpu()
        )
    return torch.cat(out) if out else torch.empty(0, *image_shape)
