"""The pipeline's file layout and the small pieces of glue the DVC stages share.

Paths are relative to the repository root (DVC runs every stage there). Nothing here does model
maths; it names files, reads and writes them atomically, and times stages.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ddpm.io import atomic_save_npz, atomic_write_json
from ddpm.limits import load_npz, npz_headers

PREPARED = Path("data/prepared")
FEATURIZER = Path("featurizer")
MODELS = Path("models")
CHECKPOINTS = Path("checkpoints")
SAMPLES = Path("samples")
REPORTS = Path("reports")
NLL = Path("nll")  # nll/<schedule>/seed<k>/nll.npz: per-image bits/dim of one model (the nll stage)
NLL_CSV = REPORTS / "nll.csv"  # one row per model: bpd, its interval, the bound's parts
NLL_TERMS_CSV = REPORTS / "nll_terms.csv"  # mean L_t per stratum of t (the report's where-the-bits-go figure)
NLL_COMPARISONS_CSV = REPORTS / "nll_comparisons.csv"  # paired per-image differences between schedules
# File names, spelled here once (dvc.yaml spells them too: it cannot import Python)
FID_CSV = REPORTS / "fid.csv"
FID_SUMMARY = REPORTS / "fid_summary.json"
COMPARISONS_CSV = REPORTS / "comparisons.csv"  # ddpm.metrics.compare: the question table and the ranking's pairs
FEATURES_NPZ = REPORTS / "features.npz"  # every sample set's features + the reference (tracking's `compare`)
REPORT_METRICS = REPORTS / "metrics.json"
FEATURIZER_METRICS = FEATURIZER / "metrics.json"
HOLDOUT = PREPARED / "holdout.npz"
LOSS_CSV = "loss.csv"  # in model_dir(schedule, seed)
FID_CURVE_CSV = "fid_curve.csv"  # in model_dir(schedule, seed)
TRAIN_JSON = "train.json"  # in model_dir(schedule, seed)


def sample_path(schedule: str, seed: int, name: str, eta: float, steps: int) -> Path:
    """samples/<schedule>/seed<k>/<name>-eta<eta>-<steps>.npz, spelt as dvc.yaml's matrix interpolates it."""
    return SAMPLES / schedule / f"seed{int(seed)}" / f"{name}-eta{float(eta)!r}-{steps}.npz"


def slug(text: Any) -> str:
    """A file-name / metric-key safe token of a label: ``ddim-eta0.5`` -> ``ddim-eta0p5``."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", str(text).replace(".", "p")).strip("-")
    return s or "x"


def grid_name(schedule: str, label: str, steps: int) -> str:
    """reports/figures/<this>: the report's sample grid of one sample set (first training seed)."""
    return f"samples_{slug(schedule)}_{slug(label)}_{int(steps)}.png"


def model_dir(schedule: str, seed: int) -> Path:
    """models/<schedule>/seed<k>/: the model of one schedule and training seed."""
    return MODELS / schedule / f"seed{int(seed)}"


def nll_path(schedule: str, seed: int) -> Path:
    """nll/<schedule>/seed<k>/nll.npz: the nll stage's per-image values for one model."""
    return NLL / schedule / f"seed{int(seed)}" / "nll.npz"


def checkpoint_dir(schedule: str, seed: int) -> Path:
    """checkpoints/<schedule>/seed<k>/: resume checkpoints (not a DVC output)."""
    return CHECKPOINTS / schedule / f"seed{int(seed)}"


def sample_key(images: np.ndarray) -> str:
    """A short content hash of a sample set: the ``sample_key`` tag that finds its MLflow run."""
    return hashlib.sha256(images.tobytes()).hexdigest()[:16]


def save_arrays(path: Path, **arrays: Any) -> None:
    atomic_save_npz(path, **arrays)


def load_arrays(path: Path, keys: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (all when None) of an ``.npz``; what they decode to is bounded from the zip and ``.npy``
    headers before any is read (ddpm.limits.load_npz: DDPM_MAX_DECODED_GB), other keys are never read."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it (`dvc repro`)")
    return load_npz(path, keys)


class SampleSetError(ValueError):
    """A sample set that is not uint8 images of the prepared data's shape."""


def prepared_image_shape(meta: Path = PREPARED / "meta.json") -> tuple[int, ...]:
    """[C, H, W] of the prepared images (data/prepared/meta.json, written by the prepare stage)."""
    shape = read_json(meta).get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(x, int) for x in shape)):
        raise SampleSetError(f"{meta}: image_shape is {shape!r}; allowed: [C, H, W] integers (rerun prepare)")
    return tuple(shape)


def load_sample_set(path: Path, image_shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """The ``images`` of a samples ``.npz``, checked from its ``.npy`` header before any pixel is read: dtype uint8,
    shape [n, C, H, W] with [C, H, W] = ``image_shape`` (the prepared data's). Anything else (16x16 samples against
    8x8 data, NaN floats) raises SampleSetError naming the file, what it holds and what is allowed. The fid stage
    and the report read sample sets through this."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it (`dvc repro`)")
    shape, dtype = npz_headers(path, ["images"])["images"]
    want = list(image_shape) if image_shape is not None else None
    if dtype != np.uint8 or len(shape) != 4 or (want is not None and list(shape[1:]) != want):
        allowed = "[n, C, H, W]" if want is None else f"[n, {', '.join(map(str, want))}] (the prepared data's shape)"
        raise SampleSetError(f"{path}: images are {dtype} of shape {list(shape)}; allowed: uint8 (0..255) of shape "
                             f"{allowed}")
    return load_npz(path, ["images"])["images"]


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def setup_logging() -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    return logging.getLogger(os.environ.get("DVC_STAGE", "ddpm"))


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    """``with timed() as t: ...`` then ``t["seconds"]``."""
    out = {"seconds": 0.0}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - t0, 3)
