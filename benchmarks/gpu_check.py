"""A short CUDA check: the seed's full-size snippet 1, and the training loop with AMP on the GPU.

Run on a GPU machine: `python benchmarks/gpu_check.py`. Prints timings; exits non-zero on failure.
"""
import time

import torch

from ddpm import GaussianDiffusion, LearnedGaussianDiffusion, Unet
from ddpm.metrics.nll import exact_bound, stratified_bound, summarize
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.samplers import StepRule, sample_images
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.training.loop import TrainSettings, train

assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda")
print(torch.__version__, torch.cuda.get_device_name())

# snippet 1 at full size: Unet(dim=64, (1, 2, 4, 8)), 128x128 RGB, T = 1000, 1000 DDPM sampling steps
model = Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=True).to(dev)
diffusion = GaussianDiffusion(model, image_size=128, timesteps=1000)
t0 = time.perf_counter()
loss = diffusion(torch.rand(8, 3, 128, 128, device=dev))
loss.backward()
torch.cuda.synchronize()
t1 = time.perf_counter()
sampled = diffusion.sample(batch_size=4)
torch.cuda.synchronize()
t2 = time.perf_counter()
assert sampled.shape == (4, 3, 128, 128) and 0 <= sampled.min() and sampled.max() <= 1
print(f"snippet 1 full size: loss {loss.item():.4f} in {t1 - t0:.2f} s; sample(batch_size=4), 1000 steps, "
      f"in {t2 - t1:.1f} s")

# the training loop on CUDA with bf16 autocast, then sampling with every rule
m = Unet(dim=32, dim_mults=(1, 2), channels=1, dropout=0.1)
p = GaussianProcess(get_beta_schedule("cosine", 1000))
imgs = torch.randint(0, 256, (512, 1, 8, 8), dtype=torch.uint8)
r = train(m, p, imgs, TrainSettings(steps=200, batch_size=128, amp=True, log_every=50, checkpoint_every=10**9),
          seed=0, device=dev, progress=False)
print(f"train on CUDA, bf16: {r.images_per_second:.0f} img/s, final loss {r.history[-1]['loss']:.4f}")
for rule in (StepRule("ddpm"), StepRule("ddpm_large"), StepRule("ddim", 0.0)):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    x = sample_images(r.ema, p, 1024, (1, 8, 8), 100, rule, seed=0, batch_size=1024, device=dev)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert torch.isfinite(x).all()
    print(f"sample {rule.label}: 1024 x 100 steps in {dt:.2f} s ({1024 * 100 / dt:.0f} image-steps/s)")
a = sample_images(r.ema, p, 64, (1, 8, 8), 20, StepRule("ddim", 0.0), seed=1, device=dev)
b = sample_images(r.ema, p, 64, (1, 8, 8), 20, StepRule("ddim", 0.0), seed=1, device=dev)
print("DDIM eta=0 deterministic on CUDA:", torch.equal(a, b))

# learned variances (Nichol & Dhariwal eq. 15) and L_hybrid through the public API, then the bound on CUDA
lm = Unet(dim=32, dim_mults=(1, 2), channels=1, learned_variance=True).to(dev)
ld = LearnedGaussianDiffusion(lm, image_size=8, timesteps=1000).to(dev)
hybrid = ld(torch.rand(64, 1, 8, 8, device=dev))
hybrid.backward()
assert torch.isfinite(hybrid) and all(torch.isfinite(q.grad).all() for q in lm.parameters() if q.grad is not None)
drawn = ld.sample(batch_size=16)
assert drawn.shape == (16, 1, 8, 8) and 0 <= drawn.min() and drawn.max() <= 1
print(f"LearnedGaussianDiffusion on CUDA: L_hybrid {hybrid.item():.4f}, sample(batch_size=16) in [0, 1]")
r.ema.eval()
x0 = imgs[:64].to(dev).float() / 127.5 - 1
t0 = time.perf_counter()
exact = exact_bound(r.ema, p, x0, bin_width=2 / 255, generator=torch.Generator(dev).manual_seed(0))
t1 = time.perf_counter()
est = stratified_bound(r.ema, p, x0, bin_width=2 / 255, n_t=50, generator=torch.Generator(dev).manual_seed(0))
t2 = time.perf_counter()
e, s = summarize(exact), summarize(est)
print(f"bound on CUDA, 64 images: exact (T terms) {e['bpd']:.3f} bits/dim [{e['bpd_lo']:.3f}, {e['bpd_hi']:.3f}] in "
      f"{t1 - t0:.1f} s; stratified n_t=50 {s['bpd']:.3f} [{s['bpd_lo']:.3f}, {s['bpd_hi']:.3f}] in {t2 - t1:.1f} s")
assert abs(e["bpd"] - s["bpd"]) < 0.05 * e["bpd"], "the estimate disagrees with the exact bound"
print("GPU CHECK OK")
