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
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .io import atomic_save_npz, atomic_write_json, file_sha256  # noqa: F401  (re-exported for the stages)
from .names import sampler_label  # noqa: F401  (re-exported: the one spelling, see ddpm/names.py)

PREPARED = Path("data/prepared")
FEATURIZER = Path("featurizer")
MODELS = Path("models")
CHECKPOINTS = Path("checkpoints")
SAMPLES = Path("samples")
REPORTS = Path("reports")
# File names, spelled here once (dvc.yaml spells them too: it cannot import Python)
FID_CSV = REPORTS / "fid.csv"
FID_SUMMARY = REPORTS / "fid_summary.json"
COMPARISONS_CSV = REPORTS / "comparisons.csv"  # ddpm.compare: the question table and the ranking's pairs
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


def model_dir(schedule: str, seed: int) -> Path:
    """models/<schedule>/seed<k>/: the model of one schedule and training seed."""
    return MODELS / schedule / f"seed{int(seed)}"


def checkpoint_dir(schedule: str, seed: int) -> Path:
    """checkpoints/<schedule>/seed<k>/: resume checkpoints (not a DVC output)."""
    return CHECKPOINTS / schedule / f"seed{int(seed)}"


def sample_key(images: np.ndarray) -> str:
    """A short content hash of a sample set: the ``sample_key`` tag that finds its MLflow run."""
    return hashlib.sha256(images.tobytes()).hexdigest()[:16]


def save_arrays(path: Path, **arrays: Any) -> None:
    atomic_save_npz(path, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it (`dvc repro`)")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


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
