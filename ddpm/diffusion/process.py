"""The Gaussian diffusion process of Ho et al. 2020: forward noising, prediction targets and the loss.

The process never owns the network: functions take ``model`` as an argument (as improved-diffusion's
``training_losses(model, x_start, t)``), and the network never sees a beta.
Notation: ``alpha_bar[t] = prod_{s<=t} (1 - beta_s)`` for t = 0..T-1 (0-based).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ddpm.diffusion.likelihood import LN2, vb_terms_from_output

OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")
# The reverse step's variance (Nichol & Dhariwal 2021, Sec. 3.1): beta_tilde_t, beta_t, or learned between them (eq. 15)
VARIANCES = ("fixed_small", "fixed_large", "learned_range")  # = ddpm.app.names.VARIANCES (tests/test_config.py)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _bcast(coef: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """coef[t] reshaped to [B, 1, 1, ...] for broadcasting against x: [B, ...]."""
    return coef[t].reshape(-1, *([1] * (ndim - 1)))


class GaussianProcess:
    """Fixed quantities of the forward process for one beta schedule.

    betas: [T] float64. Derived tables are kept in float64 (for samplers that combine them) and in
    float32 on ``device`` (for the training loss).
    """

    def __init__(
        self,
        betas: torch.Tensor,
        objective: str = "pred_noise",
        min_snr_gamma: Optional[float] = None,
        device: torch.device | str = "cpu",
        variance: str = "fixed_small",
        vb_loss_weight: float = 0.001,
        decoder_bin_width: float = 2 / 255,
    ) -> None:
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
        if not (isinstance(vb_loss_weight, (int, float)) and 0 <= vb_loss_weight < float("inf")):
            raise ValueError(f"vb_loss_weight must be a number >= 0, got {vb_loss_weight!r}")
        if not (isinstance(decoder_bin_width, (int, float)) and 0 < decoder_bin_width <= 2):
            raise ValueError(f"decoder_bin_width must be in (0, 2] (the data's bins in [-1, 1]), got {decoder_bin_width!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or null, got {min_snr_gamma!r}")
        betas = betas.to(torch.float64).cpu()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.objective = objective
        self.variance = variance
        self.vb_loss_weight = float(vb_loss_weight)  # lambda of L_hybrid (Nichol & Dhariwal Sec. 3.1); learned only
        self.decoder_bin_width = float(decoder_bin_width)  # L_0's bins in L_vlb: 2 / (levels - 1) of the data
        self.min_snr_gamma = min_snr_gamma
        self.device = torch.device(device)
        self.betas64 = betas
        self.alpha_bar64 = torch.cumprod(1 - betas, dim=0)  # eq. 4 of Ho et al.
        if objective == "pred_noise" and self.alpha_bar64[-1] == 0:
            raise ValueError(
                "objective 'pred_noise' cannot be used with zero terminal SNR (alpha_bar_T = 0 makes x0 "
                "undefined from the noise); use objective 'pred_v' or 'pred_x0' (Lin et al. 2023, Sec. 3.2)"
            )
        ab = self.alpha_bar64
        f32 = dict(dtype=torch.float32, device=self.device)
        self.sqrt_alpha_bar = ab.sqrt().to(**f32)
        self.sqrt_one_minus_alpha_bar = (1 - ab).sqrt().to(**f32)
        self.snr = (ab / (1 - ab)).to(**f32)  # signal-to-noise ratio, Kingma et al. 2021

    @property
    def num_timesteps(self) -> int:
        return self.betas64.numel()

    def to(self, device: torch.device | str) -> "GaussianProcess":
        if torch.device(device) == self.device:
            return self
        return GaussianProcess(self.betas64, self.objective, self.min_snr_gamma, device, self.variance,
                               self.vb_loss_weight, self.decoder_bin_width)

    @property
    def learned_variance(self) -> bool:
        """True when the network outputs 2C channels: the prediction, then v of eq. 15 (Nichol & Dhariwal)."""
        return self.variance == "learned_range"

    # --- forward process -------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps  (Ho et al. eq. 4). x0: [B, C, H, W], t: [B]."""
        return _bcast(self.sqrt_alpha_bar, t, x0.ndim) * x0 + _bcast(self.sqrt_one_minus_alpha_bar, t, x0.ndim) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses: eps, x0, or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022, Sec. 4)."""
        if self.objective == "pred_noise":
            return noise
        if self.objective == "pred_x0":
            return x0
        return _bcast(self.sqrt_alpha_bar, t, x0.ndim) * noise - _bcast(self.sqrt_one_minus_alpha_bar, t, x0.ndim) * x0

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight [B] of the simple loss; min-SNR-gamma (Hang et al. 2023, eq. 8-10) when set.

        The weight min(SNR, gamma) on the x0-error is expressed for each target: divided by SNR for
        eps, by SNR + 1 for v.
        """
        if self.min_snr_gamma is None:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr[t]
        w = snr.clamp(max=self.min_snr_gamma)
        if self.objective == "pred_noise":
            return w / snr
        if self.objective == "pred_v":
            return w / (snr + 1)
        return w

    def losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B]: the weighted simple loss (Ho et al. eq. 14: || target - model(x_t, t) ||^2, mean over
        pixels); with learned variances L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal Sec. 3.1)."""
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t).float()
        pred = out[:, :x0.shape[1]] if self.learned_variance else out
        err = F.mse_loss(pred, self.target(x0, noise, t), reduction="none").flatten(1).mean(1)
        loss = err * self.loss_weight(t)
        if self.learned_variance:
            loss = loss + self.vb_loss_weight * self.num_timesteps * self._vlb_bits(out, x0, x_t, t)
        return loss

    def _vlb_bits(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_t [B] in bits/dim with the mean's gradient stopped: only Sigma learns from it (Nichol & Dhariwal Sec. 3.1,
        improved-diffusion's ``frozen_out``). T * L_t estimates L_vlb = sum_t L_t; the decoder's bins at t = 0 are
        ``decoder_bin_width``: the data's (2/16 for digits' 17 levels; improved-diffusion's 2/255 for 8-bit data)."""
        C = x0.shape[1]
        frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
        nats = vb_terms_from_output(self, frozen, x0, x_t, t, bin_width=self.decoder_bin_width, clip_denoised=False)
        return (nats / (LN2 * x0[0].numel())).float()

    def sample_timesteps(self, batch: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
        """t ~ Uniform{0..T-1} [batch], drawn from ``generator``."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

