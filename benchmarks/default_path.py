"""What dominates the default `dvc repro` on a CPU, old code against new, timed in turn in one run.

    python3 benchmarks/default_path.py                  # this tree against `main`, 2 threads
    python3 benchmarks/default_path.py --base HEAD~3    # against any git revision
    python3 benchmarks/default_path.py --isa avx2       # every library held to AVX2 (benchmarks/isa.py)

A full default run on a shared machine is too noisy to compare, so this times its components instead,
interleaved (old, new, old, new ...) so that a drift of the machine's speed cancels in each pair:
- training at the default config (params.yaml: model, train.batch_size, dropout), eager channels_last as
  `fast: true` runs it on a CPU: forward, loss, backward and a fused AdamW step, in images/s;
- sampling at the pipeline's batch (sample.batch_size) with the DDPM rule, in image-steps/s;
- each stage's process start-up: `python -c 'import torch'` and the stage modules' imports.
The old network is ``ddpm/nn/unet.py`` as of ``--base`` (read with `git show`, run beside the new one);
both get the same weights. From the rates it predicts the default run's compute time before and after,
and scales it to another machine by the ratio of float32 matmul rates (``--scale-to``, GFLOP/s; the
137 GFLOP/s machine's rate was taken with 2 threads, so compare at ``--threads 2``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import isa as isa_flag
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import isa as isa_flag
ISA = isa_flag.reexec()  # --isa: the limits must be set before torch is imported

import torch

ROOT = Path(__file__).resolve().parents[1]

from ddpm.app.config import load_params
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.samplers import StepRule, sample_loop
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.nn import kernels
from ddpm.nn.speed import Speed, sampling_model, to_channels_last
from ddpm.nn.unet import Unet



def matmul_gflops(reps: int = 5) -> float:
    """Median float32 rate of a 2048 x 2048 matrix product (as benchmarks/peers.py measures it)."""
    n, k = 2048, 5
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(k):
            a @ b
        rates.append(2 * n**3 * k / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


# where the network's modules were at a revision: after the folder move, then before it
LAYOUTS = ({"unet.py": "ddpm/nn/unet.py", "ops.py": "ddpm/nn/ops.py", "kernels.py": "ddpm/nn/kernels.py",
            "kernels.c": "ddpm/nn/kernels.c"},
           {"unet.py": "ddpm/unet.py", "kernels.py": "ddpm/kernels.py", "kernels.c": "ddpm/kernels.c"})


def _git_show(rev: str, path: str) -> str | None:
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


def _isolated(text: str) -> str:
    """A module's source with its imports of the network's modules pointed at the copies in ddpm_base; a
    ``-march=native`` build held to the level of ``DDPM_KERNEL_ISA`` (``--isa``), as the new code builds."""
    for old in ("from ddpm.nn import ", "from ddpm import "):
        for name in ("ops", "kernels"):
            text = text.replace(f"{old}{name}", f"from ddpm_base import {name}")
    level = os.environ.get("DDPM_KERNEL_ISA")
    if level in kernels.LEVELS:
        text = text.replace('"-march=native"', f'"-march={kernels.LEVELS[level][1]}"')
    return text


def unet_at(rev: str):
    """The ``Unet`` class of the network at git revision ``rev``, with the network's modules it imports at that
    revision (``ops.py``, ``kernels.py`` and the C it compiles), as a package of their own."""
    pkg = Path(tempfile.mkdtemp()) / "ddpm_base"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for layout in LAYOUTS:
        if _git_show(rev, layout["unet.py"]) is not None:
            break
    else:
        raise SystemExit(f"git show {rev}: neither ddpm/nn/unet.py nor ddpm/unet.py is there")
    for name, path in layout.items():
        text = _git_show(rev, path)
        if text is not None:
            (pkg / name).write_text(_isolated(text) if name.endswith(".py") else text)
    spec = importlib.util.spec_from_file_location("ddpm_base", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    sys.modules["ddpm_base"] = importlib.util.module_from_spec(spec)  # a package of its own; no sys.path entry
    spec.loader.exec_module(sys.modules["ddpm_base"])
    return importlib.import_module("ddpm_base.unet").Unet


def paired(fns: dict[str, callable], blocks: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, in turn (A B A B ...), after one untimed call each."""
    for fn in fns.values():
        fn()
    out = {k: [] for k in fns}
    for _ in range(blocks):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def train_block(model: torch.nn.Module, process: GaussianProcess, batch: int, steps: int):
    """``steps`` optimizer steps on random data: loss, backward, fused AdamW (the loop's EMA and
    bookkeeping are the same code for old and new, so they are left out)."""
    model = to_channels_last(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 1, 8, 8, generator=g) * 2 - 1).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        for _ in range(steps):
            t = process.sample_timesteps(batch, g, torch.device("cpu"))
            noise = torch.randn(x0.shape, generator=g).contiguous(memory_format=torch.channels_last)
            process.losses(model, x0, t, noise).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return run


def sample_block(model: torch.nn.Module, process: GaussianProcess, batch: int, steps: int):
    net = sampling_model(model.eval(), Speed.resolve(True, "cpu"))  # eager channels_last
    g = torch.Generator()

    def run() -> None:
        g.manual_seed(0)
        sample_loop(net, process, (batch, 1, 8, 8), steps, StepRule("ddpm"), g)
    return run


def startup_seconds(code: str, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def ratio_line(name: str, unit: str, work: float, times: dict[str, list[float]]) -> tuple[float, float]:
    old, new = (statistics.median(times[k]) for k in ("old", "new"))
    r = [a / b for a, b in zip(times["old"], times["new"])]
    print(f"| {name} | {work / old:,.0f} | {work / new:,.0f} | **{statistics.median(r):.3f}x** "
          f"({min(r):.2f}-{max(r):.2f}) |")
    return work / old, work / new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="main", help="git revision of the old ddpm/nn/unet.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=None,
                    help="model width (default: params.yaml's model.dim; 32 is benchmarks/peers.py's model)")
    ap.add_argument("--blocks", type=int, default=8, help="timed blocks per side")
    ap.add_argument("--scale-to", type=float, default=137.0, help="matmul GFLOP/s of the machine to predict for")
    isa_flag.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = load_params(ROOT / "params.yaml")
    m, t, s = p.model, p.train, p.sample
    kw = dict(dim=args.dim or m.dim, dim_mults=tuple(m.dim_mults), channels=1, dropout=m.dropout,
              attn_heads=m.attn_heads, attn_dim_head=m.attn_dim_head)
    models = {"old": unet_at(args.base), "new": Unet}
    process = GaussianProcess(get_beta_schedule("linear", p.timesteps), p.diffusion.objective)

    def build(cls) -> torch.nn.Module:
        torch.manual_seed(0)
        return cls(**kw)

    mm = matmul_gflops()
    print(f"# default path, {args.base} (old) vs this tree (new); torch {torch.__version__}, {args.threads} threads")
    print(isa_flag.describe(args.isa) + " (new; the old kernels are built for the same level)")
    print(f"float32 2048x2048 matmul: {mm:.1f} GFLOP/s\n")
    print(f"| component (median of {args.blocks} blocks, in turn) | old | new | new / old speed (range) |")
    print("|---|---|---|---|")
    steps = 10
    train_t = paired({k: train_block(build(c), process, t.batch_size, steps) for k, c in models.items()}, args.blocks)
    train_rate = ratio_line(f"training img/s (dim {kw['dim']}, batch {t.batch_size}, dropout {m.dropout})", "img/s",
                            t.batch_size * steps, train_t)
    sample_t = paired({k: sample_block(build(c), process, s.batch_size, steps) for k, c in models.items()}, args.blocks)
    sample_rate = ratio_line(f"DDPM sampling image-steps/s (batch {s.batch_size})", "image-steps/s",
                             s.batch_size * steps, sample_t)
    start = {"import torch": startup_seconds("import torch", 3),
             "import stages.train": startup_seconds("import stages.train", 3),
             "import stages.sample": startup_seconds("import stages.sample", 3)}
    print("\n" + "; ".join(f"`{k}`: {v:.2f} s" for k, v in start.items()) + " (median of 3, the same code old and new)")

    # the default run's work (params.yaml): training images, sampling image-steps (sets and FID curve),
    # and one process per stage: prepare, featurizer, fid, report, a train per schedule, a sample per set
    n_sched = len(p.diffusion.schedules)
    images = t.steps * t.batch_size * n_sched
    evals = len([k for k in range(t.fid_every, t.steps + 1, t.fid_every)] + ([t.steps] if t.steps % t.fid_every else [])) \
        if t.fid_every else 0
    image_steps = n_sched * (s.n_samples * sum(k.steps for k in s.samplers) + evals * t.fid_samples * t.fid_sampling_steps)
    n_proc = 4 + n_sched * (1 + len(s.samplers))
    startup = n_proc * start["import stages.sample"]
    scale = mm / args.scale_to
    before = images / train_rate[0] + image_steps / sample_rate[0]
    after = images / train_rate[1] + image_steps / sample_rate[1]
    print(f"\nDefault run: {images:,} training images, {image_steps:,} sampling image-steps "
          f"(eval-mode batches taken at the sample batch's rate), {n_proc} stage processes.")
    print(f"Predicted training + sampling time here: {before:.0f} s before, {after:.0f} s after "
          f"(saving {before - after:.0f} s, {1 - after / before:.1%}); process start-ups about {startup:.0f} s either way.")
    print(f"Scaled to a {args.scale_to:.0f} GFLOP/s machine (x{scale:.2f}): {before * scale:.0f} s before, "
          f"{after * scale:.0f} s after, saving {(before - after) * scale:.0f} s; start-ups about {startup * scale:.0f} s.")


if __name__ == "__main__":
    main()
