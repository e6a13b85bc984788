"""Beta schedules: pure functions of the number of diffusion steps ``T`` -> float64 ``betas[T]``.

Every schedule returns betas in float64 (cast to float32 only where used), indexed t = 0..T-1,
where ``betas[t]`` is the variance of step t+1 in the paper's 1-based notation (Ho et al. 2020, eq. 2).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

MAX_BETA = 0.999  # Nichol & Dhariwal 2021, Sec. 3.2: avoid singularities near t = T


def linear_beta_schedule(timesteps: int) -> torch.Tensor:
    """Ho et al. 2020, Sec. 4: betas linear from 1e-4 to 0.02 at T = 1000.

    For other T the end points are scaled by 1000 / T (improved-diffusion's
    ``get_named_beta_schedule("linear")``), so alpha_bar_T stays near zero at T = 100 or 500.
    """
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=MAX_BETA)


def _betas_from_alpha_bar(alpha_bar: Callable[[torch.Tensor], torch.Tensor], timesteps: int) -> torch.Tensor:
    """beta_t = 1 - alpha_bar(t+1 / T) / alpha_bar(t / T), clipped at MAX_BETA (Nichol & Dhariwal 2021, eq. 17)."""
    s = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    ab = alpha_bar(s)
    betas = 1 - ab[1:] / ab[:-1]
    return betas.clamp(0, MAX_BETA)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2), betas <= 0.999."""

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return _betas_from_alpha_bar(lambda u: f(u) / f(torch.zeros(())), timesteps)


def sigmoid_beta_schedule(timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """Jabri et al. 2022 / Chen 2023 ("On the importance of noise scheduling"), as in
    denoising-diffusion-pytorch: alpha_bar(t) from a rescaled sigmoid, betas <= 0.999."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def ab(u: torch.Tensor) -> torch.Tensor:
        return (-torch.sigmoid((u * (end - start) + start) / tau) + v_end) / (v_end - v_start)

    return _betas_from_alpha_bar(ab, timesteps)


def quadratic_beta_schedule(timesteps: int) -> torch.Tensor:
    """sqrt(beta) linear from sqrt(1e-4) to sqrt(0.02) (Ho et al. 2020's code, "quad"), scaled by 1000/T like linear."""
    scale = 1000 / timesteps
    betas = torch.linspace((scale * 1e-4) ** 0.5, (scale * 0.02) ** 0.5, timesteps, dtype=torch.float64) ** 2
    return betas.clamp(max=MAX_BETA)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0
    (zero terminal SNR) while keeping sqrt(alpha_bar_0) unchanged."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


SCHEDULES: dict[str, Callable[[int], torch.Tensor]] = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
    "quadratic": quadratic_beta_schedule,
}


def get_beta_schedule(name: str, timesteps: int, zero_terminal_snr: bool = False) -> torch.Tensor:
    """Betas [T] (float64) of a named schedule; optionally rescaled to zero terminal SNR."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; known schedules: {', '.join(SCHEDULES)}")
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 1:
        raise ValueError(f"timesteps must be an integer >= 1, got {timesteps!r}")
    betas = SCHEDULES[name](timesteps)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas
