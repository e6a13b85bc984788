"""One node's worker for tests/test_multinode.py (run as `python -m multinode_worker OUT` under torchrun, or
called by torch.multiprocessing as ``work(OUT)``): the 3 recorded steps of test_distributed's exact run
and its sharded sample set, written to OUT by whichever rank holds them, plus one line saying where the
process ran and which interface gloo used."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ddpm.training import distributed as dist
from ddpm.data.convert import model_to_uint8
from ddpm.training.loop import TrainSettings, train
from test_distributed import EXACT, SAMPLE, digits, optimizer_steps, tiny


def work(out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank = dist.rank()
    model, process = tiny()
    with optimizer_steps(model) as steps:
        r = train(model, process, digits(40), TrainSettings(steps=3, **EXACT), seed=5, progress=False)
    torch.save({"calls": process.calls, **steps, "model": r.model.state_dict(), "ema": r.ema.state_dict(),
                "history": r.history}, out / f"rank{rank}.pt")
    x = dist.sample_images_sharded(*tiny(), post=model_to_uint8, **SAMPLE)
    if x is not None:
        torch.save(x, out / "sharded.pt")
    where = {"node": os.environ.get(dist.NODE_RANK_ENV), "rank": rank, "world": dist.world_size(),
             "torchrun_rank": os.environ.get("RANK"), "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
             "master_addr": os.environ.get("MASTER_ADDR"), "cwd": os.getcwd()}
    print("WORKER " + json.dumps(where), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init("cpu")
    try:
        work(sys.argv[1])
    finally:
        dist.destroy()
