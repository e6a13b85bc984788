"""Fused CPU kernels: GroupNorm + scale-shift + SiLU in one pass, and attention at 16 positions (forward, and
backward for training); and two convolution kernels for AVX2 CPUs, where oneDNN leaves speed behind: the weight
gradient of training's 3x3 convolutions, and sampling's 3x3 convolutions by Winograd's F(2x2, 3x3).

On a CPU a sampling forward spends about a third of its time outside the convolutions, and a training step
about a quarter, in chains of small memory-bound passes (GroupNorm's statistics, the normalisation, the
scale-shift, SiLU, their backwards, attention's tiny batched products) that eager PyTorch cannot fuse and
inductor fuses into slower code here (docs/performance.md). ``kernels.c`` does each chain in one pass per
image. At AVX2 oneDNN's backward of a convolution's weights runs at 81-132 GFLOP/s where its forward runs at
190-220, and the forward is near the CPU's peak, so only fewer multiplications make it faster
(``ddpm.nn.ops.conv2d`` chooses; oneDNN keeps both at AVX-512).
The library is built with the system C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; with OpenMP, ``-O3``)
for one x86 instruction-set level, chosen when the library is loaded: the widest that the CPU runs
(``avx512``: ``-march=x86-64-v4``; ``avx2``: ``-march=x86-64-v3``; ``sse``: ``-march=x86-64-v2``), or the one
``$DDPM_KERNEL_ISA`` names (``native`` for ``-march=native``, the only choice on other architectures). So
every CPU of a level runs the same library whichever machine built it, and the AVX2 and AVX-512 builds
compute the same bits (lane-wise code, the same fused multiply-adds; tests/test_kernels.py). The build goes into a cache folder (``$DDPM_KERNEL_CACHE``,
else ``$XDG_CACHE_HOME/ddpm/kernels`` or ``~/.cache/ddpm/kernels``) under a name that hashes the source, the
compiler and the flags (and the CPU, for ``native``), and is loaded with ``ctypes``.

Where it cannot be built (no compiler, no OpenMP), with ``DDPM_CPU_KERNELS=0``, or after :func:`disable` (the
pipeline's ``fast: false``), :func:`library` returns None (a failed build says so once, as a warning) and every
caller keeps its PyTorch path: the same maths, rounded differently in the last bits. Since they change the
bits, :func:`kernel_record` says whether they ran in this process and for which instruction set; every
exported model file and every training and sampling run records it. The kernels take float32 channels_last maps on a CPU outside ``torch.compile``; anything else
(CUDA, bf16 autocast, NCHW) keeps PyTorch's ops.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["group_norm_act", "group_norm_act_train", "attention16", "attention16_train", "conv3x3", "conv3x3_train",
           "library", "disable", "kernel_record"]

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fPIC"]
# x86 levels, widest first: the CPU flags each needs (Linux /proc/cpuinfo names) and its -march
LEVELS = {"avx512": ({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}, "x86-64-v4"),
          "avx2": ({"avx2", "fma", "bmi2", "f16c", "movbe"}, "x86-64-v3"),
          "sse": ({"sse4_2", "popcnt", "ssse3"}, "x86-64-v2")}
_state: dict[str, object] = {}  # "lib": the library or None, once tried; "why": why None; "calls": how many ran


def _compiler() -> str | None:
    return next((path for cc in (os.environ.get("CC"), "cc", "gcc", "clang") if cc and (path := shutil.which(cc))), None)


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def target() -> tuple[str, str]:
    """(level, -march) the kernels are built for here: ``$DDPM_KERNEL_ISA`` (avx512, avx2, sse or native) where
    set, else the widest x86 level this CPU runs; ``native`` off x86. A level the CPU lacks raises ValueError."""
    asked = os.environ.get("DDPM_KERNEL_ISA", "").strip().lower() or None
    if asked not in (None, "native", *LEVELS):
        raise ValueError(f"DDPM_KERNEL_ISA={asked!r}: allowed are native, {', '.join(LEVELS)}")
    if asked == "native" or not _is_x86():
        return "native", "native"
    have = set(_cpu_id().split())
    runs = [lvl for lvl, (need, _) in LEVELS.items() if need <= have]
    if asked is not None and asked not in runs:
        raise ValueError(f"DDPM_KERNEL_ISA={asked}: this CPU runs only {', '.join(runs) or 'baseline x86-64'}")
    level = asked or (runs[0] if runs else "native")
    return level, LEVELS[level][1] if level in LEVELS else "native"


def _cache_dir() -> Path:
    if os.environ.get("DDPM_KERNEL_CACHE"):
        return Path(os.environ["DDPM_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpm" / "kernels"


def _build(cc: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file beside ``target``, renamed into place only when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        lib = Path(tmp) / "kernels.so"
        cmd = [cc, *flags, "-shared", str(SOURCE), "-o", str(lib), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-600:]}")
        os.replace(lib, target)


def _off(why: str) -> None:
    _state["why"] = why


def _load() -> ctypes.CDLL | None:
    if os.environ.get("DDPM_CPU_KERNELS", "1") == "0":
        return _off("DDPM_CPU_KERNELS=0")
    cc = _compiler()
    if cc is None:
        log.warning("ddpm.nn.kernels: no C compiler ($CC, cc, gcc or clang) found; training and sampling keep PyTorch's ops")
        return _off("no C compiler")
    try:
        level, march = target()
        flags = [*FLAGS, f"-march={march}"]
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(encoding="utf-8"), version, " ".join(flags), platform.machine(),
                                        _cpu_id() if march == "native" else ""]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"kernels-{level}-{key}.so"
        if not path.is_file():
            _build(cc, flags, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        log.warning("ddpm.nn.kernels: could not build the CPU kernels (%s); training and sampling keep PyTorch's ops", e)
        return _off(f"build failed: {str(e)[:200]}")
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.ddpm_group_norm_act.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ctypes.c_float, c_int,
                                        ptr, ptr, c_int]
    lib.ddpm_group_norm_act_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64,
                                                 c_int, ptr, ptr, ptr, c_int]
    lib.ddpm_attention16.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_float, c_int]
    lib.ddpm_attention16_backward.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_float, c_int]
    lib.ddpm_conv3x3_weight_grad.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, c_int]
    lib.ddpm_conv3x3_winograd.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, c_int]
    lib.ddpm_isa.argtypes, lib.ddpm_isa.restype = [], ctypes.c_char_p
    lib.ddpm_flush_denormals.argtypes = [c_int]
    for f in (lib.ddpm_group_norm_act, lib.ddpm_group_norm_act_backward, lib.ddpm_attention16,
              lib.ddpm_attention16_backward, lib.ddpm_conv3x3_weight_grad, lib.ddpm_conv3x3_winograd,
              lib.ddpm_flush_denormals):
        f.restype = c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The kernels, built on first use; None where they cannot be (said once, as a warning)."""
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def disable(why: str) -> None:
    """Keep PyTorch's ops for the rest of this process (the pipeline's ``fast: false``); ``why`` is recorded."""
    _state["lib"] = None
    _off(why)


def flush_denormals() -> bool:
    """Subnormal floats flushed to zero on the CPU threads this process computes on: the calling thread
    (``torch.set_flush_denormal``) and every thread of the OpenMP pool that PyTorch's and oneDNN's parallel
    regions run on (``ddpm_flush_denormals``: a thread's flag is its own). On x86 an operation on a subnormal
    costs about a hundred cycles. Values below 1.2e-38 become 0: on the default run every model and sample set
    came out bit-identical, and the train and sample stages ran 8% and 13% faster
    (benchmarks/results/flush_denormals_avx2.md).
    Call after ``torch.set_num_threads``. Returns whether every thread took it (False off x86, or without the
    kernels: then only the calling thread); recorded by :func:`kernel_record`."""
    main = torch.set_flush_denormal(True)
    lib = library()
    pool = lib is not None and lib.ddpm_flush_denormals(torch.get_num_threads()) == torch.get_num_threads()
    _state["flush_denormals"] = bool(main and pool)
    return bool(_state["flush_denormals"])


def kernel_record(device: torch.device | str = "cpu") -> dict[str, object]:
    """Whether the fused kernels ran in this process (for a model on ``device``) and for which instruction set:
    ``{"fused_kernels": bool, "isa": "avx512" | "avx2" | ... | None, "aten_isa": PyTorch's own CPU kernels'
    set ("AVX512", "AVX2", "DEFAULT"), "flush_denormals": whether :func:`flush_denormals` set every CPU thread,
    "reason": why not (only when they did not run)}``."""
    rec: dict[str, object] = {"fused_kernels": False, "isa": None, "aten_isa": torch.backends.cpu.get_cpu_capability(),
                              "flush_denormals": bool(_state.get("flush_denormals", False))}
    lib = _state.get("lib")
    if lib is not None:
        rec["isa"] = lib.ddpm_isa().decode()
    if torch.device(device).type != "cpu":
        rec["reason"] = f"{torch.device(device).type} device: PyTorch's ops"
    elif _state.get("calls"):
        rec["fused_kernels"] = True
    elif "lib" in _state and lib is None:
        rec["reason"] = str(_state.get("why", "unavailable"))
    else:
        rec["reason"] = "no call applied (they take float32 channels_last maps outside torch.compile)"
    return rec


def _ran(out: torch.Tensor) -> torch.Tensor:
    _state["calls"] = int(_state.get("calls", 0)) + 1  # type: ignore[call-overload]
    return out


def _cpu_f32(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)


def _applies(x: torch.Tensor, norm: torch.nn.GroupNorm, scale_shift: torch.Tensor | None) -> bool:
    """The shapes, layout and dtypes the GroupNorm kernels take (not the grad mode)."""
    if (torch.compiler.is_compiling() or x.ndim != 4 or not x.is_contiguous(memory_format=torch.channels_last)
            or norm.weight is None or norm.bias is None or not _cpu_f32(x, norm.weight, norm.bias)):
        return False
    b, c = x.shape[:2]
    return scale_shift is None or (scale_shift.shape in ((1, 2 * c), (b, 2 * c)) and _cpu_f32(scale_shift))


def _ss_args(scale_shift: torch.Tensor | None, c: int) -> tuple[int | None, int | None, int]:
    """The kernels' scale, shift and row-stride arguments for a contiguous [1 or B, 2C] scale_shift (or None)."""
    if scale_shift is None:
        return None, None, 0
    ptr = scale_shift.data_ptr()
    return ptr, ptr + 4 * c, 0 if scale_shift.shape[0] == 1 else 2 * c


def _gn_forward(x, weight, bias, scale_shift, groups, eps, silu, stats: bool):
    b, c, h, w = x.shape
    y = torch.empty_like(x)
    mean, rstd = (x.new_empty(b, groups), x.new_empty(b, groups)) if stats else (None, None)
    rc = library().ddpm_group_norm_act(
        x.data_ptr(), y.data_ptr(), b, h * w, c, groups, weight.data_ptr(), bias.data_ptr(),
        *_ss_args(scale_shift, c), eps, int(silu), None if mean is None else mean.data_ptr(),
        None if rstd is None else rstd.data_ptr(), torch.get_num_threads())
    if rc:
        raise MemoryError("ddpm.nn.kernels: the GroupNorm kernel could not allocate its scratch")
    return y, mean, rstd


def group_norm_act(x: torch.Tensor, norm: torch.nn.GroupNorm, scale_shift: torch.Tensor | None = None,
                   silu: bool = True) -> torch.Tensor | None:
    """``act(norm(x) * (1 + scale) + shift)`` for a channels_last ``x`` [B, C, H, W], where ``scale_shift`` is
    None or [1 or B, 2C] (scale, then shift: the time projection's output), without grads (sampling). None
    where the kernel does not apply (another layout or dtype, a GroupNorm without affine, grads, no
    library): the caller computes it."""
    if torch.is_grad_enabled() or not _applies(x, norm, scale_shift) or library() is None:
        return None
    ss = scale_shift.contiguous() if scale_shift is not None else None
    return _ran(_gn_forward(x, norm.weight, norm.bias, ss, norm.num_groups, norm.eps, silu, stats=False)[0])


class _GroupNormAct(torch.autograd.Function):
    """y = act(GroupNorm(x) * (1 + scale) + shift) with the kernels' forward and backward. Saves x and the
    per-group statistics (not the normalised map): the backward recomputes the pre-activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale_shift, groups: int, eps: float, silu: bool):
        y, mean, rstd = _gn_forward(x, weight, bias, scale_shift, groups, eps, silu, stats=True)
        ctx.save_for_backward(x, weight, bias, scale_shift, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, scale_shift, mean, rstd = ctx.saved_tensors
        b, c, h, w = x.shape
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx, dw, db = torch.empty_like(x), x.new_empty(b, c), x.new_empty(b, c)
        d_ss = x.new_empty(b, 2 * c) if scale_shift is not None else None
        rc = library().ddpm_group_norm_act_backward(
            x.data_ptr(), dy.data_ptr(), dx.data_ptr(), mean.data_ptr(), rstd.data_ptr(), b, h * w, c, ctx.groups,
            weight.data_ptr(), bias.data_ptr(), *_ss_args(scale_shift, c), int(ctx.silu),
            dw.data_ptr(), db.data_ptr(), None if d_ss is None else d_ss.data_ptr(), torch.get_num_threads())
        if rc:
            raise MemoryError("ddpm.nn.kernels: the GroupNorm backward could not allocate its scratch")
        if d_ss is not None and scale_shift.shape[0] == 1:  # one row for the whole batch
            d_ss = d_ss.sum(0, keepdim=True)
        d_weight, d_bias = dw.sum(0), db.sum(0)
        return dx, d_weight, d_bias, d_ss, None, None, None


def group_norm_act_train(x: torch.Tensor, norm: torch.nn.GroupNorm, scale_shift: torch.Tensor | None = None,
                         silu: bool = True) -> torch.Tensor | None:
    """:func:`group_norm_act` with autograd (the kernels' backward; training). None where it does not apply."""
    if not _applies(x, norm, scale_shift) or library() is None:
        return None
    ss = scale_shift.contiguous() if scale_shift is not None else None
    return _ran(_GroupNormAct.apply(x, norm.weight, norm.bias, ss, norm.num_groups, norm.eps, silu))


def _attention16_applies(qkv: torch.Tensor, heads: int, dim_head: int) -> bool:
    return (qkv.ndim == 3 and qkv.shape[1] == 16 and dim_head in (16, 32, 64) and qkv.shape[2] == 3 * heads * dim_head
            and not torch.compiler.is_compiling() and _cpu_f32(qkv) and library() is not None)


def attention16(qkv: torch.Tensor, heads: int, dim_head: int) -> torch.Tensor | None:
    """softmax(q k^T) v per image and head at 16 positions: ``qkv`` [B, 16, 3 * heads * dim_head] (q scaled by
    1/sqrt(d) already) -> [B, 16, heads * dim_head]. None where the kernel does not apply (another position
    count, a dim_head other than 16, 32 or 64, grads, no library)."""
    if torch.is_grad_enabled() or not _attention16_applies(qkv, heads, dim_head):
        return None
    return _ran(_attention16_forward(qkv.contiguous(), heads, dim_head, 1.0, keep_probs=False)[0])


def _attention16_forward(qkv: torch.Tensor, heads: int, dim_head: int, scale: float, keep_probs: bool):
    """The kernel's forward on a contiguous qkv whose shapes :func:`_attention16_applies` passed: the output and,
    where asked, each head's probabilities (transposed, [B, heads, 16, 16]; else None)."""
    out = qkv.new_empty(qkv.shape[0], 16, heads * dim_head)
    probs = qkv.new_empty(qkv.shape[0], heads, 16, 16) if keep_probs else None
    library().ddpm_attention16(qkv.data_ptr(), out.data_ptr(), None if probs is None else probs.data_ptr(),
                               qkv.shape[0], heads, dim_head, scale, torch.get_num_threads())
    return out, probs


class _Attention16(torch.autograd.Function):
    """softmax(scale q k^T) v at 16 positions with the kernels' forward and backward. Saves qkv and the
    probabilities ([B, heads, 16, 16]), from which the backward computes every gradient in one pass per head."""

    @staticmethod
    def forward(ctx, qkv, heads: int, dim_head: int, scale: float):
        out, probs = _attention16_forward(qkv, heads, dim_head, scale, keep_probs=True)
        ctx.save_for_backward(qkv, probs)
        ctx.heads, ctx.dim_head, ctx.scale = heads, dim_head, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        qkv, probs = ctx.saved_tensors
        dout, dqkv = dout.contiguous(), torch.empty_like(qkv)
        library().ddpm_attention16_backward(qkv.data_ptr(), probs.data_ptr(), dout.data_ptr(), dqkv.data_ptr(),
                                            qkv.shape[0], ctx.heads, ctx.dim_head, ctx.scale, torch.get_num_threads())
        return dqkv, None, None, None


def attention16_train(qkv: torch.Tensor, heads: int, dim_head: int) -> torch.Tensor | None:
    """:func:`attention16` with autograd (the kernels' backward; training): ``qkv`` [B, 16, 3 * heads * dim_head]
    unscaled (the scores are scaled by 1/sqrt(dim_head) inside) -> [B, 16, heads * dim_head]. None where it
    does not apply."""
    if not _attention16_applies(qkv, heads, dim_head):
        return None
    return _ran(_Attention16.apply(qkv.contiguous(), heads, dim_head, dim_head ** -0.5))


def _conv3x3_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The shapes, layout and dtypes both convolution kernels take (not the grad mode): a 3x3 ``weight`` over C
    input channels, a multiple of 16, and a channels_last float32 CPU ``x`` of at most ``CONV_MAX_PIXELS``."""
    return (not torch.compiler.is_compiling() and x.ndim == 4 and weight.ndim == 4 and weight.shape[2:] == (3, 3)
            and weight.shape[1] == x.shape[1] and x.shape[1] % 16 == 0 and x.shape[2] * x.shape[3] <= CONV_MAX_PIXELS
            and x.is_contiguous(memory_format=torch.channels_last)
            and _cpu_f32(x, weight, *(() if bias is None else (bias,))) and library() is not None)


class _Conv3x3(torch.autograd.Function):
    """y = conv2d(x, weight, bias, padding=1) (3x3, stride 1), forward and the input's gradient on PyTorch's
    convolution (oneDNN), the weight's and bias's gradients in one pass of C (``ddpm_conv3x3_weight_grad``)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias = bias is not None
        return torch.nn.functional.conv2d(x, weight, bias, padding=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.aten.convolution_backward(dy, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                     [True, False, False])[0]
        if ctx.needs_input_grad[1] or (ctx.bias and ctx.needs_input_grad[2]):  # (the kernel computes both)
            b, c, h, w = x.shape
            o = weight.shape[0]
            dw = x.new_empty(o, 3, 3, c).permute(0, 3, 1, 2)  # [O, C, 3, 3], channels_last
            db = x.new_empty(o) if ctx.bias else None
            library().ddpm_conv3x3_weight_grad(x.data_ptr(), dy.data_ptr(), dw.data_ptr(),
                                               None if db is None else db.data_ptr(), b, h, w, c, o,
                                               torch.get_num_threads())
            if not weight.is_contiguous(memory_format=torch.channels_last):
                dw = dw.contiguous()
        return dx, dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None


def conv3x3_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` [O, C, 3, 3] with C a multiple of 16 and a
    channels_last float32 CPU ``x`` [B, C, H, W] (H W <= ``CONV_MAX_PIXELS``), with autograd: the weight's and
    bias's gradients from the C kernel (the same sums as oneDNN's, each tile in a fixed order). None where it
    does not apply (another shape, layout, dtype or device, no grads, no library)."""
    if not torch.is_grad_enabled() or not _conv3x3_applies(x, weight, bias):
        return None
    return _ran(_Conv3x3.apply(x, weight, bias))


# Winograd's F(2x2, 3x3) weight transform (Lavin & Gray 2016, eq. 8): U = G g G^T
_WINOGRAD_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
# The convolution kernels take maps up to 32x32, the largest measured (AVX2 AMD EPYC, 2 threads: Winograd
# 1.31-1.65x oneDNN at 8x8 to 32x32, the weight gradients 1.08-1.49x; benchmarks/results/conv_kernels_avx2.md)
CONV_MAX_PIXELS = 1024


def winograd_weights(weight: torch.Tensor) -> torch.Tensor:
    """U = G g G^T of a 3x3 ``weight`` [O, C, 3, 3] as [16, C, O] float32 (computed in float64, rounded once).
    Kept on the weight tensor and recomputed when it changes (its version counter or storage); a tensor made in
    inference mode has no version counter, so there it is computed at each call."""
    key = None if weight.is_inference() else (weight._version, weight.data_ptr(), tuple(weight.shape))
    kept = getattr(weight, "_ddpm_winograd", None)
    if key is None or kept is None or kept[0] != key:
        o, c = weight.shape[:2]
        g = _WINOGRAD_G.to(weight.device)
        u = torch.einsum("ai,ocij,bj->abco", g, weight.detach().double(), g).reshape(16, c, o)
        kept = (key, u.float().contiguous())
        if key is not None:
            weight._ddpm_winograd = kept
    return kept[1]


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.conv2d(x, weight, bias, padding=1)`` without grads (sampling) by Winograd's F(2x2, 3x3) in C
    (``ddpm_conv3x3_winograd``: 16 products per 2x2 tile and channel pair where the direct form has 36) for a
    channels_last float32 CPU ``x`` [B, C, H, W] with C and O multiples of 16 and H W <= ``CONV_MAX_PIXELS``.
    None where it does not apply: the caller runs PyTorch's convolution."""
    if torch.is_grad_enabled() or weight.shape[0] % 16 or not _conv3x3_applies(x, weight, bias):
        return None
    b, c, h, w = x.shape
    o = weight.shape[0]
    u = winograd_weights(weight)
    bias = bias.contiguous() if bias is not None else None
    y = x.new_empty(b, h, w, o).permute(0, 3, 1, 2)  # [B, O, H, W], channels_last
    rc = library().ddpm_conv3x3_winograd(x.data_ptr(), u.data_ptr(), None if bias is None else bias.data_ptr(),
                                         y.data_ptr(), b, h, w, c, o, torch.get_num_threads())
    if rc:
        raise MemoryError("ddpm.nn.kernels: the Winograd convolution could not allocate its scratch")
    return _ran(y)
