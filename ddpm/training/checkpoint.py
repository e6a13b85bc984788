"""The file formats of training, and the one factory that builds a model and its process from a description.

Two formats, both written atomically and both self-describing (nanoGPT's ``model_args`` habit):

- a resume checkpoint (``ddpm-checkpoint/1``, ``<folder>/ckpt-XXXXXXXX.pt``): the description below plus
  the weights, optimizer, grad scaler, RNG states, data order and loss history, so a run continues bit
  for bit; it is tagged with the ``run_key`` of the run that wrote it;
- an exported model (``ddpm-model/1``, e.g. ``models/<schedule>/seed<k>/model.pt``): only what inference
  needs: the description, the EMA weights and the step (no optimizer, RNG or data order).

The description (:func:`model_metadata`) is ``model_class``, ``model_config``, ``diffusion``,
``image_shape`` and ``params``; :func:`build` turns it into ``(model, process)``.

Loading never runs code from a file: ``torch.load(weights_only=True)`` (tensors and plain containers
only), and ``model_class`` must name a class in this process's registry (:func:`register_model`;
``ddpm.nn.unet.Unet`` is registered), never an import path taken from the file. A file that breaks either
rule raises :class:`UnsafeFileError` naming it.
"""
from __future__ import annotations

import hashlib
import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from ddpm import limits
from ddpm.app.config import _CAPS as CAPS, MAX_TIMESTEPS, show
from ddpm.diffusion.likelihood import bin_width
from ddpm.diffusion.process import GaussianProcess
from ddpm.io import atomic_torch_save
from ddpm.app.names import OBJECTIVES, SCHEDULES, VARIANCES
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.nn.unet import Unet

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "ddpm-checkpoint/1"
MODEL_FORMAT = "ddpm-model/1"
EXPORT_KEYS = ("model_class", "model_config", "diffusion", "image_shape", "params", "train_seed",
               "kernels")  # kernels: ddpm.nn.kernels.kernel_record() of the run that trained it
_CKPT_RE = re.compile(r"^ckpt-(\d+)(?:-[0-9a-f]{8})?\.pt$")  # -<8 hex>: another run's, moved aside
_MODEL_CLASSES: dict[str, type] = {}


class UnsafeFileError(ValueError):
    """A model or checkpoint file that would run code (pickled objects, an unregistered model class)."""


# --- the model-class allow-list ---------------------------------------------------------------------
# The name files give a class is part of the file format, not of the code's layout: the UNet keeps the name it had
# before ddpm/ moved into folders (ddpm/unet.py -> ddpm/nn/unet.py), so old files load and new ones are the same bytes.
FILE_NAMES = {"ddpm.nn.unet.Unet": "ddpm.unet.Unet"}


def class_name(cls: type) -> str:
    """The name model files give ``cls`` (``model_class``): its import path, or its stable name in FILE_NAMES."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    return FILE_NAMES.get(name, name)


def register_model(cls: type) -> type:
    """Allow files to name ``cls`` as their ``model_class`` (code of this process, never of a file): by its file
    name and by its import path."""
    _MODEL_CLASSES[class_name(cls)] = _MODEL_CLASSES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


register_model(Unet)


def _check_model_class(obj: dict[str, Any], path: Path) -> None:
    name = obj.get("model_class")
    if name is not None and name not in _MODEL_CLASSES:
        raise UnsafeFileError(f"{str(path)!r}: model_class {name!r} is not a registered model class; allowed: "
                              f"{', '.join(sorted(_MODEL_CLASSES))} (ddpm.training.checkpoint.register_model adds one)")


# --- reading ----------------------------------------------------------------------------------------
def _read(path: str | Path, formats: Iterable[str], map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a file with ``weights_only=True``; check its format and model class. Errors name the file."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:  # weights_only refused a global: the file holds more than tensors
        raise UnsafeFileError(f"{str(path)!r} refused: it holds pickled objects beyond tensors and plain containers, "
                              f"which could run code when loaded ({str(err).splitlines()[0][:200]})") from err
    except Exception as err:  # truncated zip, ...
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated: {type(err).__name__}: {err}") from err
    formats = tuple(formats)
    if not isinstance(obj, dict) or obj.get("format") not in formats:
        raise ValueError(f"checkpoint {str(path)!r} is not a {' or '.join(formats)} file")
    _check_model_class(obj, path)
    return obj


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A resume checkpoint, verified (:func:`verify_checkpoint`); ValueError naming the file if it is truncated,
    foreign, fails its checksum or lacks a field; UnsafeFileError if unsafe."""
    obj = _read(path, (CHECKPOINT_FORMAT,), map_location)
    verify_checkpoint(obj, path)
    return obj


# --- checksums: a flipped bit in a resume checkpoint must not resume silently -----------------------------
# the fields resume reads (ddpm/training/loop.py); a checkpoint without one is refused like a corrupt one
CHECKPOINT_FIELDS = ("step", "run_key", "model", "ema", "optimizer", "scaler", "rng", "data_state")


def payload_sha256(obj: Any) -> str:
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes and every plain value, in sorted
    key order (independent of the zip layout torch.save writes, so it survives a re-save)."""
    h = hashlib.sha256()
    stack = [obj]
    while stack:  # iterative: a deeply nested file cannot overflow the stack
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, dict):
            keys = sorted(x, key=repr)
            h.update(f"D{len(keys)}".encode())
            for k in reversed(keys):
                stack += [x[k], k]
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            stack += reversed(x)
        else:
            h.update(f"S{type(x).__name__}:{x!r}".encode())
    return h.hexdigest()


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with ``sha256``: the checksum of everything else in it."""
    return {**state, "sha256": payload_sha256({k: v for k, v in state.items() if k != "sha256"})}


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a resume checkpoint atomically, sealed with its checksum."""
    atomic_torch_save(seal(state), path)


def verify_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """ValueError naming the file when its checksum fails or a field resume reads is missing. A checkpoint from
    before checksums (no ``sha256``) loads with a warning: its own run can still finish."""
    stored = obj.get("sha256")
    if stored is None:
        log.warning("checkpoint %s has no checksum (written before checksums were stored); loading it unverified",
                    path)
    elif payload_sha256({k: v for k, v in obj.items() if k not in ("sha256", "_path")}) != stored:
        raise ValueError(f"checkpoint {str(path)!r} fails its sha256 checksum: its content changed after it was "
                         "written (a flipped bit, a partial copy or an edit)")
    missing = [k for k in CHECKPOINT_FIELDS if k not in obj]
    missing += [f"{k}.{j}" for k, js in (("data_state", ("perm", "pos")), ("rng", ("data",)))
                if isinstance(obj.get(k), dict) for j in js if j not in obj[k]]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks the field {missing[0]!r}; allowed: a checkpoint with "
                         f"{', '.join(CHECKPOINT_FIELDS)}")


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Checkpoints in ``folder``, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def checkpoints_by_run(folder: Path, run_key: Optional[str]) -> tuple[list[tuple[int, Path]], list[Path]]:
    """(this run's checkpoints newest first, other runs' checkpoints), reading each file's ``run_key``
    (memory-mapped); corrupt files count as neither and are reported; unsafe ones raise."""
    own, others = [], []
    for step, path in list_checkpoints(folder):
        try:
            key = _read(path, (CHECKPOINT_FORMAT,), mmap=True).get("run_key")
        except UnsafeFileError:
            raise
        except ValueError as err:
            log.warning("%s", err)
            continue
        (own.append((step, path)) if key == run_key else others.append(path))
    return own, others


def latest_valid_checkpoint(folder: Path, run_key: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The newest checkpoint of run ``run_key`` that loads; corrupt ones are reported and skipped, other runs'
    are left alone, and an unsafe file stops everything (UnsafeFileError naming it)."""
    for step, path in list_checkpoints(folder):
        try:
            ckpt = _read(path, (CHECKPOINT_FORMAT,))
            if ckpt.get("run_key") != run_key:
                log.warning("checkpoint %s was made with other parameters; not resuming from it", path)
                continue
            verify_checkpoint(ckpt, path)
        except UnsafeFileError:
            raise
        except ValueError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            continue
        ckpt["_path"] = str(path)
        return ckpt
    return None


def move_aside(path: Path) -> Path:
    """Rename another run's checkpoint that holds a name this run writes to ckpt-XXXXXXXX-<8 hex of its
    run key>.pt, where its own run still finds it, instead of overwriting it."""
    key = _read(path, (CHECKPOINT_FORMAT,), mmap=True).get("run_key")
    new = path.with_name(f"{path.stem}-{hashlib.sha256(str(key).encode()).hexdigest()[:8]}.pt")
    path.replace(new)
    log.info("moved checkpoint %s of other parameters aside to %s", path, new.name)
    return new


def prune(own: list[tuple[int, Path]], keep: int) -> list[tuple[int, Path]]:
    """Delete all but the ``keep`` (>= 1) newest of a run's own checkpoints; returns those kept."""
    own = sorted(set(own), reverse=True)
    for _, path in own[max(1, keep):]:
        path.unlink(missing_ok=True)
    return own[:max(1, keep)]


def remove_run_checkpoints(folder: Path, run_key: Optional[str]) -> None:
    """After a finished run: delete its own checkpoints (and the folder once empty); keep other runs'."""
    folder = Path(folder)
    own, others = checkpoints_by_run(folder, run_key)
    for _, path in own:
        path.unlink(missing_ok=True)
    if others:
        log.info("kept %d checkpoint(s) of other parameters in %s: %s", len(others), folder,
                 ", ".join(p.name for p in others))
    elif folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


# --- the description and the one factory ---------------------------------------------------------
def model_metadata(model: nn.Module, process: GaussianProcess, schedule: str, image_shape: tuple[int, ...],
                   clip_denoised: bool = True, zero_terminal_snr: bool = False,
                   params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the model and its process with no other input. Registers the
    model's class (this process's own code) so files naming it load here."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no `config` dict; a checkpoint could not rebuild it")
    return {
        "model_class": class_name(register_model(type(model))),
        "model_config": config,
        "diffusion": {"schedule": schedule, "timesteps": process.num_timesteps, "objective": process.objective,
                      "zero_terminal_snr": zero_terminal_snr, "min_snr_gamma": process.min_snr_gamma,
                      "clip_denoised": clip_denoised, "variance": process.variance,
                      **({"decoder_bin_width": process.decoder_bin_width} if process.learned_variance else {})},
        "image_shape": list(image_shape),
        "params": params or {},
    }


# --- descriptions are checked before anything is built: the limits of params.yaml (ddpm.app.config) ----------
DIFFUSION_KEYS = ("schedule", "timesteps", "objective", "zero_terminal_snr", "min_snr_gamma", "clip_denoised",
                  "variance")  # files without "variance" (before issue 27) are fixed_small


def _int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _diffusion_problems(d: Any, required: tuple[str, ...],
                        checked: tuple[str, ...] = (*DIFFUSION_KEYS, "decoder_bin_width")) -> list[str]:
    if not isinstance(d, dict):
        return [f"diffusion: got {show(d)}; allowed: a mapping with {', '.join(DIFFUSION_KEYS)}"]
    out = [f"diffusion.{k}: missing key" for k in required if k not in d]
    checks = {
        "schedule": (lambda v: v in SCHEDULES, ", ".join(SCHEDULES)),
        "timesteps": (lambda v: _int(v, 1, MAX_TIMESTEPS), f"an integer in [1, {MAX_TIMESTEPS}]"),
        "objective": (lambda v: v in OBJECTIVES, ", ".join(OBJECTIVES)),
        "zero_terminal_snr": (lambda v: isinstance(v, bool), "true or false"),
        "min_snr_gamma": (lambda v: v is None or (isinstance(v, (int, float)) and math.isfinite(v) and v > 0),
                          "null or a number > 0"),
        "clip_denoised": (lambda v: isinstance(v, bool), "true or false"),
        "variance": (lambda v: v in VARIANCES, ", ".join(VARIANCES)),
        "decoder_bin_width": (lambda v: isinstance(v, float) and 0 < v <= 2, "a number in (0, 2]"),
    }
    for key, (ok, allowed) in checks.items():
        if key in d and key in checked and not ok(d[key]):
            out.append(f"diffusion.{key}: got {show(d[key])}; allowed: {allowed}")
    return out


def _unet_problems(c: Any) -> list[str]:
    """The UNet's arguments within params.yaml's limits (model.dim <= 1024, at most 8 dim_mults <= 16, ...)."""
    if not isinstance(c, dict):
        return [f"model_config: got {show(c)}; allowed: a mapping of Unet arguments"]
    out = [f"model_config.{k}: missing key" for k in ("dim", "dim_mults") if k not in c]
    mults = c.get("dim_mults")
    checks = {
        "dim": (lambda v: _int(v, 1, CAPS["model.dim"]), f"an integer in [1, {CAPS['model.dim']}]"),
        "init_dim": (lambda v: v is None or _int(v, 1, 16 * CAPS["model.dim"]), "null or an integer in [1, 16384]"),
        "out_dim": (lambda v: v is None or _int(v, 1, 64), "null or an integer in [1, 64]"),
        "dim_mults": (lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 8 and all(_int(m, 1, 16) for m in v),
                      "a list of 1 to 8 integers in [1, 16]"),
        "channels": (lambda v: _int(v, 1, 64), "an integer in [1, 64]"),
        "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)"),
        "resnet_block_groups": (lambda v: _int(v, 1, 1024), "an integer in [1, 1024]"),
        "attn_heads": (lambda v: _int(v, 1, CAPS["model.attn_heads"]), f"an integer in [1, {CAPS['model.attn_heads']}]"),
        "attn_dim_head": (lambda v: _int(v, 1, CAPS["model.attn_dim_head"]),
                          f"an integer in [1, {CAPS['model.attn_dim_head']}]"),
        "full_attn": (lambda v: v is None or isinstance(v, bool) or (isinstance(v, (list, tuple)) and isinstance(
            mults, (list, tuple)) and len(v) == len(mults) and all(isinstance(a, bool) for a in v)),
                      "null, true, false or one boolean per dim_mults entry"),
    }
    for key, (ok, allowed) in checks.items():
        if key in c and not ok(c[key]):
            out.append(f"model_config.{key}: got {show(c[key])}; allowed: {allowed}")
    return out


def check_description(spec: Any, source: str = "description", batch: int = 1) -> None:
    """Refuse a description (a model file's, a checkpoint's) that is malformed, or whose model would not fit the
    memory budget (parameters and a sampling forward at ``batch`` images, estimated from the description by
    ddpm.limits), before anything is built: one ValueError line naming ``source``, the key, what it holds and what
    is allowed. The checks are params.yaml's limits."""
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: not a model description (got {type(spec).__name__})")
    problems = _diffusion_problems(spec.get("diffusion"), DIFFUSION_KEYS[:-1])  # "variance" may be absent (older files)
    shape = spec.get("image_shape")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and _int(shape[0], 1, 64)
            and all(_int(x, 1, 1024) for x in shape[1:])):
        problems.append(f"image_shape: got {show(shape)}; allowed: [channels in 1..64, height, width in 1..1024]")
    unet = spec.get("model_class") == class_name(Unet)
    if unet:
        problems += _unet_problems(spec.get("model_config"))
    if not problems and unet:
        est = limits.unet_size(spec["model_config"], shape[1:])
        line = limits.check_budget(limits.sampling_bytes(est, batch), (
            f"model_config (dim={spec['model_config']['dim']}, dim_mults={list(spec['model_config']['dim_mults'])}: "
            f"{limits.count(est['params'])} parameters) at image_shape={list(shape)}"))
        problems += [line] if line else []
    if problems:
        raise ValueError(f"{source}: {'; '.join(problems[:3])}" + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))


def build_process(diffusion: dict[str, Any], device: torch.device | str = "cpu", source: str = "description"
                  ) -> GaussianProcess:
    """The process of a ``diffusion`` description: schedule, timesteps, objective, zero_terminal_snr, min_snr_gamma.
    Checked first (ValueError naming ``source`` and the key): a ``timesteps`` of 1e10 never reaches the allocator."""
    problems = _diffusion_problems(diffusion, ("schedule", "timesteps"), checked=("timesteps",))  # names: below
    if problems:
        raise ValueError(f"{source}: {'; '.join(problems)}")
    betas = get_beta_schedule(diffusion["schedule"], diffusion["timesteps"], diffusion.get("zero_terminal_snr", False))
    bins = {"decoder_bin_width": diffusion["decoder_bin_width"]} if "decoder_bin_width" in diffusion else {}
    return GaussianProcess(betas, diffusion.get("objective", "pred_noise"), diffusion.get("min_snr_gamma"), device,
                           diffusion.get("variance", "fixed_small"), **bins)


def build(spec: dict[str, Any], device: torch.device | str = "cpu", source: str = "description"
          ) -> tuple[nn.Module, GaussianProcess]:
    """(model, process) from a description (a checkpoint, an exported model or :func:`spec_from_params`)."""
    cls = _MODEL_CLASSES.get(spec.get("model_class"))
    if cls is None:
        _check_model_class(spec, Path(source))
        raise ValueError(f"{source}: model_class: missing key; allowed: {', '.join(sorted(_MODEL_CLASSES))}")
    check_description(spec, source)
    try:
        model = cls(**spec["model_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: model_config does not build {spec['model_class']}: {err}") from err
    return model.to(device), build_process(spec["diffusion"], device, source)


def spec_from_params(p: Any, schedule: str, image_shape: tuple[int, ...], train_seed: int,
                     levels: int = 256) -> dict[str, Any]:
    """The description of a pipeline model: the UNet of ``p.model`` under ``schedule`` and ``p.diffusion``; with
    learned variances also the decoder's bin width 2 / (levels - 1) that L_vlb uses (the data's quantization)."""
    m, d = p.model, p.diffusion
    learned = {"decoder_bin_width": bin_width(levels)} if d.variance == "learned_range" else {}
    return {
        "model_class": class_name(Unet),
        "model_config": dict(dim=m.dim, dim_mults=list(m.dim_mults), channels=image_shape[0], dropout=m.dropout,
                             attn_heads=m.attn_heads, attn_dim_head=m.attn_dim_head,
                             **({"out_dim": 2 * image_shape[0]} if d.variance == "learned_range" else {})),
        "diffusion": {"schedule": schedule, "timesteps": p.timesteps, "objective": d.objective,
                      "zero_terminal_snr": d.zero_terminal_snr, "min_snr_gamma": d.min_snr_gamma,
                      "clip_denoised": d.clip_denoised, "variance": d.variance, **learned},
        "image_shape": list(image_shape),
        "params": p.to_dict(),
        "train_seed": train_seed,
    }


# --- the exported model -------------------------------------------------------------------------------
def export_model(metadata: dict[str, Any], ema: nn.Module, step: int) -> dict[str, Any]:
    """The inference artifact: the description, the EMA weights and the step."""
    return {"format": MODEL_FORMAT, **{k: metadata[k] for k in EXPORT_KEYS if k in metadata},
            "ema": ema.state_dict(), "step": step}


def save_model(path: str | Path, metadata: dict[str, Any], ema: nn.Module, step: int) -> None:
    atomic_torch_save(export_model(metadata, ema, step), path)


def load_model(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """Rebuild (model, process, file contents) from an exported model (or a resume checkpoint) alone."""
    ckpt = _read(path, (MODEL_FORMAT, CHECKPOINT_FORMAT))
    if ckpt["format"] == CHECKPOINT_FORMAT:
        verify_checkpoint(ckpt, path)
    key = "ema" if use_ema else "model"
    if key not in ckpt:
        raise ValueError(f"{str(path)!r} holds no {key!r} weights (an exported model keeps only the EMA weights)")
    model, process = build(ckpt, device, source=repr(str(path)))
    model.load_state_dict(ckpt[key])
    return model.to(device).eval(), process, ckpt
