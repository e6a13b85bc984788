"""The variational bound against closed forms (issue 27 item 1): Gaussian KL, the decoder's bins, the vb terms
of the exact optimal denoiser for Gaussian data, and a whole bound on 1-d data whose true NLL is known."""
import math

import pytest
import torch

from ddpm.diffusion import likelihood as L
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.schedules import get_beta_schedule

MU, S = 0.1, 0.3  # the 1-d data: N(MU, S^2), discretized on [-1, 1] where a test says so


def _process(T=100, variance="fixed_small", objective="pred_noise"):
    return GaussianProcess(get_beta_schedule("linear", T), objective, variance=variance)


def test_normal_kl_matches_torch_closed_form():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(L.normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-12)
    assert L.normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


def test_bin_width_and_bad_levels():
    assert L.bin_width(17) == 2 / 16 and L.bin_width(256) == 2 / 255
    with pytest.raises(ValueError, match="levels must be an integer >= 2"):
        L.bin_width(1)


@pytest.mark.parametrize("levels", [2, 17, 256])
@pytest.mark.parametrize("mean,log_scale", [(0.0, 0.0), (0.93, -6.0), (-1.3, -2.0), (0.2, 3.0), (1e-3, -9.0)])
def test_decoder_probabilities_sum_to_one(levels, mean, log_scale):
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)
    logp = L.discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), torch.full_like(grid, log_scale),
                                                 L.bin_width(levels))
    assert torch.isfinite(logp).all()
    assert abs(logp.exp().sum().item() - 1) < 1e-9
    # an interior bin is the integral of the density over the bin
    k = levels // 2
    if 0 < k < levels - 1:
        n = torch.distributions.Normal(mean, math.exp(log_scale))
        h = L.bin_width(levels) / 2
        ref = (n.cdf(grid[k] + h) - n.cdf(grid[k] - h)).item()
        assert logp[k].exp().item() == pytest.approx(ref, rel=1e-6, abs=1e-15)


def _gaussian_posterior(ab):
    """E[x0 | x_t] = MU + gain (x_t - sqrt(ab) MU) and Var[x0 | x_t] for x0 ~ N(MU, S^2)."""
    gain = S**2 * ab.sqrt() / (ab * S**2 + 1 - ab)
    return gain, S**2 * (1 - ab) / (ab * S**2 + 1 - ab)


def optimal_eps_gaussian(process):
    """The exact eps-predictor for x0 ~ N(MU, S^2): eps = (x_t - sqrt(ab) E[x0|x_t]) / sqrt(1 - ab)."""
    def model(x_t, t):
        ab = process.alpha_bar64[t].reshape(-1, *[1] * (x_t.ndim - 1))
        gain, _ = _gaussian_posterior(ab)
        x0 = MU + gain * (x_t.double() - ab.sqrt() * MU)
        return ((x_t.double() - ab.sqrt() * x0) / (1 - ab).sqrt()).float()
    return model


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_vb_terms_of_the_optimal_model_equal_the_analytic_value(variance):
    """E KL(q(x_{t-1}|x_t,x0) || p) = 0.5 (r - 1 - log r) + 0.5 c0^2 Var[x0|x_t] / sigma^2, r = beta_tilde / sigma^2,
    with sigma^2 = beta_tilde (fixed_small) or beta_t (fixed_large); c0 of Ho et al. eq. 7."""
    proc, B = _process(100, variance), 20000
    g = torch.Generator().manual_seed(1)
    x0 = (MU + S * torch.randn(B, 1, generator=g, dtype=torch.float64)).float()
    ab, betas = proc.alpha_bar64, proc.betas64
    for t in (1, 5, 40, 99):
        ab_prev = ab[t - 1]
        c0 = betas[t] * ab_prev.sqrt() / (1 - ab[t])
        post = betas[t] * (1 - ab_prev) / (1 - ab[t])
        var = post if variance == "fixed_small" else betas[t]
        _, cond_var = _gaussian_posterior(ab[t])
        r = post / var
        expected = 0.5 * (r - 1 - math.log(r)) + 0.5 * c0**2 * cond_var / var
        got = L.vb_terms(optimal_eps_gaussian(proc), proc, x0, torch.full((B,), t), bin_width=2 / 255,
                         generator=g, clip_denoised=False)
        se = got.std().item() / math.sqrt(B)
        assert abs(got.mean().item() - expected.item()) < 4 * se + 1e-9, (t, got.mean().item(), expected.item())


def _discretized_data(levels, n, g):
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)
    logp = L.discretized_gaussian_log_likelihood(grid, torch.full_like(grid, MU), torch.full_like(grid, math.log(S)),
                                                 L.bin_width(levels))
    x0 = grid[torch.multinomial(logp.exp(), n, replacement=True, generator=g)]
    return grid, logp, x0.float().reshape(n, 1)


def optimal_eps_discrete(process, grid, logp):
    """The exact eps-predictor for data on ``grid`` with log-probabilities ``logp``: E[x0|x_t] is the posterior mean
    over the grid points, weights P(k) N(x_t; sqrt(ab) x_k, 1 - ab)."""
    def model(x_t, t):
        ab = process.alpha_bar64[t].reshape(-1, 1)
        x = x_t.double().reshape(-1, 1)
        x0 = (torch.softmax(logp - (x - ab.sqrt() * grid) ** 2 / (2 * (1 - ab)), 1) * grid).sum(1, keepdim=True)
        return ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).reshape(x_t.shape).float()
    return model


def test_whole_bound_of_the_optimal_model_is_close_to_the_true_nll_and_not_below():
    """17-level 1-d data (the digits' quantization), T = 1000, the exact optimal denoiser: the bound's mean over
    images is >= the data's entropy (the true NLL) and within 10% of it (measured: 2.48 vs 2.30 nats at n=2000)."""
    g = torch.Generator().manual_seed(0)
    grid, logp, x0 = _discretized_data(17, 600, g)
    entropy = -(logp.exp() * logp).sum().item()
    proc = _process(1000)
    out = L.bound_exact(optimal_eps_discrete(proc, grid, logp), proc, x0, bin_width=L.bin_width(17), generator=g,
                        clip_denoised=False)
    assert out["terms"].shape == (600, 1000) and out["prior"].shape == (600,)
    total = out["prior"] + out["terms"].sum(1)
    torch.testing.assert_close(out["bpd"], total / math.log(2))
    se = total.std().item() / math.sqrt(len(total))
    assert total.mean().item() > entropy - 3 * se
    assert total.mean().item() < 1.10 * entropy
    assert (out["prior"] < 1e-4).all()  # alpha_bar_T ~ 4e-5 at the linear schedule's T = 1000


def test_prior_kl_closed_form():
    proc = _process(10)
    x0 = torch.tensor([[0.5, -1.0]])
    ab = proc.alpha_bar64[-1].item()
    per_dim = [0.5 * (ab * v**2 + (1 - ab) - 1 - math.log(1 - ab)) for v in (0.5, -1.0)]
    assert L.prior_kl(proc, x0).item() == pytest.approx(sum(per_dim), rel=1e-12)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_p_mean_variance_objectives_agree(objective):
    """The three parametrizations of the same exact prediction give the same reverse Gaussian."""
    proc_eps, proc = _process(50), _process(50, objective=objective)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, 50, (8,), generator=g)
    x_t = proc.q_sample(x0.float(), t, eps.float()).double()
    ab = proc.alpha_bar64[t].reshape(-1, 1, 1, 1)
    target = {"pred_noise": eps, "pred_x0": x0, "pred_v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[objective]
    m, lv, px0 = L.p_mean_variance(lambda x, tt: target, proc, x_t, t, clip_denoised=False)
    m_ref, lv_ref, _ = L.p_mean_variance(lambda x, tt: eps, proc_eps, x_t, t, clip_denoised=False)
    torch.testing.assert_close(px0, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lv, lv_ref)


def test_learned_range_interpolates_log_variances():
    """Nichol & Dhariwal eq. 15: log Sigma = v log beta_t + (1 - v) log beta_tilde_t, v = (o + 1) / 2; t = 0 takes
    beta_tilde_1 (improved-diffusion's clipped posterior log variance)."""
    proc = _process(20, "learned_range")
    betas, ab = proc.betas64, proc.alpha_bar64
    post = betas[1:] * (1 - ab[:-1]) / (1 - ab[1:])
    t = torch.tensor([0, 3, 19])
    o = torch.tensor([-1.0, 0.2, 1.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
    out = torch.cat([torch.zeros(3, 1, 2, 2), o], 1)
    _, lv, _ = L.p_mean_variance(lambda x, tt: out, proc, torch.zeros(3, 1, 2, 2), t)
    small = torch.log(torch.stack([post[0], post[2], post[18]]))
    v = torch.tensor([0.0, 0.6, 1.0], dtype=torch.float64)
    expected = v * torch.log(betas[t]) + (1 - v) * small
    torch.testing.assert_close(lv[:, 0, 0, 0], expected)


def test_vb_terms_needs_explicit_randomness():
    proc = _process(10)
    with pytest.raises(ValueError, match="noise= or generator="):
        L.vb_terms(lambda x, t: x, proc, torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), bin_width=0.1)
