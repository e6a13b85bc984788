"""The seed-compatible facade: ``Unet``, ``GaussianDiffusion`` and ``Trainer`` with the API of
denoising-diffusion-pytorch's README, as thin wrappers over the schedules, process, samplers and
training loop of this package.

Defaults follow the DDPM paper, not denoising-diffusion-pytorch: objective ``pred_noise`` (not
``pred_v``), schedule ``linear`` (not ``sigmoid``), no horizontal flip, EMA updated every step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ddpm.training import distributed as dist
from ddpm import limits
from ddpm.data.convert import model_to_uint8, save_image_grid
from ddpm.data.datasets import load_dataset
from ddpm.training.checkpoint import build_process, checkpoints_by_run, model_metadata
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.samplers import StepRule, sample_images, sample_loop
from ddpm.training.loop import TrainSettings, train
from ddpm.nn.unet import Unet

log = logging.getLogger(__name__)
__all__ = ["Unet", "GaussianDiffusion", "LearnedGaussianDiffusion", "Trainer"]


class GaussianDiffusion(nn.Module):
    """``GaussianDiffusion(model, image_size=128, timesteps=1000, sampling_timesteps=250)``.

    ``model``: any module with ``forward(x, t)`` (t: integer timesteps in [0, T)) and an attribute
    ``channels``. ``diffusion(images)`` takes images in [0, 1], [B, C, H, W], and returns the scalar
    training loss; ``diffusion.sample(batch_size)`` returns images in [0, 1]. ``sampling_timesteps``
    below ``timesteps`` samples with DDIM (eta = ``ddim_sampling_eta``), as in the seed; equal, with
    DDPM ancestral sampling (posterior variance). ``sampler`` chooses the step rule instead (``ddpm``,
    ``ddpm_large``, ``ddim``, ``dpmpp_2m``, ``dpmpp_2m_sde``), ``spacing`` the timestep grid
    (``linspace``, ``trailing``, ``leading``: diffusers' ``timestep_spacing``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        image_size: int | Sequence[int],
        timesteps: int = 1000,
        sampling_timesteps: Optional[int] = None,
        objective: str = "pred_noise",
        beta_schedule: str = "linear",
        ddim_sampling_eta: float = 0.0,
        auto_normalize: bool = True,
        min_snr_loss_weight: bool = False,
        min_snr_gamma: float = 5.0,
        zero_terminal_snr: bool = False,
        clip_denoised: bool = True,
        sampler: Optional[str] = None,
        spacing: str = "linspace",
        variance: str = "fixed_small",
        vb_loss_weight: float = 0.001,
    ) -> None:
        super().__init__()
        if not hasattr(model, "channels"):
            raise ValueError(f"model {type(model).__name__} needs an attribute `channels` (number of image channels)")
        out_dim = getattr(model, "out_dim", None)
        if variance == "learned_range" and out_dim is not None and out_dim != 2 * int(model.channels):
            raise ValueError(f"variance 'learned_range' needs a model with out_dim = 2 * channels = {2 * model.channels}, "
                             f"got out_dim={out_dim}; allowed: Unet(..., learned_variance=True)")
        self.model = model
        self.channels = int(model.channels)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if hasattr(model, "check_image_size"):
            model.check_image_size(image_size)
        self.beta_schedule = beta_schedule
        self.zero_terminal_snr = zero_terminal_snr
        self.process = build_process({"schedule": beta_schedule, "timesteps": timesteps, "objective": objective,
                                      "zero_terminal_snr": zero_terminal_snr,
                                      "min_snr_gamma": min_snr_gamma if min_snr_loss_weight else None,
                                      "variance": variance}, source="GaussianDiffusion")
        pr = self.process  # lambda of L_hybrid is a training setting, not part of the model's description
        self.process = GaussianProcess(pr.betas64, pr.objective, pr.min_snr_gamma, pr.device, pr.variance, vb_loss_weight,
                                       pr.decoder_bin_width)
        self.num_timesteps = timesteps
        self.sampling_timesteps = timesteps if sampling_timesteps is None else sampling_timesteps
        if not 1 <= self.sampling_timesteps <= timesteps:
            raise ValueError(f"sampling_timesteps must be in [1, timesteps={timesteps}], got {sampling_timesteps!r}")
        self.is_ddim_sampling = self.sampling_timesteps < timesteps if sampler is None else sampler == "ddim"
        name = sampler or ("ddim" if self.is_ddim_sampling else "ddpm")
        self.rule = StepRule(name, ddim_sampling_eta if name == "ddim" else 0.0, spacing)
        self.rule.grid(timesteps, self.sampling_timesteps)  # a grid that cannot be built fails here, not at sampling
        self.objective = objective
        self.auto_normalize = auto_normalize
        self.clip_denoised = clip_denoised

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _process(self) -> GaussianProcess:
        self.process = self.process.to(self.device)
        return self.process

    def forward(self, img: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The simple loss (Ho et al. eq. 14) of a batch of images in [0, 1] (or [-1, 1] without auto_normalize)."""
        if img.ndim != 4 or img.shape[1] != self.channels or tuple(img.shape[-2:]) != self.image_size:
            raise ValueError(
                f"expected images [B, {self.channels}, {self.image_size[0]}, {self.image_size[1]}], got {tuple(img.shape)}"
            )
        x0 = img * 2 - 1 if self.auto_normalize else img
        p = self._process()
        t = p.sample_timesteps(len(x0), generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return p.losses(self.model, x0, t, noise).mean()

    @torch.inference_mode()
    def sample(self, batch_size: int = 16, *, generator: Optional[torch.Generator] = None,
               steps: Optional[int] = None, rule: Optional[StepRule] = None) -> torch.Tensor:
        """``batch_size`` images [B, C, H, W] in [0, 1] (or [-1, 1] without auto_normalize)."""
        x = sample_loop(self.model, self._process(), (batch_size, self.channels, *self.image_size),
                        steps or self.sampling_timesteps, rule or self.rule, generator, self.clip_denoised,
                        self.device)
        return (x + 1) / 2 if self.auto_normalize else x

    def metadata(self) -> dict[str, Any]:
        return model_metadata(self.model, self.process, self.beta_schedule, (self.channels, *self.image_size),
                              self.clip_denoised, self.zero_terminal_snr)


class LearnedGaussianDiffusion(GaussianDiffusion):
    """``LearnedGaussianDiffusion(model, vb_loss_weight=0.001, image_size=..., ...)`` (denoising-diffusion-pytorch):
    Sigma learned in the range [beta_tilde_t, beta_t] (Nichol & Dhariwal eq. 15) and the loss L_hybrid =
    L_simple + lambda L_vlb with the mean's gradient stopped in L_vlb (their Sec. 3.1). ``model`` outputs 2C
    channels (``Unet(..., learned_variance=True)``). L_vlb is the paper's sum over t, estimated by T * L_t in
    bits/dim as improved-diffusion's (rescaled) loss: at T = 1000 lambda = 0.001 is improved-diffusion's weight 1;
    denoising-diffusion-pytorch adds lambda * L_t, a 1000 times smaller weight."""

    def __init__(self, model: nn.Module, vb_loss_weight: float = 0.001, *args: Any, **kwargs: Any) -> None:
        if "variance" in kwargs:
            raise ValueError("LearnedGaussianDiffusion takes no variance=; it is learned_range")
        super().__init__(model, *args, variance="learned_range", vb_loss_weight=vb_loss_weight, **kwargs)
        self.vb_loss_weight = vb_loss_weight


def _check_training_memory(diffusion: GaussianDiffusion, micro_batch: int) -> None:
    """Refuse, before the images are read, a Unet whose training at ``micro_batch`` images would not fit the memory
    budget (ddpm.limits: the estimate from its structure; DDPM_MEMORY_BUDGET_GB raises the budget)."""
    if not isinstance(diffusion.model, Unet):
        return
    est = limits.unet_size(diffusion.model.config, diffusion.image_size)
    line = limits.check_budget(limits.training_bytes(est, micro_batch), (
        f"Trainer: the Unet ({limits.count(est['params'])} parameters) at image_size={list(diffusion.image_size)} "
        f"training with train_batch_size={micro_batch}"))
    if line:
        raise ValueError(line)


class Trainer:
    """``Trainer(diffusion, 'path/to/your/images', train_batch_size=32, ...)`` then ``trainer.train()``.

    Reads a folder of images (grayscale when the model has one channel), trains with EMA, writes
    checkpoints (``ckpt-XXXXXXXX.pt``, self-describing) and sample grids (``sample-N.png``) to
    ``results_folder`` every ``save_and_sample_every`` steps, resumes from its newest valid checkpoint,
    and computes FID with pytorch-fid's InceptionV3 when ``calculate_fid`` (the weights file must be
    on disk: see ``ddpm.metrics.features.resolve_inception_weights``).
    ``train_batch_size`` is per micro-step as in the seed: a step sees ``train_batch_size *
    gradient_accumulate_every`` images.

    Launched by torchrun (``torchrun --nproc_per_node 2 script.py``) it trains in DistributedDataParallel
    (gloo on the CPU; NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``) and only rank 0 writes checkpoints,
    sample grids and FID. As with accelerate, ``split_batches=True`` splits that batch over the processes;
    ``False`` gives each process ``train_batch_size`` images per micro-step.

    Resume takes only checkpoints of the same run: ``run_key`` names it; when None it is derived from what
    the weights mean (model class and config, diffusion process, image shape, ``seed`` and the images), so
    a Trainer with another model, process, seed or data never continues from another's checkpoint and
    never prunes it. Training hyper-parameters (steps, lr, EMA, amp) may change between sessions, as in
    the seed, where a new Trainer continued with what it was given. ``save_best_and_latest_only`` is not
    supported (the newest ``keep_checkpoints`` are kept): True raises a ValueError.
    """

    def __init__(
        self,
        diffusion_model: GaussianDiffusion,
        folder: str | Path,
        *,
        train_batch_size: int = 16,
        gradient_accumulate_every: int = 1,
        augment_horizontal_flip: bool = False,
        train_lr: float = 1e-4,
        train_num_steps: int = 100_000,
        ema_update_every: int = 1,
        ema_decay: float = 0.995,
        ema_warmup: int = 10,
        adam_betas: tuple[float, float] = (0.9, 0.99),
        save_and_sample_every: int = 1000,
        num_samples: int = 25,
        results_folder: str | Path = "./results",
        amp: bool = False,
        mixed_precision_type: Optional[str] = None,
        split_batches: bool = True,
        convert_image_to: Optional[str] = None,
        calculate_fid: bool = True,
        inception_block_idx: int = 2048,
        inception_weights: Optional[str | Path] = None,
        max_grad_norm: Optional[float] = 1.0,
        num_fid_samples: int = 50_000,
        save_best_and_latest_only: bool = False,
        keep_checkpoints: int = 3,
        seed: int = 0,
        progress: bool = True,
        run_key: Optional[str] = None,
    ) -> None:
        if save_best_and_latest_only:
            raise ValueError("save_best_and_latest_only=True is not supported: the Trainer keeps the newest "
                             f"keep_checkpoints={keep_checkpoints} checkpoints; pass False (the default)")
        self.diffusion = diffusion_model
        self.folder = Path(folder)
        if convert_image_to not in (None, "L", "RGB"):
            raise ValueError(f"convert_image_to must be None, 'L' or 'RGB', got {convert_image_to!r}")
        want = {"L": 1, "RGB": 3, None: diffusion_model.channels}[convert_image_to]
        if want != diffusion_model.channels:
            raise ValueError(f"convert_image_to={convert_image_to!r} gives {want} channels but the model has "
                             f"{diffusion_model.channels}")
        if inception_block_idx != 2048:
            raise ValueError(f"inception_block_idx: only 2048 (pool3, the FID standard) is supported, got {inception_block_idx}")
        if mixed_precision_type not in (None, "bf16", "no"):  # amp=True autocasts to bf16 (ddpm.training.optim.amp_settings)
            raise ValueError(f"mixed_precision_type: got {mixed_precision_type!r}; allowed: 'bf16' (with amp=True), 'no' "
                             "or None (fp16 is used only by itself, with a grad scaler, on a GPU without bf16)")
        _check_training_memory(diffusion_model, train_batch_size)
        self.data = load_dataset("folder", root=self.folder, image_size=diffusion_model.image_size,
                                 channels=diffusion_model.channels)
        if dist.launched_by_torchrun():  # join the process group; a CUDA model moves to this rank's GPU
            diffusion_model.model.to(dist.init(diffusion_model.device.type))
        per_step = train_batch_size * gradient_accumulate_every * (1 if split_batches else dist.world_size())
        self.results_folder = Path(results_folder)
        self.results_folder.mkdir(parents=True, exist_ok=True)
        self.settings = TrainSettings(
            steps=train_num_steps, batch_size=per_step, lr=train_lr, warmup_steps=0, weight_decay=0.0,
            grad_accum=gradient_accumulate_every, max_grad_norm=max_grad_norm, ema_decay=ema_decay,
            ema_warmup=ema_warmup, ema_every=ema_update_every, adam_betas=tuple(adam_betas),
            amp=bool(amp) and mixed_precision_type != "no", horizontal_flip=augment_horizontal_flip,
            log_every=min(50, save_and_sample_every), checkpoint_every=save_and_sample_every,
            keep_checkpoints=keep_checkpoints, eval_every=save_and_sample_every,
        )
        self.num_samples = num_samples
        self.seed = seed
        self.progress = progress
        self.calculate_fid = calculate_fid
        self.num_fid_samples = min(num_fid_samples, len(self.data))
        self.run_key = run_key if run_key is not None else self._derive_run_key()
        # the FID is computed by rank 0 alone
        self._fid = self._fid_reference(inception_weights) if calculate_fid and dist.is_main() else None
        self.result = None
        self.fid_history: list[dict[str, float]] = []

    def _fid_reference(self, inception_weights: Optional[str | Path]) -> tuple[nn.Module, tuple]:
        """(InceptionV3, statistics of the real images); fails here, before any training, with the paths
        it looked in when the weights are missing."""
        from ddpm.metrics.features import InceptionFeaturizer, extract_features
        from ddpm.metrics.fid import feature_statistics

        featurizer = InceptionFeaturizer(inception_weights)
        real = self.data.images[: self.num_fid_samples]
        return featurizer, feature_statistics(extract_features(featurizer, real, device=self.diffusion.device))

    def _derive_run_key(self) -> str:
        """A hash of what the checkpoint's weights mean: model, process, image shape, seed and the images."""
        meta = {k: v for k, v in self.diffusion.metadata().items() if k != "params"}
        what = json.dumps({"model": meta, "seed": self.seed}, sort_keys=True).encode()
        return "trainer-" + hashlib.sha256(what + self.data.images.tobytes()).hexdigest()[:16]

    @property
    def step(self) -> int:
        own, _ = checkpoints_by_run(self.results_folder, self.run_key)
        return own[0][0] if own else 0

    def _on_eval(self, step: int, ema_model: nn.Module) -> dict[str, float]:
        d = self.diffusion
        g = torch.Generator(device=d.device).manual_seed(self.seed + step)
        x = sample_loop(ema_model, d._process(), (self.num_samples, d.channels, *d.image_size),
                        d.sampling_timesteps, d.rule, g, d.clip_denoised, d.device)
        milestone = step // self.settings.checkpoint_every
        save_image_grid(model_to_uint8(x.cpu()), self.results_folder / f"sample-{milestone}.png",
                        nrow=int(math.sqrt(self.num_samples)) or 1, scale=max(1, 64 // d.image_size[0]))
        row: dict[str, float] = {}
        if self._fid is not None:
            from ddpm.metrics.fid import fid_from_images

            featurizer, (mu, sigma) = self._fid
            x = sample_images(ema_model, d._process(), self.num_fid_samples, (d.channels, *d.image_size),
                              d.sampling_timesteps, d.rule, seed=self.seed + step, batch_size=256,
                              clip_denoised=d.clip_denoised, device=d.device)
            row["fid"] = fid_from_images(featurizer, model_to_uint8(x), mu, sigma, device=str(d.device))
            log.info("step %d: FID %.3f", step, row["fid"])
        return row

    def train(self) -> None:
        d = self.diffusion
        images = torch.from_numpy(self.data.images)
        self.result = train(
            d.model, d.process, images, self.settings, seed=self.seed, device=d.device,
            checkpoint_dir=self.results_folder, metadata=d.metadata(), run_key=self.run_key,
            on_eval=self._on_eval, progress=self.progress,
        )
        self.fid_history = [r for r in self.result.extra.get("eval", []) if "fid" in r]
        # the trained (EMA) weights become the facade's model, as the seed's `trainer.ema.ema_model`
        self.ema_model = self.result.ema
