"""``--isa``: run a benchmark with every library held to one x86 vector instruction set.

    python3 -m benchmarks.peers --isa avx2       # an AVX2 machine, stood in for on an AVX-512 one

A stand-in for a slower CPU of the same family: PyTorch's own kernels (``ATEN_CPU_CAPABILITY``), oneDNN's
(``ONEDNN_MAX_CPU_ISA``) and ddpm's fused kernels (``DDPM_KERNEL_ISA``: built for that level, into a cache
folder of their own) are limited alike, for ours and the peers in the same process. PyTorch and oneDNN read
their variables once, when torch is loaded, so :func:`reexec` starts the process again with them set; call it
before importing torch. ``native`` (the default) changes nothing. :func:`describe` prints what each library ran.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

# per level: ATen's capability name, oneDNN's ISA limit, ddpm.nn.kernels' level
LIMITS = {"avx2": ("avx2", "AVX2", "avx2"), "avx512": ("avx512", "AVX512_CORE", "avx512")}
CHOICES = ("native", *LIMITS)
_MARK = "DDPM_BENCH_ISA"  # set in the re-executed process: the limits are in force


def add_argument(ap) -> None:
    ap.add_argument("--isa", choices=CHOICES, default="native",
                    help="hold PyTorch, oneDNN and ddpm's kernels to one instruction set (avx2: the stand-in for "
                         "an AVX2-only machine); native: whatever this CPU runs")


def _asked(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--isa" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--isa="):
            return a.split("=", 1)[1]
    return "native"


def environment(isa: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a process held to ``isa`` starts with (``base``: default os.environ)."""
    env = dict(os.environ if base is None else base)
    if isa == "native":
        return env
    aten, onednn, ours = LIMITS[isa]
    cache = Path(env.get("XDG_CACHE_HOME") or Path(env.get("HOME") or Path.home()) / ".cache") / "ddpm" / f"kernels-{isa}"
    env.update(ATEN_CPU_CAPABILITY=aten, ONEDNN_MAX_CPU_ISA=onednn, DDPM_KERNEL_ISA=ours,
               DDPM_KERNEL_CACHE=str(cache), **{_MARK: isa})
    return env


def reexec(argv: list[str] | None = None) -> str:
    """Start this process again with the limits of ``--isa`` (read from ``argv``, default sys.argv) unless
    they are in force already; returns the ISA. Must run before torch is imported."""
    isa = _asked(sys.argv if argv is None else argv)
    if isa not in CHOICES:
        raise SystemExit(f"--isa {isa!r}: allowed are {', '.join(CHOICES)}")
    if isa == "native" or os.environ.get(_MARK) == isa:
        return isa
    if "torch" in sys.modules:
        raise RuntimeError("benchmarks.isa.reexec must run before torch is imported")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment(isa))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _stdout_fd_to(path: Path):
    """Send file descriptor 1 (where oneDNN's C code prints) to ``path`` while active."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def onednn_isa() -> str:
    """The ISA oneDNN dispatches to, from its verbose header (printed at its first verbose call)."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "onednn.txt"
        with _stdout_fd_to(log), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON), torch.no_grad():
            x = torch.randn(8, 32, 16, 16).contiguous(memory_format=torch.channels_last)  # large enough for oneDNN
            torch.nn.functional.conv2d(x, torch.randn(32, 32, 3, 3), padding=1)
        found = re.search(r"isa:([^,\n]+)", log.read_text(errors="replace"))
    return found.group(1).strip() if found else "unknown (no oneDNN verbose header)"


def describe(isa: str) -> str:
    """One line per library: the ISA it runs here (call after the fused kernels had their chance to load)."""
    import torch

    from ddpm.nn import kernels

    kernels.library()
    rec = kernels.kernel_record()
    ours = rec["isa"] if rec["isa"] else f"off ({rec.get('reason')})"
    limits = ", ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DDPM_KERNEL_ISA")
                       if k in os.environ) or "none"
    return (f"ISA ({isa}; limits: {limits}): PyTorch ATen {torch.backends.cpu.get_cpu_capability()} "
            f"(every library's eager ops); oneDNN {onednn_isa()} (every library's convolutions); "
            f"ddpm fused kernels {ours}")
