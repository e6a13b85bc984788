"""The two snippets of denoising-diffusion-pytorch's README with only the import changed.

Reduced sizes, because the full ones take minutes on a 2-core CPU: snippet 1 at 32x32 with dim=16
(full: 128x128, dim=64, 1000 sampling steps); snippet 2 at 16x16 with dim=8, 4 training steps, a
folder of 6 images, and a randomly initialised InceptionV3 state dict standing in for the FID weights.
"""
import numpy as np
import pytest
import torch

from ddpm import GaussianDiffusion, Trainer, Unet


def test_snippet_1_reduced():
    model = Unet(dim=16, dim_mults=(1, 2, 4, 8), flash_attn=True)
    diffusion = GaussianDiffusion(model, image_size=32, timesteps=1000, sampling_timesteps=10)
    training_images = torch.rand(8, 3, 32, 32)  # images are normalized from 0 to 1
    loss = diffusion(training_images)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    sampled_images = diffusion.sample(batch_size=4)
    assert sampled_images.shape == (4, 3, 32, 32)
    assert sampled_images.min() >= 0 and sampled_images.max() <= 1


def test_full_ddpm_sampling_when_sampling_timesteps_equal_timesteps():
    model = Unet(dim=8, dim_mults=(1, 2), channels=1)
    d = GaussianDiffusion(model, image_size=8, timesteps=20)
    assert not d.is_ddim_sampling and d.rule.name == "ddpm"
    d2 = GaussianDiffusion(model, image_size=8, timesteps=20, sampling_timesteps=5, ddim_sampling_eta=0.0,
                           beta_schedule="cosine", objective="pred_v")
    assert d2.is_ddim_sampling and d2.rule.name == "ddim"
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(d2.sample(2, generator=g()), d2.sample(2, generator=g()))
    assert d.sample(3).shape == (3, 1, 8, 8)


def test_bad_arguments_are_clear():
    model = Unet(dim=8, dim_mults=(1, 2, 4, 8), channels=1)
    with pytest.raises(ValueError, match="image_size 12"):
        GaussianDiffusion(model, image_size=12)
    with pytest.raises(ValueError, match="unknown beta schedule 'sigmoidal'"):
        GaussianDiffusion(model, image_size=16, beta_schedule="sigmoidal")
    with pytest.raises(ValueError, match="sampling_timesteps must be in"):
        GaussianDiffusion(model, image_size=16, timesteps=10, sampling_timesteps=20)
    with pytest.raises(ValueError, match="channels"):
        GaussianDiffusion(torch.nn.Conv2d(1, 1, 1), image_size=16)
    d = GaussianDiffusion(model, image_size=16, timesteps=10)
    with pytest.raises(ValueError, match=r"expected images \[B, 1, 16, 16\]"):
        d(torch.rand(2, 3, 16, 16))


def test_mixed_precision_type_fp16_is_refused_not_ignored(tmp_path, png_folder):
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=16, timesteps=10)
    with pytest.raises(ValueError, match="mixed_precision_type: got 'fp16'; allowed: 'bf16'"):
        Trainer(diffusion, str(png_folder(2, (16, 16, 3))), amp=True, mixed_precision_type="fp16",
                calculate_fid=False, results_folder=str(tmp_path / "r"))


def test_any_module_with_forward_x_t_and_channels():
    class Tiny(torch.nn.Module):
        channels = 1

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x) + t.float().view(-1, 1, 1, 1) / 1000

    d = GaussianDiffusion(Tiny(), image_size=4, timesteps=10)
    d(torch.rand(2, 1, 4, 4)).backward()
    assert d.sample(batch_size=2).shape == (2, 1, 4, 4)


@pytest.fixture
def image_folder(png_folder):
    return png_folder(6, (16, 16, 3))


@pytest.fixture
def fake_inception(tmp_path, monkeypatch):
    """A randomly initialised pytorch-fid InceptionV3 state dict in the torch hub cache (no download here)."""
    from ddpm.metrics.features import FID_WEIGHTS_FILENAME, fid_inception_v3_architecture

    home = tmp_path / "torch_home"
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(fid_inception_v3_architecture().state_dict(), ckpt / FID_WEIGHTS_FILENAME)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return ckpt / FID_WEIGHTS_FILENAME


def test_snippet_2_reduced(image_folder, fake_inception, tmp_path):
    torch.set_num_threads(1)
    model = Unet(dim=8, dim_mults=(1, 2, 4, 8), flash_attn=True)
    diffusion = GaussianDiffusion(model, image_size=16, timesteps=1000, sampling_timesteps=5)
    results = tmp_path / "results"
    trainer = Trainer(
        diffusion,
        str(image_folder),
        train_batch_size=4,
        train_lr=8e-5,
        train_num_steps=4,  # total training steps
        gradient_accumulate_every=2,  # gradient accumulation steps
        ema_decay=0.995,  # exponential moving average decay
        amp=True,  # turn on mixed precision
        calculate_fid=True,  # whether to calculate fid during training
        results_folder=str(results),
        save_and_sample_every=2,
        num_samples=4,
        num_fid_samples=6,
        augment_horizontal_flip=True,
        convert_image_to="RGB",
        max_grad_norm=1.0,
        progress=False,
    )
    trainer.train()
    assert sorted(p.name for p in results.glob("ckpt-*.pt")) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert (results / "sample-1.png").is_file() and (results / "sample-2.png").is_file()
    assert [r["step"] for r in trainer.fid_history] == [2, 4]
    assert all(np.isfinite(r["fid"]) and r["fid"] >= 0 for r in trainer.fid_history)
    # a new Trainer on the same folder resumes from the last checkpoint instead of starting over
    more = Trainer(diffusion, str(image_folder), train_batch_size=4, train_num_steps=6, gradient_accumulate_every=2,
                   calculate_fid=False, results_folder=str(results), save_and_sample_every=2, num_samples=4,
                   progress=False)
    more.train()
    assert more.result.resumed_from == 4 and more.result.step == 6


def test_calculate_fid_without_weights_says_what_is_missing(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=16, timesteps=10)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        Trainer(diffusion, str(image_folder), calculate_fid=True, results_folder=str(tmp_path / "r"))


def test_trainer_reads_grayscale_for_one_channel_models(image_folder, tmp_path):
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2), channels=1), image_size=16, timesteps=10)
    t = Trainer(diffusion, str(image_folder), calculate_fid=False, results_folder=str(tmp_path / "r"))
    assert t.data.images.shape == (6, 1, 16, 16)
    with pytest.raises(ValueError, match="convert_image_to='RGB' gives 3 channels but the model has 1"):
        Trainer(diffusion, str(image_folder), convert_image_to="RGB", calculate_fid=False)
