import math

import pytest
import torch

from ddpm.diffusion.schedules import SCHEDULES, get_beta_schedule, rescale_zero_terminal_snr


def test_linear_alpha_bar_at_1000_matches_closed_form():
    betas = get_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    expected = 1.0
    for i in range(1000):  # alpha_bar_T = prod (1 - beta_i), beta_i = 1e-4 + i (0.02 - 1e-4) / 999
        expected *= 1 - (1e-4 + i * (0.02 - 1e-4) / 999)
    ab = torch.cumprod(1 - betas, 0)
    assert ab[-1].item() == pytest.approx(expected, rel=1e-10)
    assert ab[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # the value quoted in improved-diffusion


def test_linear_is_rescaled_by_1000_over_T():
    b = get_beta_schedule("linear", 500)
    assert b[0].item() == pytest.approx(2e-4) and b[-1].item() == pytest.approx(0.04)
    ab_end = torch.cumprod(1 - b, 0)[-1].item()
    assert ab_end < 1e-3  # still close to pure noise at T = 500


def test_cosine_closed_form():
    T, s = 1000, 0.008
    betas = get_beta_schedule("cosine", T)
    ab = torch.cumprod(1 - betas, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert ab[0].item() == pytest.approx(f(1) / f(0), rel=1e-9)
    assert ab[0].item() > 0.9999
    assert ab[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
    assert betas.max().item() <= 0.999 and betas.min().item() > 0


def test_sigmoid_and_quadratic_are_valid():
    for name in ("sigmoid", "quadratic"):
        b = get_beta_schedule(name, 200)
        assert b.shape == (200,) and bool((b > 0).all()) and bool((b <= 0.999).all())
        ab = torch.cumprod(1 - b, 0)
        assert bool((ab[1:] < ab[:-1]).all())
    q = get_beta_schedule("quadratic", 1000)
    assert q[0].item() == pytest.approx(1e-4) and q[-1].item() == pytest.approx(0.02)
    assert q[500].item() == pytest.approx((1e-2 + 500 / 999 * (0.02**0.5 - 1e-2)) ** 2)


def test_zero_terminal_snr():
    for name in SCHEDULES:
        b0 = get_beta_schedule(name, 300)
        b = get_beta_schedule(name, 300, zero_terminal_snr=True)
        ab0, ab = torch.cumprod(1 - b0, 0), torch.cumprod(1 - b, 0)
        assert ab[-1].item() == pytest.approx(0.0, abs=1e-12)
        assert ab[0].item() == pytest.approx(ab0[0].item(), rel=1e-9)
    before = b0.clone()
    rescale_zero_terminal_snr(b0)
    assert torch.equal(before, b0)  # pure: input untouched


def test_unknown_schedule_names_known_ones():
    with pytest.raises(ValueError, match="unknown beta schedule 'lineer'.*linear, cosine, sigmoid, quadratic"):
        get_beta_schedule("lineer", 10)
    with pytest.raises(ValueError, match="timesteps"):
        get_beta_schedule("linear", 0)


def test_short_linear_schedules_keep_a_positive_alpha_bar():
    for T in (1, 5, 20):
        ab = torch.cumprod(1 - get_beta_schedule("linear", T), 0)
        assert ab[-1].item() > 0 and get_beta_schedule("linear", T).max().item() <= 0.999
