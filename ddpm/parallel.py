"""Batch-parallel threads on a CPU: each core runs the whole network on its own shard of the batch.

PyTorch's default splits every op of a batch across the cores (OpenMP). At this project's sizes (8x8
images, 16-64 channels) most ops last tens to hundreds of microseconds, so each one's fork, split and
join costs a large share, and both cores stream the whole batch through their caches. Splitting the
batch instead (two worker threads, one intra-op thread each, one shard each) lets every core run its
own shard start to finish with no barrier between ops; the GIL is released inside every op.
Measured on a 2-core CPU (``benchmarks/peers.py``, README "Performance"): sampling at batch 400 ran
1.2-1.7x faster and a training step (dim 32, batch 128) 1.1x faster than one batch on two OpenMP threads.

Every layer of ``ddpm.unet.Unet`` acts on each image alone (GroupNorm, not BatchNorm), so a shard's
outputs are the full batch's rows. Gradients of the shards add up in the parameters' ``.grad``
(``AccumulateGrad`` holds a lock per parameter): with exactly two shards the sum is g1 + g2 in either
order, the same bits, which is why training uses two workers whatever the core count (each with half
the intra-op threads). Dropout draws from a generator per shard, seeded from torch's global RNG, so a
run is reproducible and resumes bit for bit.
"""
from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

import torch

from .unet import dropout_generator

WORKERS = 2          # two shards: their gradient sum does not depend on which finishes first (see above)
MIN_SHARD = 8        # images: below 2 x this a batch runs as one
MAX_CHUNK = 128      # images a worker runs at once; a larger shard runs as several chunks (stays in cache)

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def cpu_workers(device: torch.device | str) -> int:
    """How many batch shards to run at once on ``device``: 2 on a CPU with at least two intra-op threads
    (``torch.get_num_threads()``), else 1 (CUDA, or a CPU process already limited to one thread)."""
    return WORKERS if torch.device(device).type == "cpu" and torch.get_num_threads() >= WORKERS else 1


def _pool(workers: int, threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` threads with ``threads`` intra-op threads each (OpenMP's thread
    count is per thread: the caller's own stays as it was)."""
    with _pools_lock:
        key = (workers, threads)
        if key not in _pools:
            _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="ddpm-shard",
                                             initializer=torch.set_num_threads, initargs=(threads,))
        return _pools[key]


def shard_slices(n: int, workers: int) -> list[slice]:
    """``n`` rows in ``workers`` contiguous shards, the first ones one row longer where n does not divide."""
    size, extra = divmod(n, workers)
    bounds = [0]
    for w in range(workers):
        bounds.append(bounds[-1] + size + (w < extra))
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def run_sharded(fn: Callable[..., Any], n: int, workers: int, args: Sequence[Any] = ()) -> list[Any]:
    """``fn(shard_index, rows)`` for each shard of ``n`` rows, in the pool's threads, in order.

    The caller's grad and inference modes (thread-local in PyTorch) hold in the workers too."""
    shards = shard_slices(n, workers)
    threads = max(1, torch.get_num_threads() // workers)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def call(i: int, rows: slice) -> Any:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(i, rows, *args)

    futures = [_pool(workers, threads).submit(call, i, rows) for i, rows in enumerate(shards)]
    return [f.result() for f in futures]


class ShardedModel:
    """A network called on batch shards in parallel threads (CPU): ``ShardedModel(net)(x, t)`` equals
    ``net(x, t)`` row for row. Batches under ``2 * MIN_SHARD`` images run as one; a shard above
    ``MAX_CHUNK`` images runs as several chunks in its thread."""

    def __init__(self, module: torch.nn.Module, workers: int = WORKERS, max_chunk: int = MAX_CHUNK) -> None:
        self.module, self.workers, self.max_chunk = module, workers, max_chunk

    def _shard(self, i: int, rows: slice, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xs, ts = x[rows], t[rows]
        k = math.ceil(len(xs) / self.max_chunk)
        if k == 1:
            return self.module(xs, ts)
        return torch.cat([self.module(xs[c], ts[c]) for c in shard_slices(len(xs), k)])

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.workers < 2 or n < 2 * MIN_SHARD or torch.is_autocast_enabled(x.device.type):
            return self.module(x, t)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(n) if t.ndim == 0 else t
        return torch.cat(run_sharded(self._shard, n, self.workers, (x, t)))


def sharded_backward(loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                     x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, scale: float,
                     workers: int = WORKERS, seeds: Optional[list[int]] = None) -> torch.Tensor:
    """Backpropagate ``scale * loss_fn(...).sum()`` over the batch in shards, one per worker thread, and
    return the per-sample losses [B] (detached). Shard i's dropout draws from a generator seeded with
    ``seeds[i]`` (drawn from torch's global RNG when not given)."""
    if seeds is None:
        seeds = torch.randint(0, 2**62, (workers,)).tolist()

    def shard(i: int, rows: slice) -> torch.Tensor:
        with dropout_generator(torch.Generator(device=x0.device).manual_seed(seeds[i])):
            per_sample = loss_fn(x0[rows], t[rows], noise[rows])
        (per_sample.sum() * scale).backward()
        return per_sample.detach()

    return torch.cat(run_sharded(shard, x0.shape[0], workers))
