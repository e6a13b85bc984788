"""Samplers driven by the exact denoiser of Gaussian data.

For pixels x0 ~ N(mu, s^2) the ideal predictions are known in closed form (a = alpha_bar_t):
    eps*(x_t) = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a),
    x0*(x_t) = (x_t - sqrt(1 - a) eps*) / sqrt(a),  v* = sqrt(a) eps* - sqrt(1 - a) x0*.
Each step is then affine in x_t, so the law of the chain's output is Gaussian with a mean and
variance we compute exactly by recursion. Two tolerances follow:
  1. the sampled mean/std equal that exact law within 5 standard errors (N = 8,192 independent
     pixels: SE(mean) = sd / sqrt(N) ~ 0.0055, SE(std) ~ sd / sqrt(2N) ~ 0.004) -> tests the loop;
  2. the exact law approaches (mu, s) as S -> T: at S = 1000 every rule is within 1.5% of s and the
     mean within 0.005 of mu (x_T ~ N(0, I) ignores the sqrt(alpha_bar_T) mu left at t = T, largest
     for the quadratic schedule); at S = 250 within 3.5% -> tests the step rules' coefficients. At 10 or
     50 steps the rules are biased by design (the DDIM paper's Table 1); the numbers are asserted
     against the exact law only.
"""
import math

import pytest
import torch

from ddpm.diffusion import GaussianProcess
from ddpm.samplers import STEP_RULES, StepRule, sample_images, sample_loop, timestep_grid
from ddpm.schedules import get_beta_schedule

MU, S = 0.2, 0.5
T = 1000
RULES = [StepRule("ddpm"), StepRule("ddpm_large"), StepRule("ddim", 0.0), StepRule("ddim", 0.5), StepRule("ddim", 1.0)]
STEPS = [10, 50, 250]  # S = T is covered by the exact law below and by test_grids


class GaussianOracle(torch.nn.Module):
    """The exact predictor of an objective for N(MU, S^2) data; knows alpha_bar only to be an oracle."""

    def __init__(self, alpha_bar: torch.Tensor, objective: str):
        super().__init__()
        self.register_buffer("ab", alpha_bar.float())
        self.objective = objective
        self.channels = 1

    def forward(self, x, t):
        a = self.ab[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return {"pred_noise": eps, "pred_x0": x0, "pred_v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.objective]


def exact_law(alpha_bar: list[float], rule: StepRule, steps: int) -> tuple[float, float]:
    """Mean and std of the sampler's output for the Gaussian oracle, by exact affine recursion."""
    grid = timestep_grid(len(alpha_bar), steps)
    m, v = 0.0, 1.0
    for i, t in enumerate(grid):
        last = i == len(grid) - 1
        a, ap = alpha_bar[t], (1.0 if last else alpha_bar[grid[i + 1]])
        c0, cx, ce, sig = rule.coefficients(a, ap, last)
        d = a * S**2 + 1 - a
        ae, be = math.sqrt(1 - a) / d, -math.sqrt(1 - a) * math.sqrt(a) * MU / d  # eps* = ae x + be
        a0, b0 = (1 - math.sqrt(1 - a) * ae) / math.sqrt(a), -math.sqrt(1 - a) * be / math.sqrt(a)
        p, q = c0 * a0 + cx + ce * ae, c0 * b0 + ce * be
        m, v = p * m + q, p * p * v + sig * sig
    return m, math.sqrt(v)


@pytest.fixture(scope="module")
def process():
    return {obj: GaussianProcess(get_beta_schedule("linear", T), obj) for obj in ("pred_noise", "pred_x0", "pred_v")}


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.label)
def test_samples_follow_the_exact_law(process, objective, rule):
    p = process[objective]
    model = GaussianOracle(p.alpha_bar64, objective)
    ab = p.alpha_bar64.tolist()
    for steps in STEPS:
        g = torch.Generator().manual_seed(steps)
        x = sample_loop(model, p, (2048, 1, 2, 2), steps, rule, g, clip_denoised=False)
        n = x.numel()
        m, sd = exact_law(ab, rule, steps)
        assert abs(x.mean().item() - m) < 5 * sd / math.sqrt(n), (steps, x.mean().item(), m)
        assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * n), (steps, x.std().item(), sd)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sigmoid", "quadratic"])
def test_exact_law_converges_to_the_data(schedule):
    ab = torch.cumprod(1 - get_beta_schedule(schedule, T), 0).tolist()
    for rule in RULES:
        for steps, tol in ((250, 0.035), (1000, 0.015)):
            m, sd = exact_law(ab, rule, steps)
            assert abs(m - MU) < 5e-3, (rule, steps, m)
            assert abs(sd / S - 1) < tol, (rule, steps, sd)


def test_ddim_eta0_is_deterministic_and_eta1_equals_ddpm():
    p = GaussianProcess(get_beta_schedule("cosine", 100))
    model = GaussianOracle(p.alpha_bar64, "pred_noise")
    xT = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sample_loop(model, p, xT.shape, 20, StepRule("ddim", 0.0), torch.Generator().manual_seed(1), x_T=xT)
    b = sample_loop(model, p, xT.shape, 20, StepRule("ddim", 0.0), torch.Generator().manual_seed(2), x_T=xT)
    assert torch.equal(a, b)
    c = sample_loop(model, p, xT.shape, 20, StepRule("ddim", 1.0), torch.Generator().manual_seed(3), x_T=xT)
    d = sample_loop(model, p, xT.shape, 20, StepRule("ddpm"), torch.Generator().manual_seed(3), x_T=xT)
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)  # DDIM eta=1 is the DDPM posterior (DDIM Sec. 4.1)


def test_step_rule_against_stored_values():
    # one DDPM step from alpha_bar 0.5 to 0.8 (beta = 0.375): hand-derived from Ho et al. eq. 7
    c0, cx, ce, sig = StepRule("ddpm").coefficients(0.5, 0.8, last=False)
    assert (c0, cx, ce) == pytest.approx((math.sqrt(0.8) * 0.375 / 0.5, math.sqrt(0.625) * 0.2 / 0.5, 0.0))
    assert sig == pytest.approx(math.sqrt(0.375 * 0.2 / 0.5))
    assert StepRule("ddpm_large").coefficients(0.5, 0.8, False)[3] == pytest.approx(math.sqrt(0.375))
    c0, cx, ce, sig = StepRule("ddim", 0.0).coefficients(0.5, 0.8, False)
    assert (c0, cx, ce, sig) == pytest.approx((math.sqrt(0.8), 0.0, math.sqrt(0.2), 0.0))
    assert StepRule("ddpm").coefficients(0.5, 1.0, last=True) == pytest.approx((1.0, 0.0, 0.0, 0.0))


def test_grids_and_bad_rules():
    assert timestep_grid(1000, 1000) == list(range(999, -1, -1))
    assert timestep_grid(1000, 10)[0] == 999 and timestep_grid(1000, 10)[-1] == 0
    assert len(set(timestep_grid(100, 99))) == 99
    assert timestep_grid(50, 1) == [49]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=r"sampling steps must be an integer in \[1, timesteps=1000\]"):
            timestep_grid(1000, bad)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        StepRule("euler")
    with pytest.raises(ValueError, match="eta must be in"):
        StepRule("ddim", 1.5)
    assert set(STEP_RULES) == {"ddpm", "ddpm_large", "ddim"}


def test_clipping_keeps_x0_in_range_and_chunks_are_order_free():
    p = GaussianProcess(get_beta_schedule("linear", 50))
    wild = lambda x, t: 10 * torch.ones_like(x)  # noqa: E731  predicts x0 far below -1
    out = sample_loop(wild, p, (4, 1, 2, 2), 5, StepRule("ddim"), torch.Generator().manual_seed(0), clip_denoised=True)
    assert out.min().item() >= -1.0 and out.max().item() <= 1.0
    model = GaussianOracle(p.alpha_bar64, "pred_noise")
    full = sample_images(model, p, 10, (1, 2, 2), 5, StepRule("ddpm"), seed=3, batch_size=4)
    part = sample_images(model, p, 10, (1, 2, 2), 5, StepRule("ddpm"), seed=3, batch_size=4, chunks=[2, 1])
    assert full.shape == (10, 1, 2, 2)
    assert torch.equal(part, torch.cat([full[8:], full[4:8]]))
