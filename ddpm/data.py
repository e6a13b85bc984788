"""Datasets as uint8 arrays, range conversions and image grids.

Conventions used across the package:

* images are numpy ``uint8`` arrays shaped ``[N, C, H, W]`` (C is 1 or 3);
* labels are numpy ``int64`` arrays shaped ``[N]``, or ``None`` for unlabelled data;
* the model works in float ``[-1, 1]`` ("model space", :func:`uint8_to_model`), the seed API
  in float ``[0, 1]`` ("unit space", :func:`uint8_to_unit`).

Datasets (:data:`DATASETS`, loaded by :func:`load_dataset`):

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, works offline);
* ``mnist``, ``fashion_mnist``, ``cifar10``: the torchvision datasets under ``root``
  (downloaded there on first use when the machine has network access);
* ``folder``: a folder of image files, ``root`` being that folder: files with an
  :data:`IMAGE_EXTENSIONS` suffix, recursive, sorted by path, hidden entries skipped. Images in
  class subfolders get labels = index of the sorted top-level subfolder names (like torchvision's
  ImageFolder); a flat folder gets ``labels=None``. Modes are converted to ``channels``
  (default: 1 if every image is grey, else 3; alpha is dropped, 16-bit grey scaled to 8 bits).

Resizing (``image_size``) uses PIL's bilinear filter, which is antialiased when shrinking
(PIL widens the filter support by the scale factor) and plain bilinear interpolation when
enlarging. Channel conversion (``channels``) uses PIL's ``'L'`` (ITU-R 601-2 luma) and
``'RGB'`` (grey replicated) modes.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import pickle
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar, Union

import numpy as np
import torch
from PIL import Image

from ddpm.io import atomic_write_bytes
from ddpm.limits import LimitError, decoded_cap, gib

logger = logging.getLogger(__name__)

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "folder")
SPLITS = ("train", "test")
# Extensions the folder loader picks up (matched case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
# Largest image (width x height) the folder loader decodes: 64 megapixels, about 256 MB as RGBA in
# PIL, one image at a time. Bigger files (decompression bombs: 9000x9000 PNGs are 89 KB) are refused.
MAX_PIXELS = 64 * 2**20

PathLike = Union[str, os.PathLike]
ImageSize = Union[int, Sequence[int]]
ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)

# Single-channel PIL modes; everything else is treated as colour.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


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
        return _load_folder(Path(root), size_hw, channels)
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
        f"python3 -c \"from ddpm.data import load_dataset; "
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


def _list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, hidden entries skipped), sorted by relative path.

    Nothing is opened here. Skipped with one warning per kind: entries that are not regular files
    (a named pipe called ``p.png`` would block a reader forever), symlinks that resolve outside
    ``root`` (a shared folder must not make us read, say, a system file), and symlinked folders
    (not followed)."""
    real_root = root.resolve()
    found: list[Path] = []
    skipped: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            skipped.setdefault("symlinked folders (not followed)", []).append(Path(dirpath) / d)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not os.path.islink(os.path.join(dirpath, d)))
        for fn in filenames:
            p = Path(dirpath) / fn
            if fn.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            why = _unsafe_entry(p, real_root)
            if why:
                skipped.setdefault(why, []).append(p)
            else:
                found.append(p)
    for why, paths in skipped.items():
        logger.warning("dataset 'folder' (%s): skipped %d %s, e.g. %s", root, len(paths), why,
                       ", ".join(str(p) for p in paths[:3]))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _unsafe_entry(p: Path, real_root: Path) -> str | None:
    """Why ``p`` must not be read (None: a regular file inside the folder), from ``lstat``/``stat``
    only: nothing is opened."""
    try:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            if not p.resolve().is_relative_to(real_root):
                return "symlinks pointing outside the folder"
            st = os.stat(p)
    except (OSError, RuntimeError):  # dangling link, loop, permission
        return "unreadable entries (broken symlinks, no permission)"
    return None if stat.S_ISREG(st.st_mode) else "entries that are not regular files (pipes, devices, sockets)"


@contextlib.contextmanager
def _open_image(p: Path) -> Iterator[Image.Image]:
    """Open ``p`` (header only; ``load`` decodes the pixels) after re-checking on the open file that
    it is a regular file, so a pipe swapped in after listing cannot block (O_NONBLOCK); refuse
    images over :data:`MAX_PIXELS` before decoding them."""
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        with Image.open(fh) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"{w}x{h} = {w * h} pixels; allowed: at most {MAX_PIXELS} (ddpm.data.MAX_PIXELS)")
            yield im


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert a PIL image to ``mode`` ('L' or 'RGB'); 16-bit grey is scaled, not clipped."""
    if img.mode.startswith("I;16"):
        arr16 = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray(((arr16 * 255 + 32767) // 65535).astype(np.uint8))
    if img.mode == "P":  # palette (GIF, some PNGs): via RGBA so transparency is handled by PIL
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    return img if img.mode == mode else img.convert(mode)


def _is_gray(img: Image.Image) -> bool:
    """Single-channel mode, or a palette image (GIF) whose colours are all grey."""
    if img.mode == "P":
        rgb = np.asarray(img.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return img.mode in _GRAY_MODES


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """'L' or 'RGB' PIL image -> uint8 [C, H, W]."""
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 [C, H, W] (C in 1, 3) -> 'L' or 'RGB' PIL image."""
    return Image.fromarray(np.ascontiguousarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)))


def _load_folder(root: Path, size_hw: tuple[int, int] | None, channels: int | None) -> ImageData:
    if not root.exists():
        raise FileNotFoundError(f"dataset 'folder': folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset 'folder': {root} is not a folder")
    paths = _list_images(root)
    if not paths:
        raise FileNotFoundError(
            f"dataset 'folder': no image files found in {root} (recursive; looked for "
            f"{', '.join(IMAGE_EXTENSIONS)}, any case)"
        )

    # Labels from the top-level subfolder, like torchvision's ImageFolder.
    rel = [p.relative_to(root) for p in paths]
    top = [p for p in rel if len(p.parts) == 1]
    labels = None
    if len(top) < len(rel):
        if top:
            raise ValueError(
                f"dataset 'folder': {root} has images both at its top level (e.g. {top[0]}) and in "
                f"subfolders; put every image in a class subfolder, or all at the top level"
            )
        classes = sorted({p.parts[0] for p in rel})
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[p.parts[0]] for p in rel], dtype=np.int64)

    # Pass 1, headers only: sizes, modes and the pixel cap, with no pixel decoded (grey palette
    # images excepted: one at a time).
    sizes, modes, gray = [], [], True
    for p in paths:
        with _decode_errors(p), _open_image(p) as im:
            sizes.append((im.height, im.width))
            modes.append(im.mode)
            gray = gray and (im.mode in _GRAY_MODES or (im.mode == "P" and _is_gray(im)))

    # Sizes must agree unless we resize.
    if size_hw is None:
        counts = Counter(sizes)
        if len(counts) > 1:
            examples = {}
            for p, hw in zip(paths, sizes):
                examples.setdefault(hw, p)
            listing = "; ".join(f"{h}x{w}: {n} file(s), e.g. {examples[(h, w)]}" for (h, w), n in counts.most_common())
            raise ValueError(
                f"dataset 'folder': images in {root} have different sizes (HxW) - {listing}. "
                f"Pass image_size to resize them all to one size"
            )

    # Modes: RGB unless every image is grayscale; log any conversion once.
    mode_counts = Counter(modes)
    if channels is None:
        channels = 1 if gray else 3
    target = "L" if channels == 1 else "RGB"
    converted = {m: n for m, n in mode_counts.items() if m != target}
    if converted:
        logger.log(
            logging.WARNING if len(mode_counts) > 1 else logging.INFO,
            "dataset 'folder' (%s): converted %d of %d images to %s (from %s)",
            root, sum(converted.values()), len(paths), target,
            ", ".join(f"{m}: {n}" for m, n in sorted(converted.items())),
        )

    # Pass 2: decode, convert and resize one image at a time into the output array, so memory
    # holds the output plus a single decoded image (itself at most MAX_PIXELS).
    out_h, out_w = size_hw if size_hw is not None else sizes[0]
    total, (cap, how) = len(paths) * channels * out_h * out_w, decoded_cap()
    if total > cap:  # from the headers alone: nothing is decoded yet
        raise LimitError(f"dataset 'folder': {root} holds {len(paths)} images of {channels}x{out_h}x{out_w} that "
                         f"decode to {gib(total)}; allowed: at most {gib(cap)} ({how})")
    out = np.empty((len(paths), channels, out_h, out_w), dtype=np.uint8)
    for i, p in enumerate(paths):
        with _decode_errors(p), _open_image(p) as im:
            out[i] = _decode_one(im, target, (out_h, out_w))
    return ImageData(images=out, labels=labels, name="folder")


@contextlib.contextmanager
def _decode_errors(p: Path):
    """Any failure to read or decode ``p`` becomes one ValueError naming the file."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, bombs...
        raise ValueError(
            f"dataset 'folder': cannot decode image file {p} ({type(err).__name__}: {err}); remove or fix it"
        ) from err


def _decode_one(im: Image.Image, target: str, size_hw: tuple[int, int]) -> np.ndarray:
    """One opened image -> uint8 [C, H, W] in mode ``target`` at ``size_hw``. JPEGs are decoded at a
    reduced scale (``draft``: a power-of-two DCT scale still >= the output size) when shrinking."""
    if (im.height, im.width) != size_hw:
        im.draft(None, (size_hw[1], size_hw[0]))
    im.load()  # first frame for GIFs
    im = _to_mode(im, target)  # convert first so the filter runs on 'L'/'RGB' data
    if (im.height, im.width) != size_hw:
        im = im.resize((size_hw[1], size_hw[0]), resample=Image.Resampling.BILINEAR)
    return _pil_to_array(im)


def _resize_and_convert(images: np.ndarray, size_hw: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """Resize (PIL antialiased bilinear) and/or convert channels of uint8 [N, C, H, W] images."""
    n, c, h, w = images.shape
    if (size_hw is None or size_hw == (h, w)) and (channels is None or channels == c):
        return images
    if size_hw is None and channels == 3 and c == 1:  # exact and fast: PIL 'L'->'RGB' replicates
        return np.ascontiguousarray(np.repeat(images, 3, axis=1))
    target = ("L" if c == 1 else "RGB") if channels is None else ("L" if channels == 1 else "RGB")
    out_h, out_w = size_hw if size_hw is not None else (h, w)
    out = np.empty((n, 1 if target == "L" else 3, out_h, out_w), dtype=np.uint8)
    for i in range(n):
        im = _to_mode(_array_to_pil(images[i]), target)
        if (out_h, out_w) != (h, w):
            im = im.resize((out_w, out_h), resample=Image.Resampling.BILINEAR)
        out[i] = _pil_to_array(im)
    return out


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


# ---------------------------------------------------------------------------------------------
# Range conversions (torch tensors; numpy arrays in -> numpy arrays out)
# ---------------------------------------------------------------------------------------------
def _as_tensor(x: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    if isinstance(x, torch.Tensor):
        return x, False
    raise TypeError(f"expected a torch tensor or numpy array, got {type(x).__name__}")


def _back(x: torch.Tensor, was_numpy: bool) -> Any:
    return x.numpy() if was_numpy else x


def _check_uint8(x: torch.Tensor, fn: str) -> None:
    if x.dtype != torch.uint8:
        raise TypeError(f"{fn} expects uint8 input, got {x.dtype}")


def _check_float(x: torch.Tensor, fn: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{fn} expects float input, got {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError(f"{fn}: input contains NaN")


def uint8_to_model(x: ArrayOrTensor, dtype: torch.dtype = torch.float32) -> ArrayOrTensor:
    """uint8 ``[0, 255]`` -> float ``[-1, 1]``: ``x / 127.5 - 1``."""
    t, was_np = _as_tensor(x)
    _check_uint8(t, "uint8_to_model")
    return _back(t.to(dtype) / 127.5 - 1.0, was_np)


def model_to_uint8(x: ArrayOrTensor) -> ArrayOrTensor:
    """float ``[-1, 1]`` -> uint8: ``round((x + 1) * 127.5)`` clamped to ``[0, 255]``."""
    t, was_np = _as_tensor(x)
    _check_float(t, "model_to_uint8")
    return _back(((t + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8), was_np)


def uint8_to_unit(x: ArrayOrTensor, dtype: torch.dtype = torch.float32) -> ArrayOrTensor:
    """uint8 ``[0, 255]`` -> float ``[0, 1]``: ``x / 255``."""
    t, was_np = _as_tensor(x)
    _check_uint8(t, "uint8_to_unit")
    return _back(t.to(dtype) / 255.0, was_np)


def unit_to_uint8(x: ArrayOrTensor) -> ArrayOrTensor:
    """float ``[0, 1]`` -> uint8: ``round(x * 255)`` clamped to ``[0, 255]``."""
    t, was_np = _as_tensor(x)
    _check_float(t, "unit_to_uint8")
    return _back((t * 255.0).round().clamp(0, 255).to(torch.uint8), was_np)


# ---------------------------------------------------------------------------------------------
# Image grids
# ---------------------------------------------------------------------------------------------
def make_image_grid(
    images: np.ndarray | torch.Tensor, nrow: int | None = None, scale: int = 1, pad: int = 1, pad_value: int = 0
) -> np.ndarray:
    """Tile uint8 ``[N, C, H, W]`` images into one uint8 ``[C, H', W']`` grid.

    ``nrow`` images per row (default ``ceil(sqrt(N))``), each upscaled ``scale`` times by
    nearest neighbour, with ``pad`` pixels of ``pad_value`` between and around the tiles.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(
            f"expected uint8 images [N, C, H, W] with N >= 1 and C in (1, 3), got {images.dtype} {images.shape}"
            " (convert model outputs with model_to_uint8 first)"
        )
    if int(scale) < 1 or int(pad) < 0 or (nrow is not None and int(nrow) < 1):
        raise ValueError(f"need scale >= 1, pad >= 0, nrow >= 1; got scale={scale}, pad={pad}, nrow={nrow}")
    n, c, h, w = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    ncol = min(int(nrow) if nrow is not None else math.ceil(math.sqrt(n)), n)
    nrows = math.ceil(n / ncol)
    grid = np.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), pad_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def save_image_grid(
    images: np.ndarray | torch.Tensor, path: PathLike, nrow: int | None = None, scale: int = 1, pad: int = 1
) -> Path:
    """Write uint8 ``[N, C, H, W]`` images as one PNG grid (atomically) and return the path.

    See :func:`make_image_grid`; the file is ``ncol * (W * scale + pad) + pad`` pixels wide and
    ``nrows * (H * scale + pad) + pad`` high.
    """
    grid = make_image_grid(images, nrow=nrow, scale=scale, pad=pad)
    img = _array_to_pil(grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
