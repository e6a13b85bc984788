"""The fused CPU kernels against PyTorch's ops for the same maths, per call, at the sampling batch.

    python3 -m benchmarks.kernel_bench --threads 1             # this CPU
    python3 -m benchmarks.kernel_bench --isa avx2 --threads 1  # every library held to AVX2 (benchmarks/isa.py)

attention16 (4 heads of 32 at 16 positions) against softmax(q k^T) v in PyTorch, and GroupNorm + per-image
scale-shift + SiLU against ``ops.norm_scale_shift`` + ``F.silu`` (the path taken without the kernels), no
grads. Median and min of ``--reps`` calls in ms: on a shared machine the min is the kernel's own speed.
"""
from __future__ import annotations

import argparse
import statistics
import time

try:
    from benchmarks import isa as isa_flag
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import isa as isa_flag
ISA = isa_flag.reexec()  # --isa: the limits must be set before torch is imported

import torch
import torch.nn.functional as F

from ddpm.nn import kernels, ops


def timed(fn, reps: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3, min(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--reps", type=int, default=40)
    isa_flag.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    print(isa_flag.describe(args.isa))
    print(f"{args.threads} threads, batch {args.batch}, median and min of {args.reps} calls, ms\n")
    print("| op | kernel median | kernel min | PyTorch median | PyTorch min |\n|---|---|---|---|---|")
    qkv = torch.randn(args.batch, 16, 3 * 128)

    def attention() -> torch.Tensor:
        q, k, v = (u.unflatten(-1, (4, 32)).transpose(1, 2) for u in qkv.chunk(3, -1))
        return torch.softmax(q @ k.transpose(-2, -1), -1) @ v
    rows = {"attention16, 4 heads of 32": (lambda: kernels.attention16(qkv, 4, 32), attention)}
    for c, hw in ((32, 8), (64, 4), (64, 8)):
        x = torch.randn(args.batch, c, hw, hw).contiguous(memory_format=torch.channels_last)
        norm, ss = torch.nn.GroupNorm(8, c), torch.randn(args.batch, 2 * c)
        scale, shift = ss[:, :, None, None].chunk(2, 1)
        rows[f"GroupNorm + scale-shift + SiLU, {c} ch {hw}x{hw}"] = (
            lambda x=x, norm=norm, ss=ss: kernels.group_norm_act(x, norm, ss, True),
            lambda x=x, norm=norm, scale=scale, shift=shift: F.silu(ops.norm_scale_shift(norm, x, scale, shift), inplace=True))
    for name, (fused, plain) in rows.items():
        if fused() is None:
            raise SystemExit(f"the fused kernels did not run: {kernels.kernel_record()}")
        (km, kn), (pm, pn) = timed(fused, args.reps), timed(plain, args.reps)
        print(f"| {name} | {km:.2f} | {kn:.2f} | {pm:.2f} | {pn:.2f} |")


if __name__ == "__main__":
    main()
