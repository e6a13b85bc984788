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

from .io import atomic_save_npz, atomic_write_json

PREPARED = Path("data/prepared")
FEATURIZER = Path("featurizer")
MODELS = Path("models")
CHECKPOINTS = Path("checkpoints")
SAMPLES = Path("samples")
REPORTS = Path("reports")


def sampler_label(name: str, eta: float) -> str:
    """A file-safe name of a step rule: ``ddpm``, ``ddpm_large``, ``ddim-eta0``, ``ddim-eta0.5``."""
    return f"ddim-eta{eta:g}" if name == "ddim" else name


def sample_path(schedule: str, *args: Any) -> Path:
    """samples/<schedule>/<name>-eta<eta>-<steps>.npz, spelt as dvc.yaml's matrix interpolates it.

    SHIM (trust branch only, drop at merge for struct-train's contract-1 version): also accepts
    (schedule, seed, name, eta, steps); with one training seed the files stay where they were."""
    name, eta, steps = args[-3:]
    return SAMPLES / schedule / f"{name}-eta{float(eta)!r}-{steps}.npz"


def model_dir(schedule: str) -> Path:
    return MODELS / schedule


def train_run_id(schedule: str, seed: int | None = None) -> str | None:  # seed: contract-1 shim
    """The MLflow run id of a schedule's training run (from its train.json), None when unknown."""
    info = model_dir(schedule) / "train.json"
    return read_json(info).get("mlflow_run_id") if info.is_file() else None


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
