"""Datasets as uint8 arrays: the digits, MNIST, Fashion-MNIST and CIFAR-10 loaders, the image-folder
entry point, and the held-out split.

Conventions used across the package:

* images are numpy ``uint8`` arrays shaped ``[N, C, H, W]`` (C is 1 or 3);
* labels are numpy ``int64`` arrays shaped ``[N]``, or ``None`` for unlabelled data;
* the model works in float ``[-1, 1]`` ("model space", :func:`ddpm.data.convert.uint8_to_model`), the seed
  API in float ``[0, 1]`` ("unit space", :func:`ddpm.data.convert.uint8_to_unit`).

Datasets (:data:`DATASETS`, loaded by :func:`load_dataset`):

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, works offline);
* ``mnist``, ``fashion_mnist``, ``cifar10``: the torchvision datasets under ``root``
  (downloaded there on first use when the machine has network access);
* ``folder``: a folder of image files (:mod:`ddpm.data.folder`).

Resizing (``image_size``) uses PIL's bilinear filter, which is antialiased when shrinking
(PIL widens the filter support by the scale factor) and plain bilinear interpolation when
enlarging. Channel conversion (``channels``) uses PIL's ``'L'`` (ITU-R 601-2 luma) and
``'RGB'`` (grey replicated) modes.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch


from ddpm.data.convert import PathLike, _resize_and_convert
from ddpm.data.folder import load_folder

logger = logging.getLogger(__name__)


DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "folder")
SPLITS = ("train", "test")


ImageSize = Union[int, Sequence[int]]


# ---------------------------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------------------------
@dataclass
class ImageData:
    """A dataset in memory: ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]`` or None."""

    images: np.ndarray
    labels: np.ndarray | None
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"ImageData.images must be a numpy uint8 array [N, C, H, W], got "
                f"{type(self.images).__name__} {getattr(self.images, 'dtype', '')} "
                f"shape {getattr(self.images, 'shape', '')}"
            )
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (len(self.images),):
                raise ValueError(
                    f"ImageData.labels must have shape ({len(self.images)},), got {self.labels.shape}"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def height(self) -> int:
        return int(self.images.shape[2])

    @property
    def width(self) -> int:
        return int(self.images.shape[3])

    @property
    def hw(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.height, self.width

    @property
    def image_size(self) -> int:
        """Side of the (square) images; raises for non-square images (use :attr:`hw`)."""
        if self.height != self.width:
            raise ValueError(f"{self.name}: images are {self.height}x{self.width}, not square; use .hw")
        return self.height

    @property
    def num_classes(self) -> int | None:
        """``max(label) + 1``, or None without labels."""
        if self.labels is None:
            return None
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def subset(self, idx: np.ndarray | Sequence[int]) -> "ImageData":
        """The images (and labels) at ``idx``, e.g. an index array from :func:`split_holdout`."""
        idx = np.asarray(idx, dtype=np.int64)
        labels = None if self.labels is None else self.labels[idx]
        return ImageData(images=self.images[idx], labels=labels, name=self.name)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_dataset(
    name: str,
    root: PathLike = "data/raw",
    image_size: ImageSize | None = None,
    channels: int | None = None,
    *,
    split: str = "train",
    download: bool = True,
) -> ImageData:
    """Load dataset ``name`` (one of :data:`DATASETS`) as uint8 ``[N, C, H, W]`` images.

    ``root``: where torchvision datasets live (``<root>/MNIST/raw``, ``<root>/FashionMNIST/raw``,
    ``<root>/cifar-10-batches-py``); for ``folder`` it is the image folder itself.
    ``image_size``: int (square) or ``(H, W)``; resizes with PIL antialiased bilinear.
    ``channels``: 1 (grayscale, PIL ``'L'``) or 3 (``'RGB'``); None keeps the dataset's own.
    ``split``: ``"train"`` or ``"test"`` for mnist / fashion_mnist / cifar10 (digits and folder
    have a single split; use :func:`split_holdout`).
    ``download``: allow torchvision to download missing files (needs network access).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    size_hw = _parse_image_size(image_size)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None, got {channels!r}")
    if name in ("digits", "folder") and split != "train":
        raise ValueError(f"dataset {name!r} has a single split; got split={split!r} (use split_holdout)")

    if name == "folder":  # resizes/converts per file, as sizes and modes may differ
        images, labels = load_folder(Path(root), size_hw, channels)
        return ImageData(images=images, labels=labels, name="folder")
    if name == "digits":
        images, labels = _load_digits()
    elif name in ("mnist", "fashion_mnist"):
        images, labels = _load_torchvision_mnist(name, Path(root), split, download)
    else:
        images, labels = _load_cifar10(Path(root), split, download)
    images = _resize_and_convert(images, size_hw, channels)
    return ImageData(images=images, labels=labels, name=name)


def _parse_image_size(image_size: ImageSize | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        hw = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in image_size)
    ):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    if min(hw) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return hw


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Values 0..16 count "ink" pixels: high = ink, so bright-on-dark like MNIST; no inversion.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, np.asarray(bunch.target, dtype=np.int64)


_MNIST_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _mnist_raw_files() -> list[str]:
    return [f"{p}-{k}-idx{d}-ubyte" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]


def _missing_data_error(name: str, folder: Path, files: Sequence[str], err: BaseException | None) -> FileNotFoundError:
    reason = f"download failed: {type(err).__name__}: {err}" if err is not None else "download=False"
    return FileNotFoundError(
        f"dataset {name!r}: files not found in {folder} (expected {', '.join(files)}; {reason}). "
        f"To get them, run once on a machine with network access: "
        f"python3 -c \"from ddpm.data.datasets import load_dataset; "
        f"load_dataset('{name}', root='{_folder_root(name, folder)}')\" "
        f"and copy the resulting {folder} folder to this machine, or copy the files into {folder} yourself."
    )


def _folder_root(name: str, folder: Path) -> Path:
    """The ``root`` that puts dataset ``name``'s files in ``folder`` (inverse of the layout)."""
    if name in _MNIST_CLASSES:  # <root>/MNIST/raw
        return folder.parent.parent
    return folder.parent  # <root>/cifar-10-batches-py


def _load_torchvision_mnist(name: str, root: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    from torchvision import datasets

    cls = getattr(datasets, _MNIST_CLASSES[name])
    raw = root / _MNIST_CLASSES[name] / "raw"
    train = split == "train"
    try:  # torchvision only checks the raw idx files exist, then parses them
        ds = cls(str(root), train=train, download=False)
    except Exception as err:  # noqa: BLE001 - torchvision raises RuntimeError/AssertionError/...
        missing = [f for f in _mnist_raw_files() if not (raw / f).is_file()]
        if not missing:
            raise ValueError(f"dataset {name!r}: cannot read the idx files in {raw}: {err}") from err
        if not download:
            raise _missing_data_error(name, raw, missing, None) from err
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as derr:  # noqa: BLE001 - offline: URLError, RuntimeError, OSError...
            raise _missing_data_error(name, raw, missing, derr) from derr
    images = ds.data.numpy().astype(np.uint8, copy=False)[:, None]
    return np.ascontiguousarray(images), ds.targets.numpy().astype(np.int64)


_CIFAR_FOLDER = "cifar-10-batches-py"


def _cifar_files(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays (the CIFAR pickles hold nothing else)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: dict with ``data`` uint8 [n, 3072] and ``labels`` [n]."""
    try:
        with open(path, "rb") as f:
            entry = _NumpyUnpickler(f, encoding="latin1").load()
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data = np.asarray(entry["data"])
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except Exception as err:  # noqa: BLE001 - pickle/KeyError/AttributeError...
        raise ValueError(f"cifar10: cannot read batch file {path}: {type(err).__name__}: {err}") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(
            f"cifar10: {path} is not a CIFAR-10 batch: data {data.dtype} {data.shape} "
            f"(expected uint8 [n, 3072]), labels {labels.shape}"
        )
    # Each row is the R plane, then G, then B, each 32x32 row-major: already CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    folder = root / _CIFAR_FOLDER
    files = _cifar_files(split)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        if not download:
            raise _missing_data_error("cifar10", folder, missing, None)
        from torchvision import datasets

        try:  # torchvision downloads, extracts and md5-checks the archive
            datasets.CIFAR10(str(root), train=split == "train", download=True)
        except Exception as err:  # noqa: BLE001
            raise _missing_data_error("cifar10", folder, missing, err) from err
    # Read the documented pickle format ourselves (torchvision would insist on the md5 sums).
    parts = [_read_cifar_batch(folder / f) for f in files]
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    return images, np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# Holdout split
# ---------------------------------------------------------------------------------------------
def split_holdout(
    labels_or_n: np.ndarray | torch.Tensor | Sequence[int] | int,
    fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into ``(train_idx, holdout_idx)``, both sorted int64.

    ``labels_or_n``: an int N (plain random split) or labels ``[N]`` (stratified: each class
    keeps its share, per-class counts by largest remainder). The holdout holds
    ``round(fraction * N)`` items, at least 1 and at most N - 1. Deterministic given ``seed``
    (its own ``np.random.default_rng``; the global RNG is never touched).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, np.integer)) or not (
        0.0 < float(fraction) < 1.0
    ):
        raise ValueError(f"holdout_fraction must be a number in (0, 1), got {fraction!r}")
    fraction = float(fraction)
    if isinstance(labels_or_n, (int, np.integer)) and not isinstance(labels_or_n, bool):
        n, labels = int(labels_or_n), None
    else:
        if isinstance(labels_or_n, torch.Tensor):
            labels_or_n = labels_or_n.detach().cpu().numpy()
        labels = np.asarray(labels_or_n)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
        n = len(labels)
    if n < 2:
        raise ValueError(f"need at least 2 items to split off a holdout, got {n}")
    rng = np.random.default_rng(seed)
    k = min(max(round(fraction * n), 1), n - 1)

    if labels is None:
        holdout = rng.permutation(n)[:k]
    else:
        classes, inverse = np.unique(labels, return_inverse=True)
        counts = np.bincount(inverse, minlength=len(classes))
        quota = counts * (k / n)
        take = np.floor(quota).astype(np.int64)
        # Largest remainders get the leftover slots (ties: bigger class, then class order).
        order = np.lexsort((np.arange(len(classes)), -counts, -(quota - take)))
        take[order[: k - int(take.sum())]] += 1
        holdout = np.concatenate(
            [rng.permutation(np.flatnonzero(inverse == c))[: take[c]] for c in range(len(classes))]
        )
    mask = np.zeros(n, dtype=bool)
    mask[holdout] = True
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)
