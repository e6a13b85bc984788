"""Speed against denoising-diffusion-pytorch and diffusers, measured side by side in one run.

    python3 -m pip install -r benchmarks/requirements.txt     # the peers (never needed by the project)
    python3 benchmarks/peers.py                              # 2 CPU threads, about 13 minutes
    python3 benchmarks/peers.py --device cuda                # the same table on a GPU
    python3 benchmarks/peers.py --no-sampling                # the training table alone (about 2 minutes)
    python3 benchmarks/peers.py --runs 3 --no-sampling       # three whole comparisons: each ratio's median, range
    python3 benchmarks/peers.py --malloc default             # glibc's default allocator instead of the stages' tuning
    python3 benchmarks/peers.py --denormals keep             # IEEE subnormals instead of the stages' flush to zero
    python3 benchmarks/peers.py --isa avx2 --ours eager_cl   # every library held to AVX2 (benchmarks/isa.py)
    python3 benchmarks/peers.py --peers diffusers            # one peer only (shorter)

Every library trains and samples the same 8x8 grayscale task with its own code, as its README and
training script use it:
- ours: ``ddpm.training.loop.train`` (the loop the pipeline runs: fused AdamW on flat parameters, EMA every step,
  clipping, per-step loss bookkeeping) and ``ddpm.diffusion.samplers.sample_loop``, three ways: compiled in
  channels_last (what ``fast: true`` does on CUDA; on a CPU only on request, where eager beats it:
  ``ddpm.nn.speed``), eager in channels_last (``fast: true`` on a CPU: the default pipeline) and eager
  (``fast: false``);
- denoising-diffusion-pytorch 2.3.4: ``GaussianDiffusion(Unet(dim=32, dim_mults=(1, 2)))``, its Trainer's
  step (Adam betas (0.9, 0.99), clipping at 1, ``ema_pytorch.EMA`` every 10 steps), and its samplers
  (``p_sample_loop`` for DDPM, ``ddim_sample``);
- diffusers 0.42.1: ``UNet2DModel`` with block_out_channels (32, 64), 2 layers per block, attention at
  4x4 (``AttnDownBlock2D``), its ``train_unconditional.py`` step (AdamW, clipping at 1, ``EMAModel.step`` every step) and the
  ``DDPMScheduler`` / ``DDIMScheduler`` loops of its pipelines.
Models are matched in FLOPs per image (counted with ``torch.utils.flop_counter`` on the meta device) and timed in turn
(A B C A B C...) because this machine's speed drifts by about 30% over minutes; the table gives medians,
throughput per FLOP (GFLOP/s) and its share of a float32 matmul rate measured in the same run. The FLOPs are each
model's as counted, whatever algorithm computes them: at AVX2, ours runs sampling's 3x3 convolutions by Winograd's
F(2x2, 3x3), 16 multiplications where the direct form has 36, so its GFLOP/s there is an effective rate and may
exceed the matmul's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from importlib.metadata import version
from typing import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # denoising-diffusion-pytorch draws a progress bar per sample

try:
    from benchmarks import isa as isa_flag
except ImportError:  # run as a script: benchmarks/ is sys.path[0]
    import isa as isa_flag
ISA = isa_flag.reexec()  # --isa: the limits must be set before torch is imported

import torch
import torch.nn.functional as F

from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.samplers import StepRule, sample_loop
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.nn import kernels, ops
from ddpm.nn.speed import Speed, sampling_model, tune_allocator
from ddpm.training.loop import TrainSettings, train
from ddpm.nn.unet import Unet

try:
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel
except ImportError as e:  # pragma: no cover - a missing peer is a set-up error, said plainly
    raise SystemExit(f"{e}: install the peers first: python3 -m pip install -r benchmarks/requirements.txt")
try:
    import denoising_diffusion_pytorch as ddp_lib
    from ema_pytorch import EMA as LucidEMA
except ImportError:  # only with --peers including it (said then)
    ddp_lib = None

IMAGE = (1, 8, 8)
T = 1000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_gflops(device: torch.device, reps: int) -> float:
    """Median float32 rate of a 2048 x 2048 matrix product (the machine's reference rate)."""
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    k = 5 if device.type == "cpu" else 50
    for _ in range(2):
        a @ b
    rates = [2 * n**3 * k / timed(lambda: [a @ b for _ in range(k)], device) / 1e9 for _ in range(reps)]
    return statistics.median(rates)


def forward_flops(fn: Callable[[torch.Tensor, torch.Tensor], object], device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.randn(8, *IMAGE, device=device), torch.randint(0, T, (8,), device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn(x, t)
    return fc.get_total_flops() / 8


def train_flops(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device) -> float:
    """FLOPs per image of forward + backward (what a training step computes, optimizer aside)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.randn(8, *IMAGE, device=device), torch.randint(0, T, (8,), device=device)
    with FlopCounterMode(display=False) as fc:
        fn(x, t).square().mean().backward()
    return fc.get_total_flops() / 8


# --- the three libraries --------------------------------------------------------------------------
def ours_model(device: torch.device) -> Unet:
    torch.manual_seed(0)
    return Unet(dim=32, dim_mults=(1, 2), channels=1).to(device)


def lucid_setup(device: torch.device, timesteps: int = T, sampling_timesteps: int | None = None):
    torch.manual_seed(0)
    net = ddp_lib.Unet(dim=32, dim_mults=(1, 2), channels=1)
    return ddp_lib.GaussianDiffusion(net, image_size=8, timesteps=timesteps, sampling_timesteps=sampling_timesteps,
                                     objective="pred_noise", beta_schedule="linear").to(device)


def diffusers_model(device: torch.device) -> "UNet2DModel":
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       layers_per_block=2, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).to(device)


def lucid_train_step(device: torch.device, batch: int) -> Callable[[], None]:
    """denoising-diffusion-pytorch's Trainer.train step (one gradient accumulation, no AMP)."""
    diffusion = lucid_setup(device)
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-3, betas=(0.9, 0.99))
    ema = LucidEMA(diffusion, beta=0.995, update_every=10)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, *IMAGE, generator=g, device=device)  # images in [0, 1], as its dataset gives

    def step() -> None:
        loss = diffusion(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.update()
    return step


def diffusers_train_step(device: torch.device, batch: int) -> Callable[[], None]:
    """diffusers' examples/unconditional_image_generation/train_unconditional.py step (fp32)."""
    unet = diffusers_model(device)
    sched = DDPMScheduler(num_train_timesteps=T)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    ema = EMAModel(unet.parameters(), decay=0.999)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, *IMAGE, generator=g, device=device) * 2 - 1

    def step() -> None:
        noise = torch.randn(x.shape, device=device)
        t = torch.randint(0, T, (batch,), device=device).long()
        pred = unet(sched.add_noise(x, noise, t), t).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.step(unet.parameters())
    return step


def ours_speed(mode: str, device: torch.device) -> Speed:
    """compiled: fast: true plus torch.compile (what fast: true runs on CUDA; on a CPU compiled on request
    only, since eager beats it there); eager_cl: fast: true on a CPU (channels_last, eager); eager: fast: false."""
    if mode == "eager":
        return Speed()
    return replace(Speed.resolve(True, device), compile=mode == "compiled")


def ours_training(device: torch.device, batch: int, mode: str, block: int, blocks: int,
                  between: Callable[[], None]) -> list[float]:
    """Seconds per ``block`` steps of the pipeline's own ``train()``; ``between`` (the peers' blocks) runs
    after every block, so all libraries are timed in turn. The first two blocks (compile, warm-up) are dropped."""
    speed = ours_speed(mode, device)
    images = torch.randint(0, 256, (1024, *IMAGE), dtype=torch.uint8)
    process = GaussianProcess(get_beta_schedule("linear", T), "pred_noise")
    settings = TrainSettings(steps=block * (blocks + 2), batch_size=batch, lr=1e-3, warmup_steps=10,
                             ema_decay=0.999, log_every=block, checkpoint_every=10**9,
                             amp=speed.autocast_dtype is not None,
                             channels_last=speed.train_channels_last, compile=speed.compile)
    times: list[float] = []
    mark: list[float] = []

    def on_log(rows: list[dict]) -> None:
        sync(device)
        if mark:
            times.append(time.perf_counter() - mark[0])
        between()
        sync(device)
        mark[:] = [time.perf_counter()]

    train(ours_model(device), process, images, settings, seed=0, device=device, on_log=on_log, progress=False)
    return times[1:]


# --- sampling -------------------------------------------------------------------------------------
def ours_sampler(device: torch.device, batch: int, steps: int, rule: StepRule, mode: str) -> Callable[[], object]:
    """mode: compiled (fast: true plus torch.compile), eager_cl (fast: true on a CPU), eager (fast: false)."""
    speed = ours_speed(mode, device)
    process = GaussianProcess(get_beta_schedule("linear", T), "pred_noise").to(device)
    # compiled whatever the run length where asked (the table gives the steady state)
    net = sampling_model(ours_model(device).eval(), speed)
    g = torch.Generator(device=device)

    def run() -> object:
        g.manual_seed(0)
        return sample_loop(net, process, (batch, *IMAGE), steps, rule, g, device=device,
                           autocast_dtype=speed.autocast_dtype)
    return run


def lucid_sampler(device: torch.device, batch: int, steps: int, ddim: bool) -> Callable[[], object]:
    # DDPM: p_sample_loop walks all `timesteps`; DDIM: ddim_sample over `sampling_timesteps`
    d = lucid_setup(device, timesteps=T if ddim else steps, sampling_timesteps=steps if ddim else None).eval()
    fn = d.ddim_sample if ddim else d.p_sample_loop

    def run() -> object:
        with torch.inference_mode():
            return fn((batch, *IMAGE))
    return run


def diffusers_sampler(device: torch.device, batch: int, steps: int, ddim: bool) -> Callable[[], object]:
    """The loop of DDPMPipeline / DDIMPipeline.__call__ (without the PIL conversion)."""
    unet = diffusers_model(device).eval()
    sched = (DDIMScheduler if ddim else DDPMScheduler)(num_train_timesteps=T)
    g = torch.Generator(device=device)

    def run() -> object:
        g.manual_seed(0)
        sched.set_timesteps(steps)
        x = torch.randn((batch, *IMAGE), generator=g, device=device)
        with torch.inference_mode():
            for t in sched.timesteps:
                out = unet(x, t).sample
                x = (sched.step(out, t, x, eta=0.0, generator=g) if ddim else sched.step(out, t, x, generator=g)).prev_sample
        return x
    return run


def interleaved(fns: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each fn, timed in turn (A B C A B C ...), after one untimed warm-up call each."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            out[k].append(timed(fn, device))
    return out


VARIANTS = {"ours (compiled)": "compiled", "ours (eager, channels_last)": "eager_cl", "ours (eager)": "eager"}


def training_run(args, device: torch.device, block: int, reps: int, trn: dict, mm: float,
                 variants: dict[str, str]) -> dict[str, float]:
    """One interleaved training comparison, printed; returns {"training / <peer>, <variant>": ratio}."""
    # each of ours' blocks is followed by one block of each peer, and ratios are taken block by block
    # (ours against the peer blocks right after it), so a drift of the machine's speed cancels out
    steps = {"denoising-diffusion-pytorch": lucid_train_step, "diffusers": diffusers_train_step}
    peers = {k: steps[k](device, args.batch) for k in args.peers}
    for step in peers.values():
        step()
    ours_times: dict[str, list[float]] = {}
    paired: dict[str, dict[str, list[float]]] = {}  # variant -> peer -> block seconds, aligned with ours
    for name, mode in variants.items():
        blocks_now: dict[str, list[float]] = {k: [] for k in peers}

        def peer_blocks() -> None:
            for k, step in peers.items():
                blocks_now[k].append(timed(lambda: [step() for _ in range(block)], device))

        t0 = time.perf_counter()
        ours_times[name] = ours_training(device, args.batch, mode, block, reps, peer_blocks)
        paired[name] = {k: v[2:] for k, v in blocks_now.items()}  # those after ours' timed blocks
        print(f"[{name}: {time.perf_counter() - t0:.0f} s including compile and the peers' blocks]", file=sys.stderr)

    def gflops(k: str, seconds: float) -> float:
        return args.batch * block / seconds * trn["ours" if k.startswith("ours") else k] / 1e9

    print(f"\n## Training, batch {args.batch} (median of {reps} blocks of {block} steps, timed in turn)\n")
    print("| library | img/s | GFLOP/s | share of matmul |\n|---|---|---|---|")
    rate = {}
    all_peer = {k: [t for name in variants for t in paired[name][k]] for k in peers}
    for k, ts in {**ours_times, **all_peer}.items():
        rate[k] = gflops(k, statistics.median(ts))
        print(f"| {k} | {args.batch * block / statistics.median(ts):.0f} | {rate[k]:.1f} | {rate[k] / mm:.0%} |")
    best_peer = max(peers, key=lambda k: rate[k])
    print("\nPer FLOP, ours / peer, median over blocks of the ratio to the peer blocks timed right after:\n")
    print("| ours | " + " | ".join(f"/ {k}" for k in peers) + " |\n|---|" + "---|" * len(peers))
    ratios = {}
    for name in variants:
        cells = []
        for k in peers:
            r = statistics.median(gflops(name, a) / gflops(k, b) for a, b in zip(ours_times[name], paired[name][k]))
            ratios[f"training, batch {args.batch}: {name} / {k}"] = r
            cells.append(f"**{r:.2f}x**" if k == best_peer else f"{r:.2f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n({best_peer} is the faster peer.)")
    return ratios


def sampling_run(args, device: torch.device, reps: int, sample_steps: int, fwd: dict, mm: float,
                 variants: dict[str, str]) -> dict[str, float]:
    """One interleaved sampling comparison per batch and sampler, printed; returns their ratios to the
    faster peer of each row."""
    ratios = {}
    for batch in [] if args.no_sampling else args.sample_batch:
        for sampler in ("ddpm", "ddim"):
            ddim = sampler == "ddim"
            rule = StepRule("ddim", 0.0) if ddim else StepRule("ddpm")
            fns = {name: ours_sampler(device, batch, sample_steps, rule, mode) for name, mode in variants.items()}
            if "denoising-diffusion-pytorch" in args.peers:
                fns["denoising-diffusion-pytorch"] = lucid_sampler(device, batch, sample_steps, ddim)
            if "diffusers" in args.peers:
                fns["diffusers"] = diffusers_sampler(device, batch, sample_steps, ddim)
            ts = interleaved(fns, reps, device)
            print(f"\n## Sampling {sampler.upper()}, batch {batch}, {sample_steps} steps per run "
                  f"(median of {reps}, timed in turn)\n")
            print("| library | image-steps/s | GFLOP/s | share of matmul |\n|---|---|---|---|")
            srate = {}
            for k, t in ts.items():
                ips = batch * sample_steps / statistics.median(t)
                srate[k] = ips * fwd["ours" if k.startswith("ours") else k] / 1e9
                print(f"| {k} | {ips:.0f} | {srate[k]:.1f} | {srate[k] / mm:.0%} |")
            best = max(args.peers, key=lambda k: srate[k])
            print(f"\nper FLOP, against {best} (the faster peer): " + "; ".join(
                f"{k}: **{srate[k] / srate[best]:.2f}x**" for k in srate if k.startswith("ours")))
            for k in srate:
                if k.startswith("ours"):
                    ratios[f"{sampler.upper()} sampling, batch {batch}: {k} / faster peer"] = srate[k] / srate[best]
            sys.stdout.flush()
    return ratios


def summary(runs: list[dict[str, float]], rates: list[float]) -> None:
    """Each ratio's median and range over the repeated interleaved comparisons (the benchmark's noise)."""
    print(f"\n# Over {len(runs)} runs: median (min-max) of each ratio, per FLOP\n")
    print(f"float32 2048x2048 matmul: {statistics.median(rates):.1f} GFLOP/s (runs: "
          + ", ".join(f"{r:.0f}" for r in rates) + ")\n")
    print("| ratio | median | range | runs |\n|---|---|---|---|")
    for k in runs[0]:
        v = [r[k] for r in runs]
        print(f"| {k} | **{statistics.median(v):.2f}x** | {min(v):.2f}-{max(v):.2f}x | "
              + ", ".join(f"{x:.2f}" for x in v) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2: this machine)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=1,
                    help="repeat the whole interleaved comparison N times and print each ratio's median and range")
    ap.add_argument("--ours", nargs="+", choices=sorted(VARIANTS.values()), default=list(VARIANTS.values()),
                    help="which of our variants to time (default all three)")
    ap.add_argument("--peers", nargs="+", choices=("denoising-diffusion-pytorch", "diffusers"),
                    default=["diffusers"] + (["denoising-diffusion-pytorch"] if ddp_lib else []),
                    help="which peers to time (default both, or those installed)")
    ap.add_argument("--batch", type=int, default=128, help="training batch")
    ap.add_argument("--sample-batch", type=int, nargs="+", default=[64, 400],
                    help="sampling batches: 64 (the issue's) and 400 (the pipeline's sample.batch_size)")
    ap.add_argument("--sample-steps", type=int, default=None, help="steps per timed sampling run")
    ap.add_argument("--denormals", choices=("flush", "keep"), default="flush",
                    help="flush: subnormal floats flushed to zero on every CPU thread, as the train and sample stages "
                         "set it (ddpm.nn.kernels.flush_denormals; process-wide, so for every library); keep: IEEE")
    ap.add_argument("--malloc", choices=("pipeline", "default"), default="pipeline",
                    help="pipeline: glibc's malloc keeps freed memory, as the train and sample stages set it "
                         "(ddpm.nn.speed.tune_allocator; process-wide, so for every library); default: glibc's defaults")
    isa_flag.add_argument(ap)
    ap.add_argument("--quick", action="store_true", help="2 repetitions, short runs: a smoke test")
    ap.add_argument("--no-training", action="store_true", help="the sampling tables only")
    ap.add_argument("--no-sampling", action="store_true", help="the training table only (about 2 minutes on 2 cores)")
    args = ap.parse_args()
    if "denoising-diffusion-pytorch" in args.peers and ddp_lib is None:
        ap.error("denoising-diffusion-pytorch is not installed: python3 -m pip install -r benchmarks/requirements.txt, "
                 "or --peers diffusers")
    if args.runs < 1:
        ap.error(f"--runs must be at least 1, got {args.runs}")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    tuned = args.malloc == "pipeline" and tune_allocator()
    flushed = device.type == "cpu" and args.denormals == "flush" and kernels.flush_denormals()
    reps = 2 if args.quick else args.reps
    cpu = device.type == "cpu"
    block = (2 if args.quick else 10) if cpu else 20
    sample_steps = args.sample_steps or ((10 if args.quick else 50) if cpu else 200)
    variants = {name: mode for name, mode in VARIANTS.items() if mode in args.ours}
    if ISA != "native" and cpu:  # said below the header
        variants.pop("ours (compiled)", None)

    print("# ours vs " + " and ".join(f"{k} {version(k)}" for k in args.peers) + f"; torch {torch.__version__}, {device}"
          + (f", {args.threads} threads" if cpu else f" ({torch.cuda.get_device_name(device)})")
          + ("; malloc tuned as the pipeline's stages (every library)" if tuned else "; glibc's default malloc")
          + ("; subnormals flushed on every thread, as the stages (every library)" if flushed else ""))
    if cpu:
        print(isa_flag.describe(ISA))
        if ISA != "native" and "compiled" in args.ours:
            print(f"ours (compiled) left out: under --isa {ISA}, inductor's CPU code gave a NaN loss at step 1 "
                  "(issue 29; the pipeline never compiles on a CPU)")

    # FLOPs per image, counted on the meta device for every library: there attention is counted as SDPA's
    # four (backward) matrix products, as written out; on a CPU the counter counts SDPA's flash backward lower
    # (ours 107.0 vs 108.2 MFLOP/img, diffusers 136.5 vs 137.7), and ours writes attention out on a CPU, so
    # counting there would credit one library's kernel choice as FLOPs
    meta = torch.device("meta")
    params = {"ours": ours_model(meta), "diffusers": diffusers_model(meta)}  # meta modules: shapes and FLOPs, no memory
    if "denoising-diffusion-pytorch" in args.peers:
        params["denoising-diffusion-pytorch"] = lucid_setup(meta).model
    nets = {**params, "diffusers": lambda x, t: params["diffusers"](x, t).sample}
    fwd = {k: forward_flops(f, meta) for k, f in nets.items()}
    trn = {k: train_flops(f, meta) for k, f in nets.items()}
    print("\n| model | params | forward MFLOP/img | train (fwd+bwd) MFLOP/img |\n|---|---|---|---|")
    for k in nets:
        n = sum(p.numel() for p in params[k].parameters())
        print(f"| {k} | {n / 1e6:.3f}M | {fwd[k] / 1e6:.1f} | {trn[k] / 1e6:.1f} |")
    if device.type == "cpu" and ops.conv_kernels():
        print("\n(FLOPs as counted, whatever computes them: ours runs sampling's 3x3 convolutions by Winograd's"
              " F(2x2, 3x3) here, so its sampling GFLOP/s is an effective rate.)")

    runs, rates = [], []
    for run in range(args.runs):
        if args.runs > 1:
            print(f"\n# Run {run + 1} of {args.runs}")
        rates.append(matmul_gflops(device, reps))
        print(f"\nfloat32 2048x2048 matmul: {rates[-1]:.1f} GFLOP/s (median of {reps})")
        ratios = {} if args.no_training else training_run(args, device, block, reps, trn, rates[-1], variants)
        ratios.update(sampling_run(args, device, reps, sample_steps, fwd, rates[-1], variants))
        runs.append(ratios)
    if args.runs > 1:
        summary(runs, rates)


if __name__ == "__main__":
    main()
