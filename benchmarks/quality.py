"""Quality at equal compute: this project's default model against the peers', same wall-clock budget.

    dvc repro featurizer                     # the prepared digits and the FID feature space
    python3 benchmarks/quality.py            # 3x the default training time, then sampling (6 min on 2 cores)

Paper settings for all three (Ho et al. 2020): pred_noise, the linear schedule at T=1000 (the three
libraries' linear schedules are the same betas here), batch 128, AdamW at lr 1e-3 with 100 warm-up
steps, clipping at 1 and the same EMA (``ddpm.training.loop.EMA``, decay 0.999 with warm-up 10, every step).
Ours is the pipeline's own run: ``ddpm.training.loop.train`` with the model and ``fast`` switch of params.yaml.
The peers are denoising-diffusion-pytorch's ``Unet(dim=32, dim_mults=(1, 2))`` with its
``GaussianDiffusion`` loss, and diffusers' ``UNet2DModel`` ((32, 64), 2 layers, attention at 4x4) with
its ``DDPMScheduler.add_noise`` loss, as in benchmarks/peers.py.

Equal compute: ours trains ``train.steps`` steps; after each block of ``--block`` steps, each peer trains
until its own clock has caught up with ours, compile and all, so every library gets the same
wall-clock time under the same machine load. Then every EMA model samples ``sample.n_samples`` images
with the same sampler (ddpm.diffusion.samplers, DDPM 100 steps and DDIM 50 steps, one seed) and gets its FID in
the pipeline's feature space, beside the real-vs-real floor.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from ddpm.app.config import load_params
from ddpm.data.convert import model_to_uint8, uint8_to_model
from ddpm.diffusion.process import GaussianProcess
from ddpm.metrics.features import extract_features, load_featurizer
from ddpm.metrics.fid import feature_statistics, frechet_distance
from ddpm.app.paths import FEATURIZER, PREPARED, load_arrays
from ddpm.diffusion.samplers import StepRule, sample_images
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.nn.speed import Speed
from ddpm.training.loop import EMA, TrainSettings, train
from ddpm.nn.unet import Unet
from peers import diffusers_model, lucid_setup

T, LR, WARMUP, BATCH = 1000, 1e-3, 100, 128


class PeerTrainer:
    """A peer's model and loss under the same optimizer, clipping and EMA as ours; trains until told to stop."""

    def __init__(self, name: str, images: torch.Tensor, seed: int) -> None:
        self.name, self.steps, self.seconds = name, 0, 0.0
        self.images = uint8_to_model(images)  # [-1, 1]
        self.g = torch.Generator().manual_seed(seed)
        if name == "denoising-diffusion-pytorch":
            self.diffusion = lucid_setup(torch.device("cpu"))
            self.net = self.diffusion.model
            # its GaussianDiffusion normalises [0, 1] images to [-1, 1] itself
            self.loss = lambda x: self.diffusion(x * 0.5 + 0.5)
            self.predict = lambda x, t: self.net(x, t)
        else:
            from diffusers import DDPMScheduler

            self.net = diffusers_model(torch.device("cpu"))
            sched = DDPMScheduler(num_train_timesteps=T)

            def loss(x: torch.Tensor) -> torch.Tensor:
                noise = torch.randn(x.shape, generator=self.g)
                t = torch.randint(0, T, (len(x),), generator=self.g)
                return F.mse_loss(self.net(sched.add_noise(x, noise, t), t).sample, noise)
            self.loss = loss
            self.predict = lambda x, t: self.net(x, t).sample
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=LR)
        self.ema = EMA(self.net, 0.999, 10)

    def step(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = LR * min(1.0, (self.steps + 1) / WARMUP)
        idx = torch.randint(0, len(self.images), (BATCH,), generator=self.g)
        self.loss(self.images[idx]).backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        self.ema.update(self.net, self.steps)

    def train_until(self, seconds: float) -> None:
        t0 = time.perf_counter()
        start = self.seconds
        while self.seconds < seconds:
            self.step()
            self.seconds = start + time.perf_counter() - t0

    def ema_predict(self):
        ema_net = self.ema.model
        if self.name == "diffusers":
            return lambda x, t: ema_net(x, t).sample
        return ema_net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="ours' training steps (default: train.steps)")
    ap.add_argument("--block", type=int, default=50, help="ours' steps between the peers' turns")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = load_params(ROOT / "params.yaml")
    for f in (PREPARED / "train.npz", FEATURIZER / "featurizer.pt", FEATURIZER / "reference.npz"):
        if not (ROOT / f).is_file():
            raise SystemExit(f"{f} is missing: run `dvc repro featurizer` first")
    images = torch.from_numpy(load_arrays(ROOT / PREPARED / "train.npz")["images"])
    shape = tuple(images.shape[1:])
    m, speed = p.model, Speed.resolve(p.fast, "cpu")
    steps = args.steps or p.train.steps

    torch.manual_seed(p.seed)
    ours = Unet(dim=m.dim, dim_mults=tuple(m.dim_mults), channels=shape[0], dropout=m.dropout,
                attn_heads=m.attn_heads, attn_dim_head=m.attn_dim_head)
    process = GaussianProcess(get_beta_schedule("linear", T), "pred_noise")
    peers = [PeerTrainer(n, images, p.seed) for n in ("denoising-diffusion-pytorch", "diffusers")]
    settings = TrainSettings(steps=steps, batch_size=BATCH, lr=LR, warmup_steps=WARMUP, max_grad_norm=1.0,
                             ema_decay=0.999, ema_warmup=10, log_every=args.block, checkpoint_every=10**9,
                             channels_last=speed.train_channels_last,
                             compile=speed.compile)
    clock = {"ours": 0.0, "mark": time.perf_counter()}

    def on_log(rows: list[dict]) -> None:  # ours just trained a block: the peers catch up to its clock
        clock["ours"] += time.perf_counter() - clock["mark"]
        for peer in peers:
            peer.train_until(clock["ours"])
        print(f"  {clock['ours']:6.0f} s: ours step {rows[-1]['step']}, "
              + ", ".join(f"{q.name} step {q.steps}" for q in peers), file=sys.stderr, flush=True)
        clock["mark"] = time.perf_counter()

    result = train(ours, process, images, settings, seed=p.seed, on_log=on_log, progress=False)

    featurizer = load_featurizer(ROOT / FEATURIZER / "featurizer.pt")
    ref = load_arrays(ROOT / FEATURIZER / "reference.npz")
    n = p.sample.n_samples
    floor = frechet_distance(*feature_statistics(ref["holdout_features"][:n]), ref["mu"], ref["sigma"])
    models = {f"ours (dim {m.dim}, {tuple(m.dim_mults)})": (result.ema, sum(x.numel() for x in ours.parameters()),
                                                            result.step, clock["ours"])}
    for q in peers:
        models[q.name] = (q.ema_predict(), sum(x.numel() for x in q.net.parameters()), q.steps, q.seconds)
    print(f"\n## Quality at equal compute: {clock['ours']:.0f} s of training each, {n} samples, "
          f"FID in the {p.featurizer.kind} feature space (floor {floor:.3f})\n")
    rules = [("DDPM", StepRule("ddpm"), 100), ("DDIM", StepRule("ddim", 0.0), 50)]
    print("| library | params | steps trained | seconds | " + " | ".join(f"FID {r} {s}" for r, _, s in rules)
          + " |\n|---|---|---|---|" + "---|" * len(rules))
    for name, (net, n_params, n_steps, seconds) in models.items():
        fids = []
        for _, rule, s in rules:
            x = sample_images(net, process, n, shape, s, rule, seed=p.seed, batch_size=n)
            feats = extract_features(featurizer, model_to_uint8(x))
            fids.append(frechet_distance(*feature_statistics(feats), ref["mu"], ref["sigma"]))
        print(f"| {name} | {n_params / 1e6:.3f}M | {n_steps} | {seconds:.0f} | "
              + " | ".join(f"{f:.3f}" for f in fids) + " |", flush=True)


if __name__ == "__main__":
    main()
