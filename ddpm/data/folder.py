"""An image folder as a dataset, read as untrusted input: ``root`` is that folder: files with an
:data:`IMAGE_EXTENSIONS` suffix, recursive, sorted by path, hidden entries skipped, symlinks out of the folder
refused, images above :data:`MAX_PIXELS` refused from their header. Images in class subfolders get labels =
index of the sorted top-level subfolder names (like torchvision's ImageFolder); a flat folder gets
``labels=None``. Modes are converted to ``channels`` (default: 1 if every image is grey, else 3; alpha is
dropped, 16-bit grey scaled to 8 bits).
"""
from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ddpm.limits import LimitError, decoded_cap, gib

from ddpm.data.convert import _GRAY_MODES, _is_gray, _pil_to_array, _to_mode

logger = logging.getLogger(__name__)


# Extensions the folder loader picks up (matched case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
# Largest image (width x height) the folder loader decodes: 64 megapixels, about 256 MB as RGBA in
# PIL, one image at a time. Bigger files (decompression bombs: 9000x9000 PNGs are 89 KB) are refused.
MAX_PIXELS = 64 * 2**20


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
                raise ValueError(f"{w}x{h} = {w * h} pixels; allowed: at most {MAX_PIXELS} (ddpm.data.folder.MAX_PIXELS)")
            yield im


def load_folder(root: Path, size_hw: tuple[int, int] | None, channels: int | None
                ) -> tuple[np.ndarray, np.ndarray | None]:
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
    return out, labels


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
