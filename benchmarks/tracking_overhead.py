"""How much MLflow logging slows training: the same short run with and without a Tracker, A B A B.

`python benchmarks/tracking_overhead.py [steps]` prints the median seconds of each and the ratio,
measured in one run (this machine's speed drifts, so only the ratio means something).
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddpm.data.datasets import load_dataset
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.app.tracking.runs import Tracker
from ddpm.training.loop import TrainSettings, train
from ddpm.nn.unet import Unet

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
images = torch.from_numpy(load_dataset("digits").images)
process = GaussianProcess(get_beta_schedule("linear", 1000))
settings = TrainSettings(steps=steps, batch_size=128, log_every=50, checkpoint_every=10**9)
tmp = Path(tempfile.mkdtemp())
tracker = Tracker(enabled=True, experiment="overhead", uri=f"sqlite:///{tmp / 'mlflow.db'}")
run_id = tracker.start_run("warm-up", params={"a": 1}, tags={"kind": "train"})  # DB creation is not per step


def once(log: bool) -> float:
    torch.manual_seed(0)
    model = Unet(dim=16, dim_mults=(1, 2), channels=1, dropout=0.1)
    rid = tracker.start_run("bench", params={"steps": steps}, tags={"kind": "train"}) if log else None
    t0 = time.perf_counter()
    train(model, process, images, settings, seed=0, progress=False,
          on_log=(lambda rows: tracker.log_metrics(rid, rows)) if log else None)
    dt = time.perf_counter() - t0
    if log:
        tracker.end_run(rid)
    return dt


times = {False: [], True: []}
for _ in range(3):
    for log in (False, True):
        times[log].append(once(log))
off, on = statistics.median(times[False]), statistics.median(times[True])
print(f"{steps} steps, batch 128, loss + 4 quarter losses logged every step in batches of 50")
print(f"without MLflow: {off:.2f} s   with MLflow: {on:.2f} s   ratio {on / off:.3f} (median of 3, A B A B)")
