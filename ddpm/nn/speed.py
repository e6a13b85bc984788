"""How the same maths runs fast: one switch (``fast`` in params.yaml) for channels_last, the fused CPU kernels
(``ddpm.nn.kernels``: the train and sample stages turn them off with ``fast: false``, and record whether they ran) and,
on CUDA, torch.compile and bf16 autocast. Nothing here changes what is computed beyond float rounding.

What each part buys was measured side by side (``python -m benchmarks.peers``, docs/performance.md):
- channels_last: the layout oneDNN's and cuDNN's fastest convolutions use; everywhere (on a 2-core CPU
  eager training runs 5-10% faster in it, inductor's graphs are even).
- flat parameters (``ddpm.training.optim.FlatParams``, always on): the optimizer, clipping and EMA each run one
  kernel over one buffer.
- torch.compile (inductor), on CUDA: fuses GroupNorm, SiLU, scale-shift and residual adds into few kernels.
  Not on a CPU: there eager channels_last, with the Unet's linear layers on oneDNN (AVX-512) or MKL (AVX2)
  and its attention written out, beats inductor's graphs at every size measured (see ``Speed.resolve``). It
  falls back to eager, with one warning, wherever compiling fails (no C++ compiler, an unsupported op).
- bf16 autocast on CUDA (fp16 with a grad scaler where bf16 is missing; see ``ddpm.training.optim.amp_settings``).
- the process's allocator keeps freed memory (:func:`tune_allocator`; the train and sample stages call it).
- subnormal floats flushed to zero on every CPU thread (``ddpm.nn.kernels.flush_denormals``; the train, sample
  and nll stages call it).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speed:
    """What the ``fast`` switch means on one device."""

    train_channels_last: bool = False
    sample_channels_last: bool = False
    compile: bool = False
    autocast_dtype: torch.dtype | None = None

    @staticmethod
    def resolve(fast: bool, device: torch.device | str) -> "Speed":
        device = torch.device(device)
        if not fast:
            return Speed()
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            return Speed(True, True, True, torch.bfloat16 if bf16 else torch.float16)
        # CPU, measured on 2 cores: NHWC speeds eager training (dim 16: 1,877 vs 1,791 img/s; dim 32: 1,192
        # vs 1,081) and eager sampling (dim 32: +10% at batch 64, +27% at 400; dim 16: even).
        # No torch.compile: since the Unet runs its linear layers on oneDNN and writes attention out on a CPU,
        # eager beats inductor's graphs at every size measured (2 threads, cpp_wrapper, warm cache; training
        # dim 16 batch 128 32.9 vs 37.8 ms a step, dim 32 63 vs 78, 32x32 RGB dim 32 (1, 2, 2) batch 64 390 vs
        # 571; a sampling forward at batch 400 26.3 vs 33.4 ms (dim 16) and 45.3 vs 57.8 (dim 32), 32x32 RGB
        # batch 64 104 vs 130), before paying 15-55 s to compile. Regional compilation (each residual and
        # attention block compiled on its own) was slower still: 47 ms a step at dim 16.
        # No bf16 autocast: dim 16 trains at 583-639 img/s with it against 1,182-1,188 without, though this
        # CPU has AMX (the casts around small convolutions cost more than they save); nor oneDNN's
        # bf16 arithmetic for float32 convolutions (torch.backends.mkldnn.conv.fp32_precision = "bf16"):
        # dim 32 trains at 602 img/s with it against 1,129 without.
        return Speed(True, True, False, None)


# glibc malloc: serve allocations below this from the heap, never from fresh mmap()s, and never hand
# freed heap memory back to the OS (M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1 in <malloc.h>).
MALLOC_MMAP_MAX_BYTES = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit
MALLOC_TRIM_BYTES = 1 << 30
_allocator_tuned = False


def tune_allocator() -> bool:
    """Keep freed CPU tensors' memory in the process, for glibc's malloc (Linux); elsewhere do nothing.

    By default glibc returns large freed blocks to the OS (munmap, heap trimming), so the next tensor of
    that size faults its pages in again, each zeroed by the kernel. How often depends on the process's
    allocation history (glibc adapts its mmap threshold), so the same eager code ran at 20-24 training
    steps/s with 1.3-2.2M page faults in 300 steps in some processes and 26-28 with 0.13M (imports only)
    here; sampling at batch 400 at 52-68 ms a step against 54 (docs/performance.md). Numbers are unchanged:
    only where memory comes from. Process-wide and idempotent; returns whether it applied."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): its allocator is left alone
        return False
    _allocator_tuned = bool(mallopt(-3, MALLOC_MMAP_MAX_BYTES)) and bool(mallopt(-1, MALLOC_TRIM_BYTES))
    return _allocator_tuned


def set_up_process(fast: bool) -> None:
    """What the ``fast`` switch sets for the whole process, before it computes (the train, sample and nll
    stages call it): with it, freed CPU memory kept (:func:`tune_allocator`) and subnormal floats flushed to
    zero on every CPU thread (``kernels.flush_denormals``): the same bits, faster; without it, the fused CPU
    kernels off (``kernels.disable``): plain eager float32, PyTorch's ops."""
    from ddpm.nn import kernels

    if fast:
        tune_allocator()
        kernels.flush_denormals()
    else:
        kernels.disable("fast: false")


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convolution weights (and so every activation after the first conv) in NHWC."""
    return model.to(memory_format=torch.channels_last)


CACHE_SUBDIR = Path(".cache") / "torchinductor"  # git- and DVC-ignored


def use_project_compile_cache() -> Path | None:
    """Inside a DVC stage, keep inductor's on-disk caches (FX graphs, AOTAutograd) in the project, under
    ``$DVC_ROOT/.cache/torchinductor``, so every later stage and ``dvc exp run`` (queued ones run in temp
    copies; ``DVC_ROOT`` names the real project) reuses the first compile. Measured (the default model's
    training graph, 1 thread): 67.5 s of CPU cold, 2.5-8.5 s warm. An explicit ``TORCHINDUCTOR_CACHE_DIR``
    wins; outside DVC inductor's own default (``/tmp/torchinductor_$USER``) stays. A cache hit loads the
    same generated code, so the same bits. Returns the folder in use, or None."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ and os.environ.get("DVC_ROOT"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(os.environ["DVC_ROOT"]) / CACHE_SUBDIR)
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(folder) if folder else None


class CompiledOrEager:
    """``torch.compile(fn)``, falling back to ``fn`` for good, with one warning naming ``what``, if
    compiling fails on the first call (or if ``DDPM_NO_COMPILE=1``). Same call signature as ``fn``.
    Inside a DVC stage the compiled code is cached in the project (:func:`use_project_compile_cache`)."""

    def __init__(self, fn: Callable[..., Any], what: str, **compile_kwargs: Any) -> None:
        self.eager, self.what = fn, what
        self.compiled: Callable[..., Any] | None = None
        self.failed = os.environ.get("DDPM_NO_COMPILE", "") == "1"
        if not self.failed:
            use_project_compile_cache()
            try:
                self.compiled = torch.compile(fn, **compile_kwargs)
            except Exception as e:  # noqa: BLE001 - e.g. an unsupported Python version
                self._fall_back(e)

    def _fall_back(self, e: BaseException) -> None:
        self.failed, self.compiled = True, None
        cause = getattr(e, "inner_exception", None) or e.__cause__ or e  # the backend's own error
        lines = [line for line in str(cause).splitlines() if line.strip()]
        log.warning("torch.compile of %s failed (%s: %s); running it eagerly instead", self.what,
                    type(cause).__name__, lines[0] if lines else "")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - compiler failures surface on a call; a genuine error
                self._fall_back(e)      # in fn is raised again by the eager call below
        return self.eager(*args, **kwargs)


def compile_options(device: torch.device | str) -> dict[str, Any]:
    """torch.compile arguments: static shapes; on a CPU inductor's C++ wrapper (kernels called from C++)."""
    return {"dynamic": False, **({"options": {"cpp_wrapper": True}} if torch.device(device).type == "cpu" else {})}


def sampling_model(model: nn.Module, speed: Speed):
    """The callable to sample with: channels_last and, where ``speed`` says so (CUDA), compiled (eval mode)."""
    if speed.sample_channels_last:
        model = to_channels_last(model)
    if speed.compile:
        return CompiledOrEager(model.eval(), f"{type(model).__name__} for sampling", dynamic=False)
    return model
