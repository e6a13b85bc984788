"""Resource limits: a memory budget, sizes estimated from descriptions, and bounded reads of ``.npz`` files.

Everything here decides from numbers (params, a model file's description, zip and ``.npy`` headers) before
anything large is allocated, so a hostile or mistaken input fails with one line instead of reaching the
allocator. No torch import: ``ddpm.app.config`` uses it.

Settings (environment variables, so a machine's owner sets them once for every stage and the library):

- ``DDPM_MEMORY_BUDGET_GB``: the memory a model may need (weights, optimizer state, EMA and activations at the
  batch). Default: 75% of this machine's memory (``/proc/meminfo`` or ``os.sysconf``, lowered to a cgroup's
  ``memory.max`` when one is set).
- ``DDPM_MAX_DECODED_GB``: what one ``.npz`` (the keys read) or one image folder may decode to. Default: 4 GiB,
  or the memory budget when that is smaller.

An environment variable rather than a params key: the limit belongs to the machine, not to the experiment, and
a params key would enter ``dvc.lock`` and rerun stages when the same experiment moves to a bigger machine.
"""
from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

GiB = 2**30
BUDGET_ENV = "DDPM_MEMORY_BUDGET_GB"
DECODED_ENV = "DDPM_MAX_DECODED_GB"
BUDGET_FRACTION = 0.75
DEFAULT_MAX_DECODED = 4 * GiB
FLOAT_BYTES = 4  # float32 weights and activations (bf16 autocast needs less: the estimate stays an upper bound)


class LimitError(ValueError):
    """An input whose size would exceed a limit (one line: the file or key, what it holds, what is allowed)."""


# --- the budgets -----------------------------------------------------------------------------------------
def machine_memory() -> Optional[int]:
    """Bytes of memory this process may use: MemTotal (or the page count), lowered to a cgroup v2/v1 limit."""
    total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    for cg in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(cg).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
    return total


def _env_gb(name: str) -> Optional[int]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise LimitError(f"environment variable {name}: got {raw!r}; allowed: a number of GB > 0 (e.g. 64)")
    return int(gb * GiB)


def memory_budget() -> tuple[int, str]:
    """(bytes, how it was set): ``DDPM_MEMORY_BUDGET_GB``, else 75% of the machine's memory (16 GiB if unknown)."""
    set_ = _env_gb(BUDGET_ENV)
    if set_ is not None:
        return set_, f"{BUDGET_ENV}={os.environ[BUDGET_ENV].strip()}"
    total = machine_memory()
    if total is None:
        return 16 * GiB, f"16 GiB (machine memory unknown); {BUDGET_ENV} sets it"
    return int(BUDGET_FRACTION * total), (f"{BUDGET_FRACTION:.0%} of this machine's {total / GiB:.1f} GiB; "
                                          f"{BUDGET_ENV} raises it")


def decoded_cap() -> tuple[int, str]:
    """(bytes, how it was set): what one ``.npz`` or image folder may decode to."""
    set_ = _env_gb(DECODED_ENV)
    if set_ is not None:
        return set_, f"{DECODED_ENV}={os.environ[DECODED_ENV].strip()}"
    budget, _ = memory_budget()
    return min(DEFAULT_MAX_DECODED, budget), f"the default; {DECODED_ENV} raises it"


def gib(n: float) -> str:
    """Bytes for a message: ``512 MiB``, ``17.7 GiB``, ``3,320 GiB``."""
    if n < 2**20:
        return f"{int(n):,} bytes"
    if n < GiB / 10:
        return f"{n / 2**20:.3g} MiB"
    return f"{n / GiB:.3g} GiB" if n < 1000 * GiB else f"{n / GiB:,.0f} GiB"


def count(n: float) -> str:
    """``220.5 k``, ``8.83 M``, ``126.3 G``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return str(int(n))


def check_budget(need: int, what: str) -> Optional[str]:
    """None if ``need`` bytes fit the memory budget, else the problem as one line (``what`` names the input)."""
    budget, how = memory_budget()
    if need <= budget:
        return None
    return f"{what} needs about {gib(need)}; allowed: at most the memory budget of {gib(budget)} ({how})"


# --- the U-Net's size from its description (ddpm/nn/unet.py's layout, no module built) ----------------------
def _conv(k: int, a: int, b: int) -> int:
    return k * k * a * b + b


def _res(a: int, b: int, tdim: int) -> int:  # GN, conv3x3, time projection, GN, conv3x3, 1x1 skip
    return 2 * a + _conv(3, a, b) + tdim * 2 * b + 2 * b + 2 * b + _conv(3, b, b) + (_conv(1, a, b) if a != b else 0)


def _attn(c: int, inner: int) -> int:  # GN, qkv (no bias), out
    return 2 * c + c * 3 * inner + inner * c + c


def unet_size(config: dict[str, Any], hw: Sequence[int]) -> dict[str, int]:
    """``params`` (the exact count of :class:`ddpm.nn.unet.Unet` with this ``config``), and the float32 values per
    image that a training step keeps for its backward (``train_floats``) and that a sampling forward holds at its
    peak (``sample_floats``) at image size ``hw``: a conservative per-layer count (every op's input kept; every
    attention score map materialised)."""
    dim, mults = int(config["dim"]), [int(m) for m in config["dim_mults"]]
    init = int(config.get("init_dim") or dim)
    ch = int(config.get("channels", 3))
    out = int(config.get("out_dim") or ch)
    heads, dh = int(config.get("attn_heads", 4)), int(config.get("attn_dim_head", 32))
    inner, tdim, levels = heads * dh, 4 * dim, len(mults)
    full = config.get("full_attn")
    full = [False] * (levels - 1) + [True] if full is None else ([bool(full)] * levels if isinstance(full, bool)
                                                                else [bool(a) for a in full])
    half = max(dim // 2, 1)
    params = (_conv(3, ch, init) + (2 * half * tdim + tdim) + (tdim * tdim + tdim)
              + _res(2 * init, init, tdim) + _conv(1, init, out))
    dims = [init, *(dim * m for m in mults)]
    hw_ = [int(hw[0]) * int(hw[1]) // 4**i for i in range(levels)]
    train = sample_peak = 0
    skips = init * hw_[0]

    def res_act(a: int, b: int, n: int) -> tuple[int, int]:  # (kept for backward, held while sampling)
        return (4 * a + 8 * b) * n, (4 * a + 6 * b) * n

    def attn_act(c: int, n: int) -> tuple[int, int]:
        return (3 * c + 5 * inner) * n + 2 * heads * n * n, (2 * c + 3 * inner) * n + heads * n * n

    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        n = hw_[i]
        params += 2 * _res(a, a, tdim) + (_attn(a, inner) if full[i] else 0) + _conv(3, a, b)
        t, s = res_act(a, a, n)
        ta, sa = attn_act(a, n) if full[i] else (0, 0)
        train, sample_peak, skips = train + 2 * t + ta + 2 * a * n, max(sample_peak, s, sa), skips + 2 * a * n
    mid, n = dims[-1], hw_[-1]
    params += 2 * _res(mid, mid, tdim) + _attn(mid, inner)
    t, s = res_act(mid, mid, n)
    ta, sa = attn_act(mid, n)
    train, sample_peak = train + 2 * t + ta, max(sample_peak, s, sa)
    for i, (a, b) in enumerate(reversed(list(zip(dims[:-1], dims[1:])))):
        n = hw_[levels - 1 - i]
        params += 2 * _res(b + a, b, tdim) + (_attn(b, inner) if full[levels - 1 - i] else 0) + _conv(3, b, a)
        t, s = res_act(b + a, b, n)
        ta, sa = attn_act(b, n) if full[levels - 1 - i] else (0, 0)
        train, sample_peak = train + 2 * t + ta + 4 * b * n, max(sample_peak, s, sa)
    t, s = res_act(2 * init, init, hw_[0])
    train, sample_peak = train + t + (ch + out) * hw_[0], max(sample_peak, s)
    return {"params": params, "train_floats": train, "sample_floats": skips + sample_peak + 4 * ch * hw_[0]}  # + x_t, noise, output


def training_bytes(size: dict[str, int], batch: int, processes: int = 1) -> int:
    """Weights, gradients, AdamW's two moments and the EMA copy in every process, plus activations of the
    micro-batches that run at once (``batch`` images in total over the processes)."""
    return FLOAT_BYTES * (5 * size["params"] * processes + size["train_floats"] * batch)


def sampling_bytes(size: dict[str, int], batch: int, processes: int = 1) -> int:
    """Weights and the sampling forward's peak at ``batch`` images, in every process."""
    return FLOAT_BYTES * processes * (size["params"] + size["sample_floats"] * batch)


# --- bounded .npz reads ----------------------------------------------------------------------------------
def npz_headers(path: str | os.PathLike, keys: Optional[Sequence[str]] = None) -> dict[str, tuple[tuple, np.dtype]]:
    """{key: (shape, dtype)} of the arrays ``keys`` (all when None) of an ``.npz``, read from the zip directory
    and each member's ``.npy`` header only. Refuses (LimitError naming the file) a missing key, a header that
    claims more bytes than its member holds, or a total over :func:`decoded_cap`, before any array is read."""
    path = Path(path)
    cap, how = decoded_cap()
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise LimitError(f"{path}: not a readable .npz ({type(err).__name__}: {err})") from err
    with zf:
        members = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        wanted = list(members) if keys is None else list(keys)
        missing = [k for k in wanted if k not in members]
        if missing:
            raise LimitError(f"{path}: no array {missing[0]!r}; found: {', '.join(members) or 'none'}")
        stored = sum(members[k].file_size for k in wanted)
        if stored > cap:
            raise LimitError(f"{path}: arrays {', '.join(wanted)} decompress to {gib(stored)}; allowed: at most "
                             f"{gib(cap)} ({how})")
        return {k: _npy_header(zf, members[k], path) for k in wanted}


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> tuple[tuple, np.dtype]:
    key = info.filename[:-4]
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f".npy version {version}")
            shape, _, dtype = read[version](f, max_header_size=10_000)
            data = info.file_size - f.tell()
    except Exception as err:  # noqa: BLE001 - a corrupt header in any way
        raise LimitError(f"{path}: array {key!r} has no readable .npy header ({type(err).__name__}: {err})") from err
    if dtype.hasobject:
        raise LimitError(f"{path}: array {key!r} holds Python objects (dtype {dtype}); allowed: plain numeric arrays")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != data:
        raise LimitError(f"{path}: array {key!r} claims shape {list(shape)} of {dtype} ({gib(nbytes)}) but its "
                         f"member holds {data} bytes of data; allowed: a header that matches its data")
    return tuple(shape), dtype


def load_npz(path: str | os.PathLike, keys: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (all when None) of an ``.npz``, after :func:`npz_headers` bounded what they decode to;
    other keys are never read. No pickle."""
    npz_headers(path, keys)
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in (f.files if keys is None else keys)}
