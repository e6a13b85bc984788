"""The variational bound of Ho et al. 2020 (eq. 5) and the reverse step's Gaussian, as improved-diffusion's
``calc_bpd_loop`` / ``_vb_terms_bpd`` / ``losses.py`` compute them, for any bin width of the data.

    L = KL(q(x_T|x_0) || N(0, I))  +  sum_{t>1} KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t))  -  log p(x_0|x_1)

Indices are 0-based as in improved-diffusion: term t = 0 is the decoder -log p(x_0|x_1), term t > 0 the KL
into x_{t-1}. Everything here is computed in float64 (the model runs in its own dtype) and returned in nats
summed over dimensions per image, except ``bound_exact``'s ``bpd``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import torch

if TYPE_CHECKING:  # process.py imports this module (L_hybrid); the process is only passed through here
    from ddpm.diffusion.process import GaussianProcess

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LN2 = math.log(2.0)


# --- closed forms (improved-diffusion losses.py) -------------------------------------------------------
def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def bin_width(levels: int) -> float:
    """Width of one quantization bin of data with ``levels`` values spread over [-1, 1]: 2 / (levels - 1)."""
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2 (the data's quantization), got {levels!r}")
    return 2.0 / (levels - 1)


def _log_ndtr_diff(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi; reflected to the lower tail where lo > 0 so neither CDF rounds to 1."""
    flip = lo > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    lb = torch.special.log_ndtr(b)
    return lb + torch.log(-torch.expm1(torch.special.log_ndtr(a) - lb))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                                        bin_width: float) -> torch.Tensor:
    """log P(x) elementwise (nats) for x on a grid of ``bin_width`` in [-1, 1] under N(means, e^(2 log_scales))
    integrated over x's bin; the end bins extend to -inf and +inf (Ho et al. Sec. 3.3, eq. 13). The exact normal
    CDF (not improved-diffusion's tanh approximation), so the bins' probabilities sum to 1."""
    x, means, log_scales = x.double(), means.double(), log_scales.double()
    half = bin_width / 2
    inv = torch.exp(-log_scales)
    lo, hi = (x - means - half) * inv, (x - means + half) * inv
    first = torch.special.log_ndtr(hi)  # (-inf, x + half]
    last = torch.special.log_ndtr(-lo)  # [x - half, +inf)
    mid = _log_ndtr_diff(lo, hi)
    return torch.where(x < -1 + half, first, torch.where(x > 1 - half, last, mid))


# --- the process's tables (float64) ------------------------------------------------------------------
def _tables(process: GaussianProcess) -> dict[str, torch.Tensor]:
    """Posterior q(x_{t-1}|x_t, x_0) coefficients and log variances (Ho et al. eq. 6-7), float64 [T]."""
    betas = process.betas64
    if betas.numel() < 2:
        raise ValueError("the variational bound needs timesteps >= 2")
    ab = process.alpha_bar64
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)  # beta_tilde, eq. 7
    log_small = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # t = 0 takes t = 1's (improved-diffusion)
    return {
        "ab": ab, "log_small": log_small, "log_large": torch.log(torch.cat([post_var[1:2], betas[1:]])),
        "log_beta": torch.log(betas),
        "c_x0": betas * ab_prev.sqrt() / (1 - ab), "c_xt": (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab),
    }


def _at(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return table.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))


def q_posterior(process: GaussianProcess, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                tab: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, clipped log variance) of q(x_{t-1}|x_t, x_0), Ho et al. eq. 7; float64."""
    tab = tab or _tables(process)
    n = x_t.ndim
    mean = _at(tab["c_x0"], t, n) * x0.double() + _at(tab["c_xt"], t, n) * x_t.double()
    return mean, _at(tab["log_small"], t, n).expand_as(mean)


def predict_x0(objective: str, out: torch.Tensor, x_t: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """x0 from the network's prediction; ab = alpha_bar_t broadcastable to x_t (Ho et al. eq. 4; Salimans & Ho Sec. 4)."""
    if objective == "pred_noise":
        return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    if objective == "pred_x0":
        return out
    return ab.sqrt() * x_t - (1 - ab).sqrt() * out  # pred_v


def mean_variance_from_output(process: GaussianProcess, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                              clip_denoised: bool = True, tab: Optional[dict] = None):
    """(mean, log_variance, pred_x0) of p(x_{t-1}|x_t) from the network's output ``out`` (2C channels when the
    variance is learned); float64. Learned: log Sigma = v log beta_t + (1 - v) log beta_tilde_t, v = (o + 1) / 2
    (Nichol & Dhariwal eq. 15)."""
    tab = tab or _tables(process)
    out, x_t, n, C = out.double(), x_t.double(), x_t.ndim, x_t.shape[1]
    if process.learned_variance:
        out, o = out[:, :C], out[:, C:]
        v = (o + 1) / 2
        log_var = v * _at(tab["log_beta"], t, n) + (1 - v) * _at(tab["log_small"], t, n)
    else:
        key = "log_small" if process.variance == "fixed_small" else "log_large"
        log_var = _at(tab[key], t, n).expand_as(x_t)
    x0 = predict_x0(process.objective, out, x_t, _at(tab["ab"], t, n))
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean, _ = q_posterior(process, x0, x_t, t, tab)  # Ho et al. eq. 7 with x0 predicted
    return mean, log_var, x0


def p_mean_variance(model: Model, process: GaussianProcess, x_t: torch.Tensor, t: torch.Tensor,
                    clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, log_variance, pred_x0) of the reverse step p(x_{t-1}|x_t); x_t: [B, C, ...], t: [B] long."""
    return mean_variance_from_output(process, model(x_t, t), x_t, t, clip_denoised)


# --- the bound -------------------------------------------------------------------------------------------
def vb_terms_from_output(process: GaussianProcess, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                         t: torch.Tensor, bin_width: float, clip_denoised: bool = True) -> torch.Tensor:
    """L_t per image [B] in nats summed over dims, from the network's output at (x_t, t)."""
    tab = _tables(process)
    mean, log_var, _ = mean_variance_from_output(process, out, x_t, t, clip_denoised, tab)
    true_mean, true_log_var = q_posterior(process, x0, x_t, t, tab)
    first = t == 0
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).sum(1)  # Ho et al. eq. 5, L_{t-1}
    if not bool(first.any()):  # the decoder's CDFs cost more than the KL: only where some t is 0
        return kl
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var, bin_width).flatten(1).sum(1)  # L_0
    return torch.where(first, nll, kl)


def vb_terms(model: Model, process: GaussianProcess, x0: torch.Tensor, t: torch.Tensor, *, bin_width: float,
             noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
             clip_denoised: bool = True) -> torch.Tensor:
    """L_t per image [B] (nats, summed over dims) at x_t ~ q(x_t|x_0) drawn with ``noise`` (or from
    ``generator``): -log p(x_0|x_1) where t == 0, KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)) elsewhere."""
    if noise is None:
        if generator is None:
            raise ValueError("vb_terms needs noise= or generator= (randomness is explicit)")
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = process.q_sample(x0, t, noise)
    return vb_terms_from_output(process, model(x_t, t), x0, x_t, t, bin_width, clip_denoised)


def prior_kl(process: GaussianProcess, x0: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T|x_0) || N(0, I)) per image [B], nats summed over dims (Ho et al. eq. 5, L_T)."""
    ab_T = process.alpha_bar64[-1].item()  # < 1: every beta > 0
    mean = math.sqrt(ab_T) * x0.double()
    logvar = torch.full_like(mean, math.log1p(-ab_T))
    return normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean)).flatten(1).sum(1)


@torch.no_grad()
def bound_exact(model: Model, process: GaussianProcess, x0: torch.Tensor, *, bin_width: float,
                generator: Optional[torch.Generator], clip_denoised: bool = True) -> dict[str, torch.Tensor]:
    """All T terms per image, as improved-diffusion's ``calc_bpd_loop`` (t from T-1 down to 0, one noise draw
    each from ``generator``): {"prior": [B], "terms": [B, T] (nats), "bpd": [B] (bits/dim)}; float64."""
    if isinstance(model, torch.nn.Module) and model.training:
        raise ValueError("bound_exact: call model.eval() first (dropout would change the bound)")
    B, T = x0.shape[0], process.num_timesteps
    terms = torch.empty(B, T, dtype=torch.float64, device=x0.device)
    for t in range(T - 1, -1, -1):
        tt = torch.full((B,), t, dtype=torch.long, device=x0.device)
        terms[:, t] = vb_terms(model, process, x0, tt, bin_width=bin_width, generator=generator,
                               clip_denoised=clip_denoised)
    prior = prior_kl(process, x0)
    bpd = (prior + terms.sum(1)) / (LN2 * x0[0].numel())
    return {"prior": prior, "terms": terms, "bpd": bpd}
