import math

import pytest
import torch

from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.schedules import get_beta_schedule


def make(objective="pred_noise", T=1000, gamma=None, schedule="linear"):
    return GaussianProcess(get_beta_schedule(schedule, T), objective=objective, min_snr_gamma=gamma)


def test_q_sample_mean_and_variance():
    p = make()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 2, 2), 0.5)
    for t_ in (0, 250, 999):
        t = torch.full((x0.shape[0],), t_)
        xt = p.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        ab = p.alpha_bar64[t_].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.5, abs=4 * math.sqrt((1 - ab) / xt.numel()) + 1e-6)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.03, abs=1e-6)


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
def test_loss_is_zero_for_the_oracle_and_targets_match(objective):
    p = make(objective)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 1, 4, 4, generator=g)
    noise = torch.randn(8, 1, 4, 4, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    target = p.target(x0, noise, t)
    oracle = lambda x, tt: target  # noqa: E731
    assert p.losses(oracle, x0, t, noise).abs().max().item() < 1e-10
    wrong = lambda x, tt: target + 1.0  # noqa: E731
    torch.testing.assert_close(p.losses(wrong, x0, t, noise), torch.ones(8))


def test_min_snr_gamma_weights():
    t = torch.tensor([0, 500, 999])
    for objective in ("pred_noise", "pred_x0", "pred_v"):
        p = make(objective, gamma=5.0)
        snr = p.snr[t]
        w = p.loss_weight(t)
        x0_weight = {"pred_noise": w * snr, "pred_x0": w, "pred_v": w * (snr + 1)}[objective]
        torch.testing.assert_close(x0_weight, snr.clamp(max=5.0))  # Hang et al.: min(SNR, gamma) on x0
    assert torch.equal(make().loss_weight(t), torch.ones(3))


def test_bad_objective_and_ztsnr_with_pred_noise():
    with pytest.raises(ValueError, match="unknown objective 'pred_eps'.*pred_noise, pred_x0, pred_v"):
        make("pred_eps")
    with pytest.raises(ValueError, match="zero terminal SNR"):
        GaussianProcess(get_beta_schedule("linear", 100, zero_terminal_snr=True), "pred_noise")
    GaussianProcess(get_beta_schedule("linear", 100, zero_terminal_snr=True), "pred_v")
