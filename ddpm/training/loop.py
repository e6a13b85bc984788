"""The training loop: AdamW, EMA, gradient accumulation and clipping, mixed precision, checkpoints, resume.

:class:`TrainLoop` (in the spirit of improved-diffusion's ``TrainLoop``) holds the loop's state as
attributes and does one job per method; :func:`train` runs it. It knows nothing of files other than its
checkpoint folder, nor of MLflow: it reports through callbacks (``on_log`` with the per-step losses,
``on_eval`` with the EMA model). Every random draw comes from generators it owns and checkpoints (data
order, timesteps and noise), plus torch's global RNG for dropout, which is seeded here and saved too, so a
resumed run continues bit for bit on the CPU. The file formats live in ``ddpm.training.checkpoint``; flat
parameters, EMA, warm-up and AMP in ``ddpm.training.optim``.

Under torchrun (``ddpm.training.distributed.init`` called first) the model trains in DistributedDataParallel:
every rank draws the same global data order and takes its shard of each global batch of
``batch_size`` images, draws its own timesteps, noise and dropout (seeds offset by rank), and stores
its RNG states in rank 0's checkpoints; only rank 0 calls ``on_log``/``on_eval``, writes checkpoints and
reads them on resume, sending their contents to the other ranks (other nodes need not see its folder).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ddpm.training import distributed as dist
from ddpm.training.checkpoint import (CHECKPOINT_FORMAT, checkpoint_path, checkpoints_by_run, latest_valid_checkpoint,
                                      move_aside, prune, save_checkpoint)
from ddpm.app.config import TrainConfig
from ddpm.diffusion.process import GaussianProcess
from ddpm.training.optim import (EMA, FlatParams, amp_settings, flat_optimizer_state, make_optimizer, warmup_lr)
from ddpm.nn.speed import CompiledOrEager, compile_options, to_channels_last

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


@dataclass(frozen=True)
class TrainSettings(TrainConfig):
    """The knobs of :func:`train`: every field of ``params.yaml``'s ``train`` section (``config.TrainConfig``,
    defined and defaulted once there), plus the loop's own switches that params.yaml does not carry.
    The ``fid_*`` and ``nproc_per_node`` fields are the stage's; the loop reads ``eval_every`` instead."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    eval_every: int = 0  # calls on_eval every N steps (and at the end); 0: never
    channels_last: bool = False  # NHWC weights and activations (ddpm.nn.speed)
    compile: bool = False        # torch.compile the loss (forward and backward), eager if that fails

    @classmethod
    def from_config(cls, config: TrainConfig, **loop: Any) -> "TrainSettings":
        """The settings of a ``train`` section: its fields as they are, ``eval_every`` = ``fid_every``."""
        return cls(**{**asdict(config), "eval_every": config.fid_every, **loop})


@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module
    step: int
    history: list[dict[str, float]]  # one row per step: step, loss, loss_q0..q3 (NaN when empty)
    resumed_from: Optional[int]
    seconds: float
    images_per_second: float
    extra: dict[str, Any] = field(default_factory=dict)


class LossLog:
    """Per-step losses and per-quarter-of-t losses, kept on the device and read back once per log
    interval (no sync per step)."""

    def __init__(self, size: int, device: torch.device, num_timesteps: int) -> None:
        self.loss = torch.zeros(size, device=device)
        self.q_sum = torch.zeros(size, 4, device=device)
        self.q_cnt = torch.zeros(size, 4, device=device)
        self.T = num_timesteps
        self.pending: list[int] = []

    def start_step(self) -> None:
        slot = len(self.pending)
        self.loss[slot].zero_()
        self.q_sum[slot].zero_()
        self.q_cnt[slot].zero_()

    @torch.no_grad()
    def add(self, loss: torch.Tensor, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        slot = len(self.pending)
        self.loss[slot] += loss.detach()
        quarter = (t * 4) // self.T
        self.q_sum[slot].index_add_(0, quarter, per_sample.detach().float())
        self.q_cnt[slot].index_add_(0, quarter, torch.ones_like(per_sample, dtype=torch.float32))

    def rows(self, world: int) -> list[dict[str, float]]:
        """The pending steps' rows (step, loss, loss_q0..q3), averaged over ranks; clears them."""
        k = len(self.pending)
        if world > 1:  # the global batch's loss: the mean of the ranks' means; quarter sums and counts add up
            dist.all_reduce_sum_(self.loss[:k], self.q_sum[:k], self.q_cnt[:k])
            self.loss[:k] /= world
        losses = self.loss[:k].tolist()
        qs = (self.q_sum[:k] / self.q_cnt[:k]).tolist()  # NaN where a quarter got no sample
        rows = [{"step": st, "loss": losses[j], **{f"loss_q{q}": qs[j][q] for q in range(4)}}
                for j, st in enumerate(self.pending)]
        self.pending = []
        return rows


class TrainLoop:
    """Train ``model`` to denoise ``images`` (uint8 [N, C, H, W]) under ``process``; see :func:`train`."""

    def __init__(self, model: nn.Module, process: GaussianProcess, images: torch.Tensor, settings: TrainSettings,
                 *, seed: int, device: torch.device | str = "cpu", checkpoint_dir: Optional[str | Path] = None,
                 metadata: Optional[dict[str, Any]] = None, run_key: Optional[str] = None,
                 on_log: Optional[Callable[[list[dict[str, float]]], None]] = None,
                 on_eval: Optional[Callable[[int, nn.Module], Optional[dict[str, float]]]] = None,
                 progress: bool = True) -> None:
        self.s, self.device, self.seed = settings, torch.device(device), seed
        self.rank, self.world, self.main = dist.rank(), dist.world_size(), dist.is_main()
        self.micro = self._micro_batch(images)
        self.process = process.to(self.device)
        self._setup_model(model)
        self.data, self.n = images.to(self.device), len(images)
        self._setup_rngs()
        self._setup_optimizer()
        self.perm, self.pos, self.step = torch.randperm(self.n, generator=self.g_data), 0, 0
        self.history: list[dict[str, float]] = []
        self.extra: dict[str, Any] = {}
        self.skipped_steps, self.resumed_from = 0, None
        self.ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.metadata, self.run_key = metadata or {}, run_key
        self.on_log, self.on_eval, self.progress = on_log, on_eval, progress
        self.own: list[tuple[int, Path]] = []  # this run's checkpoints: the only ones it prunes
        self.others: list[Path] = []  # other runs' checkpoints in the folder: left alone
        self.last_good: Optional[Path] = None
        if self.ckpt_dir is not None:
            self.resume()
        self.loss_fn = self._make_loss_fn()
        self.losses = LossLog(settings.log_every, self.device, self.process.num_timesteps)
        self.pbar = None

    # --- setup ------------------------------------------------------------------------------------------
    def _micro_batch(self, images: torch.Tensor) -> int:
        """This rank's share of a micro-batch; checks the images and the batch split."""
        s = self.s
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be a non-empty uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if s.batch_size % (s.grad_accum * self.world):
            raise ValueError(f"train.batch_size={s.batch_size} must be divisible by train.grad_accum={s.grad_accum}"
                             + (f" x {self.world} processes (train.nproc_per_node x nodes)" if self.world > 1 else ""))
        return s.batch_size // s.grad_accum // self.world

    def _setup_model(self, model: nn.Module) -> None:
        model = model.to(self.device)
        self.model = to_channels_last(model) if self.s.channels_last else model
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.flat = FlatParams(trainable) if FlatParams.possible(trainable) else None  # after the layout change
        self.stepped = [self.flat.param] if self.flat is not None else list(self.model.parameters())
        self.net = dist.wrap(self.model, self.device)  # DDP (weights broadcast from rank 0) when several processes

    def _setup_rngs(self) -> None:
        """Data order (CPU), timesteps + noise (device); dropout uses torch's global RNG."""
        self.g_data = torch.Generator().manual_seed(self.seed)
        self.g_noise = torch.Generator(device=self.device).manual_seed(dist.rank_seed(self.seed, 1))
        torch.manual_seed(dist.rank_seed(self.seed, 2))

    def _setup_optimizer(self) -> None:
        s = self.s
        self.amp_dtype, self.use_scaler = amp_settings(self.device, s.amp)
        self.opt = make_optimizer(self.stepped, s.lr, s.adam_betas, s.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_scaler)
        self.ema = EMA(self.model, s.ema_decay, s.ema_warmup, self.flat)

    def _make_loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        def loss_fn(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                return self.process.losses(self.net, x0, t, noise)

        if self.s.compile:
            return CompiledOrEager(loss_fn, "the training loss", **compile_options(self.device))
        return loss_fn

    # --- checkpoints --------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the newest valid checkpoint of this run (same ``run_key``), if any."""
        ckpt = None
        if self.main:  # rank 0's folder (other nodes need not see it): read there, sent to every rank
            self.own, self.others = checkpoints_by_run(self.ckpt_dir, self.run_key)
            if self.others:
                log.info("%d checkpoint(s) in %s belong to other parameters; left alone: %s", len(self.others),
                         self.ckpt_dir, ", ".join(p.name for p in self.others))
            ckpt = latest_valid_checkpoint(self.ckpt_dir, self.run_key)
        ckpt = dist.broadcast_object(ckpt)
        if ckpt is None:
            return
        self.model.load_state_dict(ckpt["model"])
        self.ema.model.load_state_dict(ckpt["ema"])
        opt_state = ckpt["optimizer"]
        self.opt.load_state_dict(flat_optimizer_state(opt_state, self.flat) if self.flat is not None else opt_state)
        self.scaler.load_state_dict(ckpt["scaler"])
        self._restore_rngs(ckpt)
        self.perm, self.pos, self.step = ckpt["data_state"]["perm"], ckpt["data_state"]["pos"], ckpt["step"]
        self.history, self.extra = list(ckpt.get("history", [])), dict(ckpt.get("extra", {}))
        self.skipped_steps = ckpt.get("skipped_steps", 0)
        self.resumed_from = self.step
        log.info("resuming from %s (step %d)", ckpt["_path"], self.step)

    def _restore_rngs(self, ckpt: dict[str, Any]) -> None:
        self.g_data.set_state(ckpt["rng"]["data"])  # the same on every rank
        mine = dist.rank_rng_state(ckpt)
        if mine is None:  # written by another number of processes: reseed from (seed, step, rank)
            log.warning("checkpoint %s was written by another number of processes; noise and dropout RNGs "
                        "reseeded from (seed, step, rank)", ckpt["_path"])
            self.g_noise.manual_seed(dist.rank_seed(self.seed, 1, ckpt["step"]))
            torch.manual_seed(dist.rank_seed(self.seed, 2, ckpt["step"]))
            return
        self.g_noise.set_state(mine["noise"])
        torch.set_rng_state(mine["torch"])
        if self.device.type == "cuda" and mine.get("cuda") is not None:
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    def _rng_state(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"noise": self.g_noise.get_state().cpu(), "torch": torch.get_rng_state(), "cuda": cuda}

    def _state(self, rng: dict[str, Any], per_rank: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "step": self.step, "run_key": self.run_key,
            "model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
            "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": {"data": self.g_data.get_state(), **rng},
            **({"rng_per_rank": per_rank} if per_rank else {}),
            "data_state": {"perm": self.perm, "pos": self.pos},
            "history": self.history, "extra": self.extra, "skipped_steps": self.skipped_steps,
            **self.metadata,
        }

    def save(self) -> Optional[Path]:
        """Write this step's checkpoint (rank 0; a collective: every rank calls it) and prune this run's."""
        if self.ckpt_dir is None:
            return None
        rng = self._rng_state()
        per_rank = dist.all_gather_object(rng) if self.world > 1 else None
        path = checkpoint_path(self.ckpt_dir, self.step)
        if self.main:
            if path in self.others:  # never overwrite another run's checkpoint
                self.others[self.others.index(path)] = move_aside(path)
            save_checkpoint(path, self._state(rng, per_rank))  # sealed with its sha256
            self.own = prune(self.own + [(self.step, path)], self.s.keep_checkpoints)
        return path

    # --- one step -----------------------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor:
        """This rank's shard of the next global micro-batch, in [-1, 1] (flipped where asked)."""
        from ddpm.data.convert import uint8_to_model

        idx, need = [], self.micro * self.world  # the same on every rank (g_data is not offset by rank)
        while need:
            if self.pos >= self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.g_data), 0
            take = self.perm[self.pos:self.pos + need]
            idx.append(take)
            self.pos += len(take)
            need -= len(take)
        shard = slice(self.rank * self.micro, (self.rank + 1) * self.micro)
        x = uint8_to_model(self.data[torch.cat(idx)[shard].to(self.device)])
        if self.s.horizontal_flip:
            flip = (torch.rand(self.micro * self.world, generator=self.g_data) < 0.5)[shard]
            x = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x.contiguous(memory_format=torch.channels_last) if self.s.channels_last else x

    def backward_micro_batch(self) -> None:
        """Loss (Ho et al. eq. 14, or the objective's) of one micro-batch, backpropagated into the gradients."""
        x0 = self.next_batch()
        t = self.process.sample_timesteps(len(x0), self.g_noise, self.device)
        noise = torch.randn(x0.shape, generator=self.g_noise, device=self.device)
        per_sample = self.loss_fn(x0, t, noise)
        loss = per_sample.mean() / self.s.grad_accum
        self.scaler.scale(loss).backward()
        self.losses.add(loss, per_sample, t)

    def optimizer_step(self) -> None:
        """Clip, step (counting steps the grad scaler skips) and zero the gradients."""
        if self.s.max_grad_norm is not None:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.stepped, self.s.max_grad_norm, foreach=True)
        if self.use_scaler:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.scaler.get_scale() < scale_before:  # the scaler skipped this step (inf/NaN gradients)
                self.skipped_steps += 1
        else:
            self.opt.step()
        if self.flat is not None:
            self.flat.zero_grad()
        else:
            self.opt.zero_grad(set_to_none=True)

    def train_step(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = warmup_lr(self.s.lr, self.step, self.s.warmup_steps)
        self.losses.start_step()
        for _ in range(self.s.grad_accum):
            self.backward_micro_batch()
        self.optimizer_step()
        self.step += 1
        if self.step % self.s.ema_every == 0:
            self.ema.update(self.model, self.step)
        self.losses.pending.append(self.step)
        if self.pbar is not None:
            self.pbar.update(1)

    # --- after a step: log, evaluate, checkpoint ----------------------------------------------------------
    def flush(self) -> None:
        """Read the pending losses back, check they are finite, append them to the history, report them."""
        if not self.losses.pending:
            return
        rows = self.losses.rows(self.world)
        for row in rows:
            if not math.isfinite(row["loss"]) and not self.use_scaler:
                quarters = ", ".join(f"q{q}={row[f'loss_q{q}']:.4g}" for q in range(4))
                good = str(self.last_good) if self.last_good else "none (no checkpoint written yet)"
                raise NonFiniteLossError(
                    f"non-finite loss {row['loss']} at step {row['step']} (per-quarter-of-t losses: {quarters}); "
                    f"the last good checkpoint is {good} and is left intact")
        self.history.extend(rows)
        if self.on_log is not None and self.main:
            self.on_log(rows)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{sum(r['loss'] for r in rows) / len(rows):.4f}")

    def evaluate(self) -> None:
        row = self.on_eval(self.step, self.ema.model) if self.on_eval is not None and self.main else None
        dist.barrier()  # the other ranks wait for rank 0's evaluation
        if row:
            self.extra.setdefault("eval", []).append({"step": self.step, **row})

    def after_step(self) -> None:
        s, step, last = self.s, self.step, self.step == self.s.steps
        if len(self.losses.pending) == s.log_every or last or step % s.checkpoint_every == 0:
            self.flush()  # also the finite-loss check before any checkpoint is written
        if s.eval_every and (step % s.eval_every == 0 or last):
            self.evaluate()
        if step % s.checkpoint_every == 0 or last:
            self.last_good = self.save()

    # --- the loop -----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if self.progress and self.main:
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=self.s.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        t0, start = time.perf_counter(), self.step
        self.model.train()
        while self.step < self.s.steps:
            self.train_step()
            self.after_step()
        self.flush()
        if self.pbar is not None:
            self.pbar.close()
        seconds, done = time.perf_counter() - t0, self.step - start
        self.extra["skipped_steps"] = self.skipped_steps
        return TrainResult(self.model, self.ema.model, self.step, self.history, self.resumed_from, seconds,
                           done * self.s.batch_size / seconds if seconds > 0 and done else 0.0, self.extra)


def train(model: nn.Module, process: GaussianProcess, images: torch.Tensor, settings: TrainSettings, **kwargs: Any
          ) -> TrainResult:
    """Train ``model`` to denoise ``images`` (uint8 [N, C, H, W]) under ``process``.

    Keywords: ``seed`` (required), ``device``, ``checkpoint_dir``, ``metadata`` (model config, diffusion
    config, full params... stored in every checkpoint so a model can be rebuilt from one alone),
    ``run_key`` (with ``checkpoint_dir``, training resumes from the newest valid checkpoint with the same
    key and prunes only checkpoints with that key), ``on_log``, ``on_eval``, ``progress``.
    """
    return TrainLoop(model, process, images, settings, **kwargs).run()
