"""Where a sampling step or a training step spends its time, per aten op, on the default CPU path.

    python3 benchmarks/op_time.py                          # a DDPM sampling step, dim 32 (the peers' model), batch 400
    python3 benchmarks/op_time.py --dim 16                 # the default model
    python3 benchmarks/op_time.py --train --dropout 0.1    # a training step (forward, backward, fused AdamW), batch 128
    python3 benchmarks/op_time.py --isa avx2               # every library held to AVX2 (benchmarks/isa.py)
    python3 benchmarks/op_time.py --train --onednn         # also oneDNN's verbose account: per shape, ms and GFLOP/s

Each aten call (the backward's too) is timed with ``time.perf_counter`` inside a ``TorchDispatchMode``, so
the shares include a few microseconds of the mode's own cost per call; the wall time without the mode is
printed above the table for comparison. The fused C kernels (``ddpm.nn.kernels``, called through ctypes, not
aten) are timed the same way, as ``ddpm.<function>``. Eager, channels_last, as ``fast: true`` runs it on a CPU. The
profiler is not used: it inflates oneDNN's convolutions (docs/performance.md).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

try:
    from benchmarks import isa as isa_flag
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import isa as isa_flag
ISA = isa_flag.reexec()  # --isa: the limits must be set before torch is imported

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.nn.speed import tune_allocator
from ddpm.nn.unet import Unet
from ddpm.nn import kernels

try:
    from benchmarks.default_path import sample_block, train_block
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    from default_path import sample_block, train_block


class OpTimer(TorchDispatchMode):
    """Seconds and calls per aten op (overload packet) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.seconds[name] += time.perf_counter() - t0
        self.calls[name] += 1
        return out


class TimedLibrary:
    """The fused kernels' library with each ``ddpm_*`` call timed into ``timer`` while the timer is active."""

    def __init__(self, lib, timer: OpTimer) -> None:
        self._lib, self._timer, self.active = lib, timer, False

    def __getattr__(self, name: str):
        fn = getattr(self._lib, name)
        if not name.startswith("ddpm_") or name == "ddpm_isa":
            return fn

        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            if self.active:
                self._timer.seconds[f"ddpm.{name[5:]}"] += time.perf_counter() - t0
                self._timer.calls[f"ddpm.{name[5:]}"] += 1
            return out
        return timed


def workload(args: argparse.Namespace):
    """A no-argument callable: one DDPM step of ``sample_loop`` or one training step (forward, loss, backward,
    fused AdamW), the blocks ``default_path.py`` times, on the default CPU path (eager, channels_last)."""
    torch.manual_seed(0)
    model = Unet(dim=args.dim, dim_mults=(1, 2), channels=1, dropout=args.dropout)
    process = GaussianProcess(get_beta_schedule("linear", 1000), "pred_noise")
    return (train_block if args.train else sample_block)(model, process, args.batch, 1)


def _conv_flops(shape: str) -> float:
    """Multiply-adds x 2 of a oneDNN convolution descriptor (mb128_ic32oc32_ih8oh8kh3..._iw8ow8kw3...)."""
    d = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", shape)}
    return 2.0 * d["mb"] * d["ic"] * d["oc"] * d["oh"] * d["ow"] * d["kh"] * d["kw"]


def onednn_table(fn, reps: int, top: int) -> None:
    """oneDNN's own account (its verbose mode) of ``reps`` calls of ``fn``: per primitive, propagation kind,
    implementation and shape, ms per call, calls per step and, for convolutions, GFLOP/s."""
    sys.stdout.flush()
    saved, log = os.dup(1), tempfile.TemporaryFile(mode="w+")
    os.dup2(log.fileno(), 1)
    try:
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            for _ in range(reps):
                fn()
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    log.seek(0)
    ms, calls = collections.defaultdict(float), collections.Counter()
    for line in log:
        f = line.strip().split(",")
        if len(f) > 8 and f[:4] == ["onednn_verbose", "v1", "primitive", "exec"]:
            key = (f[5], f[7], f[6], f[-2] if f[5] == "convolution" else "")
            ms[key] += float(f[-1])
            calls[key] += 1
    total = sum(ms.values()) / reps
    print(f"\noneDNN's own account, {reps} steps: {total:.2f} ms a step in its primitives\n")
    print("| primitive | propagation | implementation | shape | ms/call | calls/step | GFLOP/s | share |")
    print("|---|---|---|---|---|---|---|---|")
    for key, t in sorted(ms.items(), key=lambda kv: -kv[1])[:top]:
        per = t / calls[key]
        rate = f"{_conv_flops(key[3]) / per / 1e6:.0f}" if key[3] else ""
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {per:.3f} | {calls[key] / reps:g} | {rate} | "
              f"{t / reps / total:.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--train", action="store_true", help="a training step instead of a sampling step")
    ap.add_argument("--batch", type=int, default=None, help="default: 400 sampling, 128 training")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--denormals", choices=("flush", "keep"), default="flush",
                    help="flush: subnormals to zero on every CPU thread, as the stages set it; keep: IEEE")
    ap.add_argument("--onednn", action="store_true", help="also oneDNN's own account per primitive and shape")
    isa_flag.add_argument(ap)
    args = ap.parse_args()
    args.batch = args.batch or (128 if args.train else 400)
    tune_allocator()
    torch.set_num_threads(args.threads)
    if args.denormals == "flush":
        kernels.flush_denormals()
    fn = workload(args)
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(args.reps):
        fn()
    wall = (time.perf_counter() - t0) / args.reps
    timer = OpTimer()
    lib = kernels.library()
    if lib is not None:
        kernels._state["lib"] = timed_lib = TimedLibrary(lib, timer)
    with timer:
        for _ in range(3):
            fn()
        timer.seconds.clear()
        timer.calls.clear()
        if lib is not None:
            timed_lib.active = True
        for _ in range(args.reps):
            fn()
    total = sum(timer.seconds.values()) / args.reps
    what = f"training step, batch {args.batch}, dropout {args.dropout}" if args.train else f"DDPM sampling step, batch {args.batch}"
    print(f"# dim {args.dim}, {what}; torch {torch.__version__}, {args.threads} threads; subnormals: {args.denormals}")
    print(isa_flag.describe(args.isa))
    print(f"wall {wall * 1e3:.2f} ms without the timer; the ops' sum {total * 1e3:.2f} ms with it\n")
    print("| aten op | ms | calls | share of the ops' sum |\n|---|---|---|---|")
    for name, s in sorted(timer.seconds.items(), key=lambda kv: -kv[1])[:args.top]:
        ms = s / args.reps * 1e3
        print(f"| {name} | {ms:.3f} | {timer.calls[name] // args.reps} | {ms / (total * 1e3):.1%} |")
    if args.onednn:
        onednn_table(fn, args.reps, args.top)


if __name__ == "__main__":
    main()
