"""The training loop: AdamW, EMA, gradient accumulation and clipping, mixed precision, checkpoints, resume.

``train()`` knows nothing of files other than its checkpoint folder, nor of MLflow: it reports through
callbacks (``on_log`` with the per-step losses, ``on_eval`` with the EMA model). Every random draw
comes from generators it owns and checkpoints (data order, timesteps and noise), plus torch's global
RNG for dropout, which is seeded here and saved too, so a resumed run continues bit for bit on the CPU.

Under torchrun (``ddpm.distributed.init`` called first) the model trains in DistributedDataParallel:
every rank draws the same global data order and takes its shard of each global batch of
``batch_size`` images, draws its own timesteps, noise and dropout (seeds offset by rank), and stores
its RNG states in rank 0's checkpoints; only rank 0 calls ``on_log``/``on_eval`` and writes checkpoints.
"""
from __future__ import annotations

import copy
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from . import distributed as dist
from .diffusion import GaussianProcess
from .io import atomic_torch_save
from .speed import CompiledOrEager, compile_options, to_channels_last

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "ddpm-checkpoint/1"
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


@dataclass
class TrainSettings:
    """The knobs of :func:`train` (mirrors ``params.yaml``'s ``train`` section)."""

    steps: int
    batch_size: int = 128  # global batch per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    ema_decay: float = 0.999
    ema_warmup: int = 10
    ema_every: int = 1
    adam_betas: tuple[float, float] = (0.9, 0.999)
    amp: bool = False
    horizontal_flip: bool = False
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0  # calls on_eval every N steps (and at the end); 0: never
    channels_last: bool = False  # NHWC weights and activations (ddpm.speed)
    compile: bool = False        # torch.compile the loss (forward and backward), eager if that fails


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


def amp_settings(device: torch.device, enabled: bool) -> tuple[Optional[torch.dtype], bool]:
    """(autocast dtype, use GradScaler): bf16 where supported, else fp16 with a scaler on CUDA."""
    if not enabled:
        return None, False
    if device.type == "cuda":
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    return torch.bfloat16, False


class FlatParams:
    """Trainable parameters, and their gradients, as views into one buffer each.

    The optimizer, the gradient clipping and the EMA then run one kernel on one tensor instead of one
    per parameter tensor (151 at dim 32): on a CPU, where ``foreach`` ops loop over tensors, that took
    2.7 ms of a ~100 ms training step, against 0.9 ms flat (``benchmarks/peers.py`` measures the step).
    The parameters keep their shapes, strides (channels_last too), names and values; ``param`` is what
    the optimizer steps and ``param.grad`` is the flat gradient, which backward accumulates into in place.
    """

    def __init__(self, params: list[nn.Parameter], grads: bool = True) -> None:
        self.params = params
        first = params[0]
        self.param = nn.Parameter(torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device))
        self._offsets = []
        offset = 0
        for p in params:
            self._offsets.append(offset)
            offset += p.numel()
        with torch.no_grad():
            for p, view in zip(params, self.views(self.param.data)):
                view.copy_(p)
                p.data = view
        if grads:
            self.param.grad = torch.zeros_like(self.param)
            for p, view in zip(params, self.views(self.param.grad)):
                p.grad = view

    @staticmethod
    def possible(params: list[nn.Parameter]) -> bool:
        """One buffer needs one dtype and device, and parameters that each fill their storage densely."""
        return bool(params) and all(
            p.dtype == params[0].dtype and p.device == params[0].device
            and (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)) for p in params)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` seen as one tensor per parameter, with that parameter's shape and strides."""
        return [flat.as_strided(p.shape, p.stride(), flat.storage_offset() + o) for p, o in zip(self.params, self._offsets)]

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per-parameter tensors (e.g. a per-tensor optimizer's moments) laid out as one flat tensor."""
        flat = torch.empty_like(self.param.data)
        for view, t in zip(self.views(flat), tensors):
            view.copy_(t)
        return flat

    def zero_grad(self) -> None:
        self.param.grad.zero_()


def flat_optimizer_state(state: dict[str, Any], flat: FlatParams) -> dict[str, Any]:
    """An optimizer state_dict saved per parameter tensor (before ``FlatParams``) for the flat optimizer."""
    groups = state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(flat.params):
        return state  # not the per-tensor layout of this model: load_state_dict says what does not match
    per = [state["state"].get(i, {}) for i in groups[0]["params"]]
    if not all(per):
        return {**state, "state": {}, "param_groups": [{**groups[0], "params": [0]}]}
    moments = {k: flat.flatten([s[k] for s in per]) for k, v in per[0].items() if torch.is_tensor(v) and v.ndim > 0}
    scalars = {k: v for k, v in per[0].items() if k not in moments}
    return {"state": {0: {**scalars, **moments}}, "param_groups": [{**groups[0], "params": [0]}]}


class EMA:
    """Exponential moving average of weights with warm-up: decay_t = min(decay, (1 + t) / (warmup + t)).

    Given the model's :class:`FlatParams`, the average is kept flat too and updated in one ``lerp``.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int, flat: Optional[FlatParams] = None) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self._dst = [p for p in self.model.parameters()]
        self._dst_buf = [b for b in self.model.buffers()]
        self._src_flat, self._dst_flat = None, None
        if flat is not None:
            trainable = {id(p) for p in flat.params}
            mine = [q for p, q in zip(model.parameters(), self.model.parameters()) if id(p) in trainable]
            self._src_flat, self._dst_flat = flat.param.data, FlatParams(mine, grads=False).param.data

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (self.warmup + step))
        if self._dst_flat is not None:
            self._dst_flat.lerp_(self._src_flat, 1 - d)  # ema <- d ema + (1 - d) w
        else:
            src = [p.detach() for p in model.parameters()]
            torch._foreach_lerp_(self._dst, src, 1 - d)
        for b_dst, b_src in zip(self._dst_buf, model.buffers()):
            b_dst.copy_(b_src)


# --- checkpoints ----------------------------------------------------------------------------------
def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Checkpoints in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and sanity-check a checkpoint; raise ValueError naming the file if it is truncated or foreign."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated zip, bad pickle, ...
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated: {type(err).__name__}: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} is not a {CHECKPOINT_FORMAT} file")
    return ckpt


def latest_valid_checkpoint(folder: Path, run_key: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The newest checkpoint that loads (and matches ``run_key`` when given); corrupt ones are reported and skipped."""
    for step, path in list_checkpoints(folder):
        try:
            ckpt = load_checkpoint(path)
        except ValueError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            continue
        if run_key is not None and ckpt.get("run_key") != run_key:
            log.warning("checkpoint %s was made with other parameters; not resuming from it", path)
            continue
        ckpt["_path"] = str(path)
        return ckpt
    return None


def _prune(folder: Path, keep: int) -> None:
    for _, path in list_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)


# --- the loop ---------------------------------------------------------------------------------------
def train(
    model: nn.Module,
    process: GaussianProcess,
    images: torch.Tensor,
    settings: TrainSettings,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    checkpoint_dir: Optional[str | Path] = None,
    metadata: Optional[dict[str, Any]] = None,
    run_key: Optional[str] = None,
    on_log: Optional[Callable[[list[dict[str, float]]], None]] = None,
    on_eval: Optional[Callable[[int, nn.Module], Optional[dict[str, float]]]] = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` to denoise ``images`` (uint8 [N, C, H, W]) under ``process``.

    ``metadata`` (model config, diffusion config, full params...) is stored in every checkpoint so a
    model can be rebuilt from a checkpoint alone. With ``checkpoint_dir``, training resumes from the
    newest valid checkpoint whose ``run_key`` matches.
    """
    from .data import uint8_to_model

    s = settings
    device = torch.device(device)
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    if s.batch_size % (s.grad_accum * world):
        raise ValueError(f"train.batch_size={s.batch_size} must be divisible by train.grad_accum={s.grad_accum}"
                         + (f" x {world} processes (train.nproc_per_node x nodes)" if world > 1 else ""))
    micro = s.batch_size // s.grad_accum // world  # this rank's share of a micro-batch
    process = process.to(device)
    model = model.to(device)
    if s.channels_last:
        model = to_channels_last(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    flat = FlatParams(trainable) if FlatParams.possible(trainable) else None  # after the layout change
    stepped = [flat.param] if flat is not None else list(model.parameters())  # what AdamW and clipping see
    net = dist.wrap(model, device)  # DDP (weights broadcast from rank 0) when several processes; else model
    data = images.to(device)
    n = len(data)

    # generators: data order (CPU), timesteps + noise (device); dropout uses torch's global RNG
    g_data = torch.Generator().manual_seed(seed)
    g_noise = torch.Generator(device=device).manual_seed(dist.rank_seed(seed, 1))  # seed + 1 on rank 0
    torch.manual_seed(dist.rank_seed(seed, 2))

    amp_dtype, use_scaler = amp_settings(device, s.amp)
    # fused: one kernel for every parameter (CPU and CUDA) instead of about ten per parameter tensor
    opt = torch.optim.AdamW(stepped, lr=s.lr, betas=tuple(s.adam_betas), weight_decay=s.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    ema = EMA(model, s.ema_decay, s.ema_warmup, flat)
    perm, pos, step, history, resumed_from, extra = torch.randperm(n, generator=g_data), 0, 0, [], None, {}
    skipped_steps = 0

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt_dir is not None:
        ckpt = latest_valid_checkpoint(ckpt_dir, run_key)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            ema.model.load_state_dict(ckpt["ema"])
            opt.load_state_dict(flat_optimizer_state(ckpt["optimizer"], flat) if flat is not None else ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            g_data.set_state(ckpt["rng"]["data"])  # the same on every rank
            mine = dist.rank_rng_state(ckpt)
            if mine is None:  # written by another number of processes: reseed from (seed, step, rank)
                log.warning("checkpoint %s was written by another number of processes; noise and dropout RNGs "
                            "reseeded from (seed, step, rank)", ckpt["_path"])
                g_noise.manual_seed(dist.rank_seed(seed, 1, ckpt["step"]))
                torch.manual_seed(dist.rank_seed(seed, 2, ckpt["step"]))
            else:
                g_noise.set_state(mine["noise"])
                torch.set_rng_state(mine["torch"])
                if device.type == "cuda" and mine.get("cuda") is not None:
                    torch.cuda.set_rng_state(mine["cuda"], device)
            perm, pos, step = ckpt["data_state"]["perm"], ckpt["data_state"]["pos"], ckpt["step"]
            history, extra = list(ckpt.get("history", [])), dict(ckpt.get("extra", {}))
            skipped_steps = ckpt.get("skipped_steps", 0)
            resumed_from = step
            log.info("resuming from %s (step %d)", ckpt["_path"], step)

    def save(final: bool = False) -> Optional[Path]:
        if ckpt_dir is None:
            return None
        rng = {"noise": g_noise.get_state().cpu(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        per_rank = dist.all_gather_object(rng) if world > 1 else None  # a collective: every rank calls save()
        path = checkpoint_path(ckpt_dir, step)
        if not main:
            return path
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "run_key": run_key,
            "model": model.state_dict(),
            "ema": ema.model.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {"data": g_data.get_state(), **rng},
            **({"rng_per_rank": per_rank} if per_rank else {}),
            "data_state": {"perm": perm, "pos": pos},
            "history": history,
            "extra": extra,
            "skipped_steps": skipped_steps,
            **(metadata or {}),
        }
        atomic_torch_save(state, path)
        _prune(ckpt_dir, s.keep_checkpoints)
        return path

    def next_batch() -> torch.Tensor:
        nonlocal perm, pos
        idx = []
        need = micro * world  # the global micro-batch, the same on every rank (g_data is not offset by rank)
        while need:
            if pos >= n:
                perm, pos = torch.randperm(n, generator=g_data), 0
            take = perm[pos:pos + need]
            idx.append(take)
            pos += len(take)
            need -= len(take)
        shard = slice(rank * micro, (rank + 1) * micro)  # this rank's part of it
        x = uint8_to_model(data[torch.cat(idx)[shard].to(device)])
        if s.horizontal_flip:
            flip = (torch.rand(micro * world, generator=g_data) < 0.5)[shard]
            x = torch.where(flip.to(device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x.contiguous(memory_format=torch.channels_last) if s.channels_last else x

    def loss_fn(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return process.losses(net, x0, t, noise)

    if s.compile:
        loss_fn = CompiledOrEager(loss_fn, "the training loss", **compile_options(device))

    def lr_at(k: int) -> float:
        return s.lr * min(1.0, (k + 1) / s.warmup_steps) if s.warmup_steps else s.lr

    T = process.num_timesteps
    # per-step loss buffers on the device: read back once per log interval (no sync per step)
    loss_buf = torch.zeros(s.log_every, device=device)
    q_sum = torch.zeros(s.log_every, 4, device=device)
    q_cnt = torch.zeros(s.log_every, 4, device=device)
    pending: list[int] = []
    pbar = None
    if progress and main:
        from tqdm.auto import tqdm

        pbar = tqdm(total=s.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    last_good = None
    t0, start_step = time.perf_counter(), step
    model.train()

    def flush() -> None:
        nonlocal pending
        if not pending:
            return
        k = len(pending)
        if world > 1:  # the global batch's loss: the mean of the ranks' means; quarter sums and counts add up
            dist.all_reduce_sum_(loss_buf[:k], q_sum[:k], q_cnt[:k])
            loss_buf[:k] /= world
        losses = loss_buf[:k].tolist()
        qs = (q_sum[:k] / q_cnt[:k]).tolist()  # NaN where a quarter got no sample
        rows = []
        for j, st in enumerate(pending):
            row = {"step": st, "loss": losses[j], **{f"loss_q{q}": qs[j][q] for q in range(4)}}
            rows.append(row)
            if not math.isfinite(losses[j]) and not use_scaler:
                raise NonFiniteLossError(
                    f"non-finite loss {losses[j]} at step {st} (per-quarter-of-t losses: "
                    f"{', '.join(f'q{q}={qs[j][q]:.4g}' for q in range(4))}); the last good checkpoint is "
                    f"{str(last_good) if last_good else 'none (no checkpoint written yet)'} and is left intact"
                )
        history.extend(rows)
        if on_log is not None and main:
            on_log(rows)
        if pbar is not None:
            pbar.set_postfix(loss=f"{sum(losses) / k:.4f}")
        pending = []

    while step < s.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        slot = len(pending)
        q_sum[slot].zero_()
        q_cnt[slot].zero_()
        loss_buf[slot].zero_()
        for _ in range(s.grad_accum):
            x0 = next_batch()
            t = process.sample_timesteps(len(x0), g_noise, device)
            noise = torch.randn(x0.shape, generator=g_noise, device=device)
            per_sample = loss_fn(x0, t, noise)
            loss = per_sample.mean() / s.grad_accum
            scaler.scale(loss).backward()
            with torch.no_grad():
                loss_buf[slot] += loss.detach()
                quarter = (t * 4) // T
                q_sum[slot].index_add_(0, quarter, per_sample.detach().float())
                q_cnt[slot].index_add_(0, quarter, torch.ones_like(per_sample, dtype=torch.float32))
        if s.max_grad_norm is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(stepped, s.max_grad_norm, foreach=True)
        if use_scaler:
            scale_before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < scale_before:  # the scaler skipped this step (inf/NaN gradients)
                skipped_steps += 1
        else:
            opt.step()
        if flat is not None:
            flat.zero_grad()
        else:
            opt.zero_grad(set_to_none=True)
        step += 1
        if step % s.ema_every == 0:
            ema.update(model, step)
        pending.append(step)
        if pbar is not None:
            pbar.update(1)
        if len(pending) == s.log_every or step == s.steps or step % s.checkpoint_every == 0:
            flush()  # also the finite-loss check before any checkpoint is written
        if s.eval_every and (step % s.eval_every == 0 or step == s.steps):
            row = on_eval(step, ema.model) if on_eval is not None and main else None
            dist.barrier()  # the other ranks wait for rank 0's evaluation
            if row:
                extra.setdefault("eval", []).append({"step": step, **row})
        if step % s.checkpoint_every == 0 or step == s.steps:
            last_good = save()
    flush()
    if pbar is not None:
        pbar.close()
    seconds = time.perf_counter() - t0
    done = step - start_step
    extra["skipped_steps"] = skipped_steps
    return TrainResult(model, ema.model, step, history, resumed_from, seconds,
                       done * s.batch_size / seconds if seconds > 0 and done else 0.0, extra)


def model_metadata(model: nn.Module, process: GaussianProcess, schedule: str, image_shape: tuple[int, ...],
                   clip_denoised: bool = True, zero_terminal_snr: bool = False,
                   params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the model and its process with no other input."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `config` dict; a checkpoint could not rebuild it")
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": config,
        "diffusion": {"schedule": schedule, "timesteps": process.num_timesteps, "objective": process.objective,
                      "zero_terminal_snr": zero_terminal_snr, "min_snr_gamma": process.min_snr_gamma,
                      "clip_denoised": clip_denoised},
        "image_shape": list(image_shape),
        "params": params or {},
    }


def load_model(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """Rebuild (model, process, checkpoint) from a self-describing checkpoint alone."""
    import importlib

    from .schedules import get_beta_schedule

    ckpt = load_checkpoint(path)
    module, _, name = ckpt["model_class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    model = cls(**ckpt["model_config"])
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    d = ckpt["diffusion"]
    betas = get_beta_schedule(d["schedule"], d["timesteps"], d["zero_terminal_snr"])
    process = GaussianProcess(betas, d["objective"], d["min_snr_gamma"], device)
    return model.to(device).eval(), process, ckpt
