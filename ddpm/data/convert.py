"""Pixel conversions: uint8 <-> model range [-1, 1] and unit range [0, 1] (torch tensors; numpy arrays in ->
numpy arrays out), PIL mode and size conversion of uint8 batches, and image grids.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import torch
from PIL import Image

from ddpm.io import atomic_write_bytes

PathLike = Union[str, os.PathLike]
ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


# Single-channel PIL modes; everything else is treated as colour.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


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
