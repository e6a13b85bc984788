"""The convolution kernels of ``ddpm.nn.kernels`` against oneDNN (PyTorch's CPU convolution), per shape.

    python3 -m benchmarks.conv_bench                # this CPU, 2 threads
    python3 -m benchmarks.conv_bench --isa avx2     # every library held to AVX2 (benchmarks/isa.py)

Three tables, each at the UNet's shapes (dim 16 and 32; channels_last float32):
- sampling (no grads, batch 400): a 3x3 convolution by Winograd's F(2x2, 3x3), ``kernels.conv3x3``, against
  ``F.conv2d``;
- training (batch 128): a 3x3 convolution's weight and bias gradients, ``ddpm_conv3x3_weight_grad``, against
  oneDNN's backward of the weights (``convolution_backward`` with only those outputs);
- training (batch 128): a 1x1 convolution forward and backward as a product over channels (``ops.linear``)
  against ``F.conv2d``.
The two sides are timed in turn, ``--reps`` times; medians in ms, GFLOP/s of the direct form's FLOPs (for
Winograd an effective rate), and each side's largest error against float64 relative to the result's largest value.
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

SAMPLING = [(32, 8, 32), (64, 8, 32), (96, 8, 32), (32, 4, 64), (64, 4, 64), (96, 4, 64), (16, 8, 16), (48, 8, 16)]
TRAINING = [(32, 8, 32), (64, 8, 32), (32, 4, 64), (64, 4, 64), (96, 4, 64), (32, 4, 32), (16, 8, 16), (32, 8, 16)]
ONE_BY_ONE = [(64, 8, 32), (96, 4, 64), (32, 8, 1), (32, 8, 16), (48, 4, 32)]


def in_turn(a, b, reps: int) -> tuple[float, float]:
    """Median ms per call of a and b, called alternately after one warm-up call each."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, ts in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.detach().double() - ref.detach()).abs().max() / ref.detach().abs().max())


def cl(*shape) -> torch.Tensor:
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


def row(label: str, flops: float, ours: float, theirs: float, e_ours: float, e_theirs: float) -> None:
    print(f"| {label} | {ours:.3f} ({flops / ours / 1e6:.0f}) | {theirs:.3f} ({flops / theirs / 1e6:.0f}) "
          f"| **{theirs / ours:.2f}x** | {e_ours:.1e} / {e_theirs:.1e} |")


def sampling(batch: int, reps: int) -> None:
    print(f"\n## Sampling: 3x3 convolution, Winograd F(2x2, 3x3) against oneDNN, batch {batch}, no grads\n")
    print("| C -> O at HxW | Winograd ms (GFLOP/s) | oneDNN ms (GFLOP/s) | speed-up | error vs float64 |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for c, hw, o in SAMPLING:
            x, w, b = cl(batch, c, hw, hw), torch.randn(o, c, 3, 3) / (3 * c ** 0.5), torch.randn(o)
            ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
            got = kernels.conv3x3(x, w, b)
            if got is None:
                print(f"| {c} -> {o} at {hw}x{hw} | (the kernel does not apply here) | | | |")
                continue
            t_ours, t_theirs = in_turn(lambda: kernels.conv3x3(x, w, b), lambda: F.conv2d(x, w, b, padding=1), reps)
            row(f"{c} -> {o} at {hw}x{hw}", 2 * batch * hw * hw * 9 * c * o, t_ours, t_theirs, rel(got, ref),
                rel(F.conv2d(x, w, b, padding=1), ref))


def weight_grads(batch: int, reps: int) -> None:
    print(f"\n## Training: 3x3 convolution's weight and bias gradients, C against oneDNN, batch {batch}\n")
    print("| C -> O at HxW | C kernel ms (GFLOP/s) | oneDNN ms (GFLOP/s) | speed-up | error vs float64 |")
    print("|---|---|---|---|---|")
    lib = kernels.library()
    for c, hw, o in TRAINING:
        x, dy = cl(batch, c, hw, hw), cl(batch, o, hw, hw)
        w, dw, db = cl(o, c, 3, 3), torch.empty(o, 3, 3, c), torch.empty(o)

        def ours() -> None:
            lib.ddpm_conv3x3_weight_grad(x.data_ptr(), dy.data_ptr(), dw.data_ptr(), db.data_ptr(), batch, hw, hw,
                                         c, o, torch.get_num_threads())

        def theirs():
            return torch.ops.aten.convolution_backward(dy, x, w, [o], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                       [False, True, True])
        x64 = x.double().requires_grad_()
        w64 = w.double().requires_grad_()
        ref, = torch.autograd.grad(F.conv2d(x64, w64, padding=1), w64, dy.double())
        ours()
        t_ours, t_theirs = in_turn(ours, theirs, reps)
        row(f"{c} -> {o} at {hw}x{hw}", 2 * batch * hw * hw * 9 * c * o, t_ours, t_theirs,
            rel(dw.permute(0, 3, 1, 2), ref), rel(theirs()[1], ref))


def one_by_one(batch: int, reps: int) -> None:
    print(f"\n## Training: 1x1 convolution forward and backward, a product over channels against oneDNN, "
          f"batch {batch}\n")
    print("| C -> O at HxW | product ms (GFLOP/s) | oneDNN ms (GFLOP/s) | speed-up | error vs float64 (output) |")
    print("|---|---|---|---|---|")
    for c, hw, o in ONE_BY_ONE:
        x = cl(batch, c, hw, hw).requires_grad_()
        w, b = torch.randn(o, c, 1, 1, requires_grad=True), torch.randn(o, requires_grad=True)
        g = cl(batch, o, hw, hw)

        def ours() -> None:
            ops.linear(x.permute(0, 2, 3, 1), w.flatten(1), b).permute(0, 3, 1, 2).backward(g)

        def theirs() -> None:
            F.conv2d(x, w, b).backward(g)
        ref = F.conv2d(x.double(), w.double(), b.double())
        got = ops.linear(x.permute(0, 2, 3, 1), w.flatten(1), b).permute(0, 3, 1, 2)
        t_ours, t_theirs = in_turn(ours, theirs, reps)
        row(f"{c} -> {o} at {hw}x{hw}", 3 * 2 * batch * hw * hw * c * o, t_ours, t_theirs, rel(got.detach(), ref),
            rel(F.conv2d(x, w, b).detach(), ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    isa_flag.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels.flush_denormals()
    torch.manual_seed(0)
    print(isa_flag.describe(args.isa))
    print(f"{args.threads} threads, median of {args.reps} calls in turn; ddpm.nn.ops.conv2d takes the kernels "
          f"{'here (PyTorch runs AVX2)' if ops.conv_kernels() else 'nowhere here (AVX-512 or no library)'}")
    if kernels.library() is None:
        raise SystemExit(f"the C kernels are not available: {kernels.kernel_record().get('reason')}")
    sampling(400, args.reps)
    weight_grads(128, args.reps)
    one_by_one(128, args.reps)


if __name__ == "__main__":
    main()
