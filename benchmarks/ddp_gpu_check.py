"""CUDA check of the data-parallel path: run under torchrun on a GPU machine,

    python -m torch.distributed.run --standalone --nproc_per_node NGPU benchmarks/ddp_gpu_check.py

Joins the NCCL group (rank r on cuda:LOCAL_RANK), trains the tiny model with checkpoints, resumes it
(per-rank CUDA RNG states), and checks that sharded sampling equals one process's samples. Prints one
line per rank; exits non-zero on failure. With one GPU it checks the NCCL plumbing at world size 1.
"""
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as td

from ddpm.training import distributed as dist
from ddpm.data.convert import model_to_uint8
from ddpm.data.datasets import load_dataset
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.samplers import StepRule, sample_images
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.training.loop import TrainSettings, train
from ddpm.nn.unet import Unet

assert dist.launched_by_torchrun(), "run me under torchrun"
device = dist.init("cuda")
assert td.get_backend() == "nccl" and device.index == torch.cuda.current_device()


def tiny():
    torch.manual_seed(0)
    return Unet(dim=32, dim_mults=(1, 2), channels=1, dropout=0.1), GaussianProcess(get_beta_schedule("cosine", 1000))


images = torch.from_numpy(load_dataset("digits").images)
folder = Path(dist.broadcast_object(tempfile.mkdtemp() if dist.is_main() else None))
s = dict(batch_size=128 * dist.world_size(), log_every=25, checkpoint_every=50, amp=True)
t0 = time.perf_counter()
full = train(*tiny(), images, TrainSettings(steps=100, **s), seed=0, device=device, progress=False)
t1 = time.perf_counter()
train(*tiny(), images, TrainSettings(steps=50, **s), seed=0, device=device, checkpoint_dir=folder, progress=False)
resumed = train(*tiny(), images, TrainSettings(steps=100, **s), seed=0, device=device, checkpoint_dir=folder,
                progress=False)
same = all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()))
process = tiny()[1].to(device)
x = dist.sample_images_sharded(full.ema, process, 1000, (1, 8, 8), 20, StepRule("ddpm"), seed=0, batch_size=128,
                               post=model_to_uint8, device=device)
if dist.is_main():
    one = model_to_uint8(sample_images(full.ema, process, 1000, (1, 8, 8), 20, StepRule("ddpm"), seed=0,
                                       batch_size=128, device=device))
    assert torch.equal(x, one), "sharded samples differ from one process's"
    shutil.rmtree(folder)
print(f"rank {dist.rank()}/{dist.world_size()} on {device} ({torch.cuda.get_device_name(device)}): "
      f"{full.images_per_second:.0f} img/s global, loss {full.history[-1]['loss']:.4f} in {t1 - t0:.1f} s; "
      f"resume bit-identical: {same} (resumed_from={resumed.resumed_from}); sharded sampling identical", flush=True)
dist.barrier()
dist.destroy()
