"""Where a forward or a training step spends its time, per aten op, on the default CPU path.

    python3 benchmarks/op_time.py                          # sampling forward, dim 32 (the peers' model), batch 400
    python3 benchmarks/op_time.py --dim 16                 # the default model
    python3 benchmarks/op_time.py --train --dropout 0.1    # a training step (forward, backward, fused AdamW), batch 128

Each aten call (the backward's too) is timed with ``time.perf_counter`` inside a ``TorchDispatchMode``, so
the shares include a few microseconds of the mode's own cost per call; the wall time without the mode is
printed above the table for comparison. Eager, channels_last, as ``fast: true`` runs it on a CPU. The
profiler is not used: it inflates oneDNN's convolutions (README "Performance").
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm.diffusion import GaussianProcess  # noqa: E402
from ddpm.schedules import get_beta_schedule  # noqa: E402
from ddpm.speed import to_channels_last, tune_allocator  # noqa: E402
from ddpm.unet import Unet  # noqa: E402


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


def workload(args: argparse.Namespace):
    """A no-argument callable: one sampling forward (no grads) or one training step."""
    torch.manual_seed(0)
    model = to_channels_last(Unet(dim=args.dim, dim_mults=(1, 2), channels=1, dropout=args.dropout))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    if not args.train:
        model.eval()
        t = torch.full((), 500).expand(args.batch)  # one t for the batch, as the samplers pass it

        def forward() -> None:
            with torch.no_grad():
                model(x, t)
        return forward
    model.train()
    process = GaussianProcess(get_beta_schedule("linear", 1000), "pred_noise")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step() -> None:
        t = process.sample_timesteps(args.batch, g, torch.device("cpu"))
        noise = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
        process.losses(model, x, t, noise).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--train", action="store_true", help="a training step instead of a sampling forward")
    ap.add_argument("--batch", type=int, default=None, help="default: 400 sampling, 128 training")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    args.batch = args.batch or (128 if args.train else 400)
    tune_allocator()
    torch.set_num_threads(args.threads)
    fn = workload(args)
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(args.reps):
        fn()
    wall = (time.perf_counter() - t0) / args.reps
    timer = OpTimer()
    with timer:
        for _ in range(3):
            fn()
        timer.seconds.clear()
        timer.calls.clear()
        for _ in range(args.reps):
            fn()
    total = sum(timer.seconds.values()) / args.reps
    what = f"training step, batch {args.batch}, dropout {args.dropout}" if args.train else f"sampling forward, batch {args.batch}"
    print(f"# dim {args.dim}, {what}; torch {torch.__version__}, {args.threads} threads")
    print(f"wall {wall * 1e3:.2f} ms without the timer; the ops' sum {total * 1e3:.2f} ms with it\n")
    print("| aten op | ms | calls | share of the ops' sum |\n|---|---|---|---|")
    for name, s in sorted(timer.seconds.items(), key=lambda kv: -kv[1])[:args.top]:
        ms = s / args.reps * 1e3
        print(f"| {name} | {ms:.3f} | {timer.calls[name] // args.reps} | {ms / (total * 1e3):.1%} |")


if __name__ == "__main__":
    main()
