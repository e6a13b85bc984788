"""Learned variances and L_hybrid (issue 27 item 3; Nichol & Dhariwal 2021 eq. 15 and Sec. 3.1)."""
import copy
import math

import numpy as np
import pytest
import torch
import yaml

from benchmarks.golden_learned_range import CASES, SHAPE, setup
from ddpm import LearnedGaussianDiffusion, Unet
from ddpm.app.config import ConfigError, params_from_dict
from ddpm.diffusion.likelihood import LN2, vb_terms_from_output
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.samplers import StepRule, sample_loop
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.training.checkpoint import build, load_model, model_metadata, save_model, spec_from_params

GOLDEN = np.load(__import__("pathlib").Path(__file__).parent / "data" / "golden_learned_range.npz")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['name']}-{c['objective']}-{c['spacing']}-{c['steps']}")
def test_ddpm_rule_with_learned_sigma_matches_diffusers_learned_range(case):
    """Same betas, toy model with 2C outputs, x_T and generator as diffusers 0.42.1's DDPMScheduler(variance_type=
    "learned_range") (benchmarks/golden_learned_range.py wrote the values): full and respaced grids."""
    process, model, rule, x_T, seed = setup(case)
    ours = sample_loop(model, process, SHAPE, case["steps"], rule, torch.Generator().manual_seed(seed), case["clip"],
                       x_T=x_T)
    # measured max |difference| 2e-6 .. 2.8e-5 (diffusers steps in float32 tables; 1000 steps accumulate the most)
    np.testing.assert_allclose(ours.numpy(), GOLDEN[case["name"]], rtol=0, atol=5e-5)


def test_learned_sigma_is_eq_15_of_the_respaced_chain():
    """Written out by hand for one respaced step (alpha_bar 0.5 -> 0.8): beta = 1 - 0.5 / 0.8 = 0.375,
    beta_tilde = beta (1 - 0.8) / (1 - 0.5) = 0.15; v = -1, 0, 1 give beta_tilde, sqrt(beta beta_tilde), beta,
    and the ends are the fixed rules' sigmas (ddpm: beta_tilde, ddpm_large: beta)."""
    rule = StepRule("ddpm")
    got = rule.learned_sigma(0.5, 0.8, torch.tensor([-1.0, 0.0, 1.0])) ** 2
    torch.testing.assert_close(got, torch.tensor([0.15, math.sqrt(0.375 * 0.15), 0.375]))
    assert got[0].item() == pytest.approx(StepRule("ddpm").coefficients(0.5, 0.8, False).sigma ** 2)
    assert got[2].item() == pytest.approx(StepRule("ddpm_large").coefficients(0.5, 0.8, False).sigma ** 2)


def _learned_model(v):
    """[a fixed eps prediction, v]: a model whose learned Sigma is pinned at one end of the range."""
    def model(x, t):
        return torch.cat([0.3 * torch.sin(x), torch.full_like(x, v)], 1)
    return model


@pytest.mark.parametrize("v, fixed_rule", [(-1.0, "ddpm"), (1.0, "ddpm_large")])
@pytest.mark.parametrize("steps", [10, 20])
def test_learned_sigma_at_the_range_ends_samples_as_the_fixed_rules(v, fixed_rule, steps):
    betas = get_beta_schedule("linear", 20)
    learned, fixed = GaussianProcess(betas, variance="learned_range"), GaussianProcess(betas)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sample_loop(_learned_model(v), learned, (3, 1, 4, 4), steps, StepRule("ddpm"),
                    torch.Generator().manual_seed(1), x_T=x_T)
    b = sample_loop(lambda x, t: 0.3 * torch.sin(x), fixed, (3, 1, 4, 4), steps, StepRule(fixed_rule),
                    torch.Generator().manual_seed(1), x_T=x_T)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = sample_loop(_learned_model(-v), learned, (3, 1, 4, 4), steps, StepRule("ddpm"),
                    torch.Generator().manual_seed(1), x_T=x_T)
    assert (a - c).abs().max() > 1e-3  # Sigma is used


@pytest.mark.parametrize("rule", [StepRule("ddim"), StepRule("ddim", 0.5), StepRule("dpmpp_2m"), StepRule("dpmpp_2m_sde")])
def test_other_rules_ignore_the_learned_sigma(rule):
    betas = get_beta_schedule("cosine", 20)
    learned, fixed = GaussianProcess(betas, variance="learned_range"), GaussianProcess(betas)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    runs = [sample_loop(m, p, (3, 1, 4, 4), 10, rule, torch.Generator().manual_seed(1), x_T=x_T)
            for m, p in ((_learned_model(-0.7), learned), (_learned_model(0.9), learned),
                         (lambda x, t: 0.3 * torch.sin(x), fixed))]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    torch.testing.assert_close(runs[0], runs[2], rtol=0, atol=0)


def test_hybrid_loss_is_simple_plus_lambda_T_vlb_and_stops_the_mean_gradient():
    """L_hybrid = L_simple + 0.001 T L_t (bits/dim); L_vlb reaches only the variance channels (Sec. 3.1)."""
    T, B = 50, 6
    process = GaussianProcess(get_beta_schedule("linear", T), variance="learned_range")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(B, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(B, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 7, 20, 49, 30])
    out = torch.randn(B, 2, 4, 4, generator=g).clamp(-1, 1).requires_grad_()
    loss = process.losses(lambda x, tt: out, x0, t, noise)
    simple = ((out[:, :1] - noise) ** 2).flatten(1).mean(1)
    x_t = process.q_sample(x0, t, noise)
    vlb = vb_terms_from_output(process, out.detach(), x0, x_t, t, 2 / 255, clip_denoised=False) / (LN2 * 16)
    torch.testing.assert_close(loss.detach(), simple.detach() + 0.001 * T * vlb.float(), rtol=1e-5, atol=1e-6)
    loss.sum().backward()
    mean_grad = torch.autograd.grad(simple.sum(), out)[0][:, :1]
    torch.testing.assert_close(out.grad[:, :1], mean_grad)  # the vb term adds nothing to the mean's gradient
    assert out.grad[:, 1:].abs().sum() > 0  # ... and trains the variance


def test_config_variance_key(repo_root):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert raw["diffusion"]["variance"] == "fixed_small" and params_from_dict(raw).diffusion.variance == "fixed_small"
    bad = copy.deepcopy(raw)
    bad["diffusion"]["variance"] = "learned"
    with pytest.raises(ConfigError, match="diffusion.variance: got 'learned'; allowed: fixed_small, fixed_large, "
                                          "learned_range"):
        params_from_dict(bad)
    from ddpm.app import names
    from ddpm.diffusion import process as diffusion
    assert names.VARIANCES == diffusion.VARIANCES  # config's vocabulary is the process's
    with pytest.raises(ValueError, match="unknown variance 'small'"):
        GaussianProcess(get_beta_schedule("linear", 10), variance="small")


def test_descriptions_record_the_variance_and_old_files_load_as_fixed_small(repo_root, tmp_path):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["diffusion"]["variance"] = "learned_range"
    raw["model"].update(dim=8, dim_mults=[1], attn_heads=1, attn_dim_head=8)
    spec = spec_from_params(params_from_dict(raw), "cosine", (1, 8, 8), 0, levels=17)
    model, process = build(spec)
    assert process.variance == "learned_range" and model.out_dim == 2
    # L_vlb's decoder bins are the data's (digits: 17 levels, 2/16 wide), recorded in the description
    assert spec["diffusion"]["decoder_bin_width"] == process.decoder_bin_width == 2 / 16
    assert model(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)).shape == (2, 2, 8, 8)
    meta = model_metadata(model, process, "cosine", (1, 8, 8))
    assert meta["diffusion"]["variance"] == "learned_range"
    save_model(tmp_path / "m.pt", meta, model, 3)
    assert load_model(tmp_path / "m.pt")[1].variance == "learned_range"
    assert load_model(tmp_path / "m.pt")[1].decoder_bin_width == 2 / 16
    bad = torch.load(tmp_path / "m.pt", weights_only=True)
    bad["diffusion"]["decoder_bin_width"] = 5.0
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"diffusion.decoder_bin_width: got 5.0; allowed: a number in \(0, 2\]"):
        load_model(tmp_path / "bad.pt")
    # the bins enter L_hybrid's t = 0 term: the same output scores differently under 2/16 and 2/255 bins
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    out = torch.randn(2, 2, 8, 8)
    coarse = process._vlb_bits(out, x0, x0, torch.zeros(2, dtype=torch.long))
    fine = process.to("cpu")
    fine.decoder_bin_width = 2 / 255
    assert not torch.allclose(coarse, fine._vlb_bits(out, x0, x0, torch.zeros(2, dtype=torch.long)))
    old = torch.load(tmp_path / "m.pt", weights_only=True)
    del old["diffusion"]["variance"]
    old["model_config"]["out_dim"] = 1
    old["ema"] = Unet(**old["model_config"]).state_dict()
    torch.save(old, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt")[1].variance == "fixed_small"


def test_learned_gaussian_diffusion_api():
    """denoising-diffusion-pytorch's ``LearnedGaussianDiffusion(model, vb_loss_weight=0.001, image_size=...)``."""
    torch.manual_seed(0)
    unet = Unet(dim=8, dim_mults=(1,), channels=1, attn_heads=1, attn_dim_head=8, learned_variance=True)
    diffusion = LearnedGaussianDiffusion(unet, vb_loss_weight=0.01, image_size=8, timesteps=20)
    assert diffusion.process.variance == "learned_range" and diffusion.process.vb_loss_weight == 0.01
    loss = diffusion(torch.rand(4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    img = diffusion.sample(2, generator=torch.Generator().manual_seed(0))
    assert img.shape == (2, 1, 8, 8) and torch.isfinite(img).all()
    assert diffusion.metadata()["diffusion"]["variance"] == "learned_range"
    with pytest.raises(ValueError, match="out_dim = 2 \\* channels = 2, got out_dim=1"):
        LearnedGaussianDiffusion(Unet(dim=8, dim_mults=(1,), channels=1), image_size=8, timesteps=20)
