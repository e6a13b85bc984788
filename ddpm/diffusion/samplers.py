"""Sampling: timestep grids, step rules, and ONE sampling loop.

Every rule maps (x_t, x0_hat, eps_hat, x0_hist) to
    x_{t_prev} = c_x0 * x0_hat + c_xt * x_t + c_eps * eps_hat + c_hist * x0_hist + sigma * z,
with coefficients computed from alpha_bar at t, at t_prev and, for multistep rules, at the previous
grid point (whose x0 prediction ``x0_hist`` the loop keeps: the rule's history). DDPM, DDIM and
DPM-Solver++(2M) therefore differ only in their coefficient tables, and any grid of S <= T steps is
"respacing": the chain built from alpha_bar on the grid (Nichol & Dhariwal 2021, Sec. 4; DDIM Sec. 4.2).

Grids follow diffusers' ``timestep_spacing`` (Lin et al. 2024, Table 2) exactly, as its
DDIMScheduler / DDPMScheduler (ddpm, ddpm_large, ddim) and DPMSolverMultistepScheduler (dpmpp_*)
compute them; ``linspace`` with the DDIM definition is ``round(linspace(T-1, 0, S))``. The final step
(t_prev = -1, alpha_bar = 1) returns the predicted x0 with no added noise (Ho et al. Algorithm 2,
z = 0 at t = 1; DPM-Solver++ with ``final_sigmas_type="zero"``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.grids import timestep_grid  # noqa: F401  (re-exported: the grids are part of the sampling API)
from ddpm.app.names import MULTISTEP_RULES, SPACINGS, STEP_RULES, sampler_label  # noqa: F401

ZERO_SNR_ALPHA_BAR = 2.0**-24  # what diffusers' DPMSolverMultistepScheduler puts at alpha_bar_T = 0


class Coefficients(NamedTuple):
    """x_prev = x0 * x0_hat + xt * x_t + eps * eps_hat + hist * x0_hist + sigma * z."""

    x0: float
    xt: float
    eps: float
    sigma: float
    hist: float = 0.0


def _half_log_snr(ab: float) -> float:
    """lambda = log(alpha / sigma) = 0.5 log(ab / (1 - ab)) (DPM-Solver, Lu et al. 2022, Sec. 3.1)."""
    return 0.5 * (math.log(ab) - math.log1p(-ab))


@dataclass(frozen=True)
class StepRule:
    """A step rule and its grid: ``name`` in STEP_RULES; ``eta`` used by DDIM (0 = deterministic,
    1 = DDPM posterior), ignored by ddpm and ddpm_large, 0 for the solvers; ``spacing`` in SPACINGS."""

    name: str = "ddpm"
    eta: float = 0.0
    spacing: str = "linspace"

    def __post_init__(self) -> None:
        if self.name not in STEP_RULES:
            raise ValueError(f"unknown sampler {self.name!r}; allowed: {', '.join(STEP_RULES)}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"sampler eta must be in [0, 1], got {self.eta!r}")
        if self.name in MULTISTEP_RULES and self.eta != 0:
            raise ValueError(f"sampler {self.name} takes no eta, got eta={self.eta!r}; allowed: 0.0")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.spacing!r}; allowed: {', '.join(SPACINGS)}")

    @property
    def multistep(self) -> bool:
        return self.name in MULTISTEP_RULES

    def grid(self, num_timesteps: int, steps: int) -> list[int]:
        return timestep_grid(num_timesteps, steps, self.spacing, solver=self.multistep)

    def alpha_bars(self, alpha_bar: list[float]) -> list[float]:
        """The alpha_bar table the rule steps on: the solvers replace a zero terminal alpha_bar by 2**-24
        (diffusers' DPMSolverMultistepScheduler with ``rescale_betas_zero_snr``), so lambda stays finite."""
        if self.multistep and alpha_bar[-1] == 0:
            return alpha_bar[:-1] + [ZERO_SNR_ALPHA_BAR]
        return alpha_bar

    def coefficients(self, ab_t: float, ab_prev: float, last: bool, ab_hist: Optional[float] = None) -> Coefficients:
        """One step from alpha_bar_t to alpha_bar_prev (python floats, float64); ``ab_hist``: alpha_bar of the
        previous grid point (None at the first step), used by the multistep rules only."""
        if self.multistep:
            return self._dpmpp(ab_t, ab_prev, last, ab_hist)
        beta = 1 - ab_t / ab_prev  # the respaced chain's beta (improved-diffusion respace.py)
        if self.name == "ddim":
            # DDIM eq. 16: sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)
            sigma = self.eta * math.sqrt(max((1 - ab_prev) / (1 - ab_t) * beta, 0.0))
            # DDIM eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
            return Coefficients(math.sqrt(ab_prev), 0.0, math.sqrt(max(1 - ab_prev - sigma**2, 0.0)), sigma)
        # Ho et al. eq. 6-7: posterior mean of q(x_prev | x_t, x0)
        c_x0 = math.sqrt(ab_prev) * beta / (1 - ab_t)
        c_xt = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
        if last:
            return Coefficients(c_x0, c_xt, 0.0, 0.0)
        # variance: beta_tilde (eq. 7, "small") or beta_t (the sigma-hat row of DDIM's Table 1, "large")
        var = beta * (1 - ab_prev) / (1 - ab_t) if self.name == "ddpm" else beta
        return Coefficients(c_x0, c_xt, 0.0, math.sqrt(var))

    def _dpmpp(self, ab_s: float, ab_t: float, last: bool, ab_hist: Optional[float]) -> Coefficients:
        """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2: data prediction) and its SDE variant (same paper;
        diffusers' ``sde-dpmsolver++``, midpoint), from s to t in lambda. First order at the first step (no
        history) and at the last step (to alpha_bar = 1: returns x0, as diffusers' ``lower_order_final`` with
        ``final_sigmas_type="zero"``)."""
        if last or ab_t >= 1.0:
            return Coefficients(1.0, 0.0, 0.0, 0.0)
        sde = self.name == "dpmpp_2m_sde"
        alpha_t, sigma_t, sigma_s = math.sqrt(ab_t), math.sqrt(1 - ab_t), math.sqrt(1 - ab_s)
        h = _half_log_snr(ab_t) - _half_log_snr(ab_s)
        # ODE: x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) D;  SDE: e^-h on x_s, e^-2h in the x0 term
        c_xs = sigma_t / sigma_s * (math.exp(-h) if sde else 1.0)
        a = alpha_t * -math.expm1(-2 * h if sde else -h)
        noise = sigma_t * math.sqrt(-math.expm1(-2 * h)) if sde else 0.0
        if ab_hist is None:
            return Coefficients(a, c_xs, 0.0, noise)
        # D = (1 + 1/(2r)) x0 - 1/(2r) x0_hist, r = h_hist / h (Algorithm 2 of DPM-Solver++)
        w = 0.5 * h / (_half_log_snr(ab_s) - _half_log_snr(ab_hist))
        return Coefficients(a * (1 + w), c_xs, 0.0, noise, -a * w)

    @property
    def label(self) -> str:
        return sampler_label(self.name, self.eta)

    @property
    def uses_learned_variance(self) -> bool:
        """The ancestral DDPM rules sample with a learned Sigma; DDIM and the solvers keep their own sigma."""
        return self.name in ("ddpm", "ddpm_large")

    def learned_sigma(self, ab_t: float, ab_prev: float, v_out: torch.Tensor) -> torch.Tensor:
        """sqrt(Sigma) = exp((v log beta + (1 - v) log beta_tilde) / 2), v = (out + 1) / 2 (Nichol & Dhariwal
        eq. 15), with beta and beta_tilde of the respaced chain: beta = 1 - ab_t / ab_prev (their Sec. 4)."""
        beta = 1 - ab_t / ab_prev
        log_beta, log_tilde = math.log(beta), math.log(beta * (1 - ab_prev) / (1 - ab_t))
        v = (v_out + 1) / 2
        return torch.exp(0.5 * (v * log_beta + (1 - v) * log_tilde))


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
    noise: Optional["IndexedNoise"] = None,
) -> torch.Tensor:
    """Draw samples [N, C, H, W] in model space from x_T ~ N(0, I) over ``rule``'s grid of ``steps`` timesteps.

    The only loop: the rule's coefficients are python floats computed once, the model is called once
    per step, and nothing reads a device value back (no host synchronisation per step). The noise (x_T and
    each step's z) comes from ``noise`` when given (per sample index, see :class:`IndexedNoise`), else from
    ``generator`` as one stream.
    """
    device = torch.device(device)
    grid = rule.grid(process.num_timesteps, steps)
    ab = rule.alpha_bars(process.alpha_bar64.tolist())
    if noise is None:
        noise = _StreamNoise(shape, generator, device)
    x = noise.initial() if x_T is None else x_T.to(device).clone()
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    iterator = grid
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(grid, desc=f"sampling {rule.label}, {steps} steps", leave=False)
    x0_hist, ab_hist = None, None  # the history: x0 prediction and alpha_bar (lambda) of the previous point
    try:
        for i, t in enumerate(iterator):
            last = i == len(grid) - 1
            ab_t, ab_prev = ab[t], (1.0 if last else ab[grid[i + 1]])
            c = rule.coefficients(ab_t, ab_prev, last, ab_hist)
            # [B] as a stride-0 view of one t: any model gets a t per image, ours embeds it once
            t_batch = torch.full((), t, device=device, dtype=torch.long).expand(shape[0])
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(x, t_batch).float()
            out, v_out = out.chunk(2, dim=1) if process.learned_variance else (out, None)
            x0, eps = predict_x0_eps(out, x, process.objective, math.sqrt(ab_t), math.sqrt(1 - ab_t), clip_denoised)
            x_prev = c.x0 * x0
            if c.xt:
                x_prev = x_prev + c.xt * x
            if c.eps:
                x_prev = x_prev + c.eps * eps
            if c.hist:
                x_prev = x_prev + c.hist * x0_hist
            if c.sigma:
                learned = v_out is not None and rule.uses_learned_variance
                sigma = rule.learned_sigma(ab_t, ab_prev, v_out) if learned else c.sigma
                x_prev = x_prev + sigma * noise.step(i)
            x = x_prev
            if rule.multistep:
                x0_hist, ab_hist = x0, ab_t
    finally:
        if was_training:
            model.train()
    return x


def chunk_generator(seed: int, chunk: int, device: torch.device | str) -> torch.Generator:
    """The generator of noise block ``chunk`` (sample indices [chunk * NOISE_BLOCK, (chunk + 1) * NOISE_BLOCK)):
    a pure function of (seed, chunk), so blocks can be drawn in any order or by several processes."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(chunk) * 7_919 + 12_345) % (2**63 - 1))
    return g


# Sample indices per noise block: the default sample.batch_size when per-index noise came, so every set drawn
# at batch 400 before it (x_T and step noise) is unchanged.
NOISE_BLOCK = 400


class _StreamNoise:
    """One generator's stream for a whole batch (``sample_loop`` with a plain ``generator``)."""

    def __init__(self, shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device):
        self.shape, self.generator, self.device = shape, generator, device

    def initial(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.device)

    def step(self, i: int) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.device)


class IndexedNoise:
    """The noise of sample indices [start, start + n): x_T and the z of step i of index j are a pure function of
    (seed, j, i), whatever the batch size, chunk order or process split. Index j lives in block
    b = j // NOISE_BLOCK, whose generator ``chunk_generator(seed, b)`` draws, in order, x_T of the whole block
    and then one block of z per step (step i: the (i + 1)-th; steps without noise skip theirs), so sample
    sets pair per index across schedules, T and experiments, stochastic rules too (common random numbers).
    A batch aligned on the blocks draws exactly what one stream per block would: no extra cost."""

    def __init__(self, seed: int, start: int, n: int, image_shape: tuple[int, ...], device: torch.device | str):
        self.start, self.n, self.image_shape, self.device = start, n, tuple(image_shape), torch.device(device)
        first, last = start // NOISE_BLOCK, (start + n - 1) // NOISE_BLOCK
        self.blocks = [(b, chunk_generator(seed, b, self.device)) for b in range(first, last + 1)]
        self.drawn = -1  # steps whose z has been drawn (-1: not even x_T)

    def _draw(self) -> torch.Tensor:
        parts = [torch.randn((NOISE_BLOCK, *self.image_shape), generator=g, device=self.device)
                 for _, g in self.blocks]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        lo = self.start - self.blocks[0][0] * NOISE_BLOCK
        return x[lo:lo + self.n]

    def initial(self) -> torch.Tensor:
        if self.drawn != -1:
            raise RuntimeError("IndexedNoise.initial() must come first, once")
        self.drawn = 0
        return self._draw()

    def step(self, i: int) -> torch.Tensor:
        """z of step i (0-based over the grid); the blocks of steps skipped since the last call are drawn and
        dropped, so step i's z never depends on which earlier steps used theirs."""
        if i < self.drawn:
            raise RuntimeError(f"IndexedNoise.step({i}) after step {self.drawn - 1}: steps must increase")
        while self.drawn < i:
            self._draw()
            self.drawn += 1
        self.drawn += 1
        return self._draw()


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
    """``num_samples`` images [N, C, H, W] in model space, drawn in chunks of ``batch_size``; image j's noise is
    a function of (seed, j, step) alone (:class:`IndexedNoise`), so the images do not depend on the batch
    size, and a larger ``num_samples`` only appends images. ``chunks`` selects a subset of the chunks (for
    splitting work); the default is all."""
    n_chunks = math.ceil(num_samples / batch_size)
    chunks = list(range(n_chunks)) if chunks is None else chunks
    out = []
    iterator = chunks
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(chunks, desc=f"sample {rule.label} x{steps}", unit="batch")
    for k in iterator:
        n = min(batch_size, num_samples - k * batch_size)
        noise = IndexedNoise(seed, k * batch_size, n, image_shape, device)
        out.append(
            sample_loop(model, process, (n, *image_shape), steps, rule, None, clip_denoised, device,
                        autocast_dtype=autocast_dtype, noise=noise).cpu()
        )
    return torch.cat(out) if out else torch.empty(0, *image_shape)
