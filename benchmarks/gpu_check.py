"""A short CUDA check: the seed's full-size snippet 1, and the training loop with AMP on the GPU.

Run on a GPU machine: `python benchmarks/gpu_check.py`. Prints timings; exits non-zero on failure.
"""
import time

import torch

from ddpm import GaussianDiffusion, Unet
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
print("GPU CHECK OK")
