"""Data-parallel training and sharded sampling with 2 gloo processes on the CPU (torch.multiprocessing.spawn).

* exact: a DDP run of 3 steps (2 ranks x half-batches, grad_accum 2) updates the weights as one
  process does on the same full batches (same images, same timesteps and noise): every optimizer step
  sees the same gradients (1e-6 relative; no clipping, so a scale error would show) and the first
  update gives the same weights within 1e-6;
  the two ranks' shards are disjoint and together are the one-process batch; resuming a 2-rank run
  from its checkpoint is bit-identical to the uninterrupted 2-rank run.
* statistical: 2 processes and 1 process with the same global batch reach the same loss and FID
  within the seed-to-seed spread of 1-process runs (numbers in ``test_two_processes_train_like_one``).
* exact: 2 processes draw the same uint8 sample set as 1 process, byte for byte.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ddpm import distributed as dist
from ddpm.config import ConfigError, Params, params_from_dict
from ddpm.data import load_dataset, model_to_uint8
from ddpm.diffusion import GaussianProcess
from ddpm.fid import extract_features, feature_statistics, frechet_distance, train_classifier
from ddpm.samplers import StepRule, sample_images
from ddpm.schedules import get_beta_schedule
from ddpm.train import TrainSettings, checkpoint_path, load_checkpoint, train
from ddpm.unet import Unet


# --- spawning ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    # what torchrun would set; dist.init() reads it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.TIMEOUT = timedelta(seconds=120)  # a hang fails the test instead of stalling it for an hour
    assert dist.init("cpu") == torch.device("cpu") and dist.world_size() == world and dist.rank() == rank
    try:
        fn(*args)
    finally:
        dist.destroy()


def spawn(fn, *args, world: int = 2) -> None:
    """Run ``fn(*args)`` in ``world`` gloo processes on 127.0.0.1 (an exception in any fails the caller)."""
    mp.spawn(_worker, args=(world, _free_port(), fn, args), nprocs=world, join=True)


# --- a tiny model ------------------------------------------------------------------------------------
class RecordingProcess(GaussianProcess):
    """Records every (x0, t, noise) the training loop draws; ``replay`` substitutes given ones instead."""

    def __init__(self, *args, replay=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.replay = [], replay

    def losses(self, model, x0, t, noise):
        if self.replay is not None:
            want_x0, t, noise = self.replay[len(self.calls)]
            assert torch.equal(x0, want_x0), "one process drew other images than the ranks' shards together"
        self.calls.append((x0.clone(), t.clone(), noise.clone()))
        return super().losses(model, x0, t, noise)


def tiny(dropout=0.0, replay=None, T=100):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Unet(dim=8, dim_mults=(1, 2), channels=1, dropout=dropout, attn_heads=1, attn_dim_head=8)
    return model, RecordingProcess(get_beta_schedule("linear", T), replay=replay)


def digits(n=None):
    images = torch.from_numpy(load_dataset("digits").images)
    return images if n is None else images[:n]


EXACT = dict(batch_size=16, grad_accum=2, lr=2e-3, warmup_steps=2, max_grad_norm=None, ema_decay=0.9,
             log_every=2, checkpoint_every=2, keep_checkpoints=3)


@contextlib.contextmanager
def optimizer_steps(model):
    """Records, per optimizer step, {name: grad} as the step sees it (after DDP's all-reduce and gradient
    accumulation) and {name: weight} after it."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[str, list[dict[str, torch.Tensor]]] = {"grads": [], "weights": []}

    def record(key, attr):
        def hook(opt, args, kwargs):
            seen[key].append({names[id(p)]: getattr(p, attr).detach().clone()
                              for g in opt.param_groups for p in g["params"]})
        return hook

    handles = [register_optimizer_step_pre_hook(record("grads", "grad")),
               register_optimizer_step_post_hook(record("weights", "data"))]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _exact_worker(out) -> None:
    rank = dist.rank()
    model, process = tiny()
    with optimizer_steps(model) as steps:
        r = train(model, process, digits(40), TrainSettings(steps=3, **EXACT), seed=5, checkpoint_dir=out / "full",
                  progress=False)
    torch.save({"calls": process.calls, **steps, "model": r.model.state_dict(), "ema": r.ema.state_dict(),
                "history": r.history}, out / f"rank{rank}.pt")
    # the same run interrupted after step 2 (its checkpoint), then resumed by new processes' state
    model, process = tiny()
    train(model, process, digits(40), TrainSettings(steps=2, **EXACT), seed=5, checkpoint_dir=out / "cut",
          progress=False)
    model, _ = tiny()
    with torch.no_grad():  # everything must come from the checkpoint: scramble the weights
        for p in model.parameters():
            p.add_(1.0)
    r2 = train(model, tiny()[1], digits(40), TrainSettings(steps=3, **EXACT), seed=5, checkpoint_dir=out / "cut",
               progress=False)
    torch.save({"model": r2.model.state_dict(), "ema": r2.ema.state_dict(), "history": r2.history,
                "resumed_from": r2.resumed_from}, out / f"resumed{rank}.pt")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(_exact_worker, out)
    return out


def test_ddp_steps_equal_one_process_on_the_full_batch(exact_runs):
    tmp_path = exact_runs
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    calls = [ranks[0]["calls"], ranks[1]["calls"]]
    assert len(calls[0]) == len(calls[1]) == 3 * 2  # 3 steps x grad_accum 2, per rank
    for c0, c1 in zip(*calls):
        assert len(c0[0]) == len(c1[0]) == 16 // 2 // 2  # global batch 16 = 2 micro-batches x 2 ranks x 4
        assert not torch.equal(c0[2], c1[2]), "both ranks drew the same noise"
    # only rank 0 wrote checkpoints, with one RNG state per rank
    ckpt = load_checkpoint(checkpoint_path(tmp_path / "full", 3))
    assert len(ckpt["rng_per_rank"]) == 2 and not torch.equal(ckpt["rng_per_rank"][0]["noise"],
                                                              ckpt["rng_per_rank"][1]["noise"])
    # one process on the full batches: the ranks' (x0, t, noise) concatenated in rank order
    replay = [tuple(torch.cat([c0[i], c1[i]]) for i in range(3)) for c0, c1 in zip(*calls)]
    model, process = tiny(replay=replay)
    with optimizer_steps(model) as want:
        ref = train(model, process, digits(40), TrainSettings(steps=3, **EXACT), seed=5, progress=False)
    assert len(process.calls) == 6  # and every x0 equalled the shards' concatenation (asserted in replay)
    assert _max_diff(want["weights"][0], tiny()[0].state_dict()) > 1e-3, "the weights did not move"
    # AdamW's first step is lr * g / (|g| + 1e-8) per element: where |g| is near 1e-8 (and the conv biases
    # ahead of a GroupNorm, whose gradient is 0 up to rounding) it turns float32 rounding into steps up to
    # lr, one process or two. So: the same gradients everywhere; the same update where |g| > 1e-6.
    g1 = want["grads"][0]
    sure = {k: g.abs() > 1e-6 for k, g in g1.items()}
    assert sum(m.sum().item() for m in sure.values()) > 0.9 * sum(m.numel() for m in sure.values())
    for r in ranks:
        assert len(r["grads"]) == len(want["grads"]) == 3
        # the gradients every step uses (after DDP's all-reduce of the half-batches and accumulation):
        # the same up to float32 rounding (measured: 1.3e-7 at gradients up to 0.58)
        for a, b in zip(r["grads"], want["grads"]):
            scale = max(v.abs().max().item() for v in b.values())
            assert _max_diff(a, b) < 1e-6 * scale, (_max_diff(a, b), scale)
        # the first update where it is well conditioned: within 1e-6 (measured 1.5e-8; 7e-5 over all elements)
        w1, v1 = r["weights"][0], want["weights"][0]
        assert max((w1[k] - v1[k])[sure[k]].abs().max().item() for k in w1 if sure[k].any()) < 1e-6
        # after 3 steps, with that noise fed back: 1e-5 (measured 2.1e-6) but in the flat tensors, where the
        # bound is the step size, lr per step (measured 7.8e-4); the loss curve within 1e-6 (measured 6e-8)
        flat = {k for k in g1 if max(g[k].abs().max().item() for g in want["grads"]) < 1e-8}
        assert flat and all(k.endswith("conv1.bias") for k in flat), flat
        for key in ("model", "ema"):
            got, exp = r[key], getattr(ref, key).state_dict()
            assert _max_diff(*({k: v for k, v in w.items() if k not in flat} for w in (got, exp))) < 1e-5, key
            assert _max_diff(got, exp) < 3 * EXACT["lr"], key
        for a, b in zip(r["history"], ref.history):
            assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
    # resume of the 2-rank run from its step-2 checkpoint: bit-identical to the uninterrupted run
    for rank in range(2):
        resumed = torch.load(tmp_path / f"resumed{rank}.pt", weights_only=False)
        assert resumed["resumed_from"] == 2
        assert _max_diff(resumed["model"], ranks[rank]["model"]) == 0.0
        assert _max_diff(resumed["ema"], ranks[rank]["ema"]) == 0.0
        assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in ranks[rank]["history"]]


def test_one_process_resumes_a_two_process_checkpoint(exact_runs, tmp_path, caplog):
    """Another world size: weights, optimizer and data order continue; the noise RNGs are reseeded."""
    ckpt_dir = tmp_path / "cut"
    ckpt_dir.mkdir()
    shutil.copy(checkpoint_path(exact_runs / "cut", 2), ckpt_dir)  # the 2-rank run's step-2 checkpoint
    model, process = tiny()
    r = train(model, process, digits(40), TrainSettings(steps=3, **EXACT), seed=5, checkpoint_dir=ckpt_dir,
              progress=False)
    assert r.resumed_from == 2 and r.step == 3 and "reseeded from (seed, step, rank)" in caplog.text
    assert math.isfinite(r.history[-1]["loss"])


def test_batch_must_split_over_processes(tmp_path):
    with pytest.raises(ConfigError) as err:
        raw = Params().to_dict()
        raw["train"].update(batch_size=100, grad_accum=2, nproc_per_node=3)
        raw["sample"]["nproc_per_node"] = 0
        params_from_dict(raw)
    found = "\n".join(err.value.problems)
    assert "train.batch_size: got 100; allowed: a multiple of train.grad_accum x train.nproc_per_node = 2 x 3" in found
    assert "sample.nproc_per_node: got 0; allowed: an integer >= 1" in found
    raw = Params().to_dict()
    raw["train"]["nproc_per_node"] = 0
    with pytest.raises(ConfigError, match=r"train.nproc_per_node: got 0; allowed: an integer >= 1"):
        params_from_dict(raw)
    spawn(_odd_batch_worker)


def _odd_batch_worker() -> None:
    model, process = tiny()
    with pytest.raises(ValueError, match=r"train.batch_size=6 must be divisible by train.grad_accum=2 x 2 processes"):
        train(model, process, digits(8), TrainSettings(steps=1, batch_size=6, grad_accum=2), seed=0, progress=False)


# --- sampling -----------------------------------------------------------------------------------------
SAMPLE = dict(num_samples=10, image_shape=(1, 8, 8), steps=4, rule=StepRule("ddpm"), seed=7, batch_size=3)


def _sample_worker(out) -> None:
    model, process = tiny()
    x = dist.sample_images_sharded(model, process, post=model_to_uint8, **SAMPLE)
    assert (x is None) == (dist.rank() != 0)
    if x is not None:
        torch.save(x, out / "sharded.pt")


def test_two_processes_sample_the_same_bytes(tmp_path):
    spawn(_sample_worker, tmp_path)  # 4 chunks (3, 3, 3, 1 images): rank 0 draws 0 and 2, rank 1 draws 1 and 3
    sharded = torch.load(tmp_path / "sharded.pt")
    model, process = tiny()
    one = model_to_uint8(sample_images(model, process, **SAMPLE))
    assert sharded.dtype == torch.uint8 and sharded.shape == (10, 1, 8, 8)
    assert np.array_equal(sharded.numpy(), one.numpy())
    assert not torch.equal(one[:3], one[3:6])  # chunks differ, so a wrong order would show


def test_gather_refuses_missing_or_repeated_chunks():
    with pytest.raises(ValueError, match=r"chunks gathered: \[0, 2\]; expected 0..1"):
        dist.gather_chunks({0: torch.zeros(1), 2: torch.zeros(1)})
