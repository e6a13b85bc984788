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
``ddpm.unet.Unet`` is registered), never an import path taken from the file. A file that breaks either
rule raises :class:`UnsafeFileError` naming it.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from .diffusion import GaussianProcess
from .io import atomic_torch_save
from .schedules import get_beta_schedule
from .unet import Unet

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "ddpm-checkpoint/1"
MODEL_FORMAT = "ddpm-model/1"
EXPORT_KEYS = ("model_class", "model_config", "diffusion", "image_shape", "params", "train_seed",
               "kernels")  # kernels: ddpm.kernels.kernel_record() of the run that trained it
_CKPT_RE = re.compile(r"^ckpt-(\d+)(?:-[0-9a-f]{8})?\.pt$")  # -<8 hex>: another run's, moved aside
_MODEL_CLASSES: dict[str, type] = {}


class UnsafeFileError(ValueError):
    """A model or checkpoint file that would run code (pickled objects, an unregistered model class)."""


# --- the model-class allow-list ---------------------------------------------------------------------
def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_model(cls: type) -> type:
    """Allow files to name ``cls`` as their ``model_class`` (code of this process, never of a file)."""
    _MODEL_CLASSES[class_name(cls)] = cls
    return cls


register_model(Unet)


def _check_model_class(obj: dict[str, Any], path: Path) -> None:
    name = obj.get("model_class")
    if name is not None and name not in _MODEL_CLASSES:
        raise UnsafeFileError(f"{str(path)!r}: model_class {name!r} is not a registered model class; allowed: "
                              f"{', '.join(sorted(_MODEL_CLASSES))} (ddpm.checkpoint.register_model adds one)")


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
    """A resume checkpoint; ValueError naming the file if it is truncated or foreign, UnsafeFileError if unsafe."""
    return _read(path, (CHECKPOINT_FORMAT,), map_location)


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
            ckpt = load_checkpoint(path)
        except UnsafeFileError:
            raise
        except ValueError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            continue
        if ckpt.get("run_key") != run_key:
            log.warning("checkpoint %s was made with other parameters; not resuming from it", path)
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
                      "clip_denoised": clip_denoised},
        "image_shape": list(image_shape),
        "params": params or {},
    }


def build_process(diffusion: dict[str, Any], device: torch.device | str = "cpu") -> GaussianProcess:
    """The process of a ``diffusion`` description: schedule, timesteps, objective, zero_terminal_snr, min_snr_gamma."""
    betas = get_beta_schedule(diffusion["schedule"], diffusion["timesteps"], diffusion.get("zero_terminal_snr", False))
    return GaussianProcess(betas, diffusion.get("objective", "pred_noise"), diffusion.get("min_snr_gamma"), device)


def build(spec: dict[str, Any], device: torch.device | str = "cpu", source: str = "description"
          ) -> tuple[nn.Module, GaussianProcess]:
    """(model, process) from a description (a checkpoint, an exported model or :func:`spec_from_params`)."""
    cls = _MODEL_CLASSES.get(spec["model_class"])
    if cls is None:
        _check_model_class(spec, Path(source))
    try:
        model = cls(**spec["model_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: model_config does not build {spec['model_class']}: {err}") from err
    return model.to(device), build_process(spec["diffusion"], device)


def spec_from_params(p: Any, schedule: str, image_shape: tuple[int, ...], train_seed: int) -> dict[str, Any]:
    """The description of a pipeline model: the UNet of ``p.model`` under ``schedule`` and ``p.diffusion``."""
    m, d = p.model, p.diffusion
    return {
        "model_class": class_name(Unet),
        "model_config": dict(dim=m.dim, dim_mults=list(m.dim_mults), channels=image_shape[0], dropout=m.dropout,
                             attn_heads=m.attn_heads, attn_dim_head=m.attn_dim_head),
        "diffusion": {"schedule": schedule, "timesteps": p.timesteps, "objective": d.objective,
                      "zero_terminal_snr": d.zero_terminal_snr, "min_snr_gamma": d.min_snr_gamma,
                      "clip_denoised": d.clip_denoised},
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
    key = "ema" if use_ema else "model"
    if key not in ckpt:
        raise ValueError(f"{str(path)!r} holds no {key!r} weights (an exported model keeps only the EMA weights)")
    model, process = build(ckpt, device, source=repr(str(path)))
    model.load_state_dict(ckpt[key])
    return model.to(device).eval(), process, ckpt
