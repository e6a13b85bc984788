"""Data parallelism: the torch.distributed plumbing that training and sampling share.

Processes are started by ``torchrun`` (``python -m torch.distributed.run``), which sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address. :func:`init` joins the process group
(gloo on the CPU, NCCL on CUDA with rank r on ``cuda:LOCAL_RANK``); without torchrun every helper
answers as a world of one process (rank 0), so single-process code paths need no branches.
:func:`relaunch` re-executes a stage module under ``torchrun --standalone`` on this machine.

Sample chunks are split round-robin (chunk k on rank k % world) and merged in chunk order on rank 0:
chunk k's noise depends only on (seed, k) (``samplers.chunk_generator``), so the merged set equals a
one-process run's byte for byte on the same hardware and thread count.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as td
import torch.nn as nn

log = logging.getLogger(__name__)
NODE_RANK_ENV = "DDPM_NODE_RANK"  # set by launch_nodes for the workers: this node's rank
# long enough for rank 0's on-train FID evaluation and checkpoint writes while the others wait
TIMEOUT = timedelta(minutes=60)


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (it sets WORLD_SIZE and LOCAL_RANK)."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def active() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if active() else 0


def world_size() -> int:
    return td.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device | str = "cpu") -> torch.device:
    """Join torchrun's process group (no-op without torchrun or when joined already); return this rank's device.

    ``device`` is the one asked for: ``cpu`` -> gloo; ``cuda`` -> NCCL on ``cuda:LOCAL_RANK``. An explicit
    ``cuda:N`` cannot hold every rank of a multi-process run and is refused.
    """
    device = torch.device(device)
    if not launched_by_torchrun():
        return device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index is not None and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError(f"device: got {str(device)!r} under torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']}; "
                             "allowed: auto, cuda or cpu (each rank uses cuda:LOCAL_RANK)")
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not active():
        backend = "nccl" if device.type == "cuda" else "gloo"
        td.init_process_group(backend, timeout=TIMEOUT, **node_ordered_rank(),
                              **({"device_id": device} if device.type == "cuda" else {}))
        atexit.register(destroy)
        log.info("rank %d of %d joined (%s, %s)", rank(), world_size(), backend, device)
    return device


def node_ordered_rank() -> dict[str, Any]:
    """``{store, rank, world_size}`` numbering the processes by node: ``node_rank x LOCAL_WORLD_SIZE + LOCAL_RANK``.

    A c10d rendezvous ignores torchrun's ``--node-rank`` and numbers the nodes in the order of their
    (address, agent pid), so rank 0, the one that writes checkpoints and the model, could land on any node.
    When :func:`launch_nodes` started us (``DDPM_NODE_RANK`` set), rank 0 is on node 0, where the
    rendezvous and DVC run; ``{}`` otherwise (torchrun's numbering). The store stays where torchrun put it:
    served by its rank 0 (or by the agent when the agent shares its store)."""
    node = os.environ.get(NODE_RANK_ENV)
    if node is None:
        return {}
    nodes, local, per_node = (int(os.environ[k]) for k in ("GROUP_WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))
    world = int(os.environ["WORLD_SIZE"])
    if not 0 <= int(node) < nodes or world != nodes * per_node:
        raise ValueError(f"--node-rank: got {node} with {nodes} node(s) of {per_node} process(es) and "
                         f"WORLD_SIZE={world}; allowed: 0..{nodes - 1}, one per node, the same "
                         "train.nproc_per_node on every node")
    hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and os.environ["RANK"] == "0"
    store = td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=hosts,
                        timeout=TIMEOUT)
    return {"store": store, "rank": int(node) * per_node + local, "world_size": world}


def destroy() -> None:
    if active():
        td.destroy_process_group()


def barrier() -> None:
    if active():
        td.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when the world has several processes, else ``model`` itself.

    Optimizer, EMA and checkpoints keep using the bare ``model`` (its parameters are the ones DDP syncs),
    so state dict keys are the same with or without DDP.
    """
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place, in one collective."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    td.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank (picklable objects; tensors travel through the CPU)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def rank_seed(seed: int, offset: int, step: int = 0) -> int:
    """The seed of this rank's noise (offset 1) or dropout (offset 2) generator: ``seed + offset`` on rank 0
    at step 0 (the single-process seeds), shifted by rank and, for a reseed on resume, by step."""
    return (int(seed) + offset + rank() * 1_000_003 + int(step) * 7_919) % (2**63 - 1)


def rank_rng_state(ckpt: dict[str, Any]) -> Optional[dict[str, Any]]:
    """This rank's saved noise/dropout RNG states from a training checkpoint: ``ckpt["rng"]`` for one process,
    ``ckpt["rng_per_rank"][rank]`` for several; None when the checkpoint was written by another world size."""
    per_rank = ckpt.get("rng_per_rank")
    if per_rank is None:
        return ckpt["rng"] if world_size() == 1 else None
    return per_rank[rank()] if len(per_rank) == world_size() else None


# --- sampling split over the ranks ----------------------------------------------------------------
def chunk_share(n_chunks: int) -> list[int]:
    """This rank's chunk indices: k with k % world == rank (ascending)."""
    return list(range(rank(), n_chunks, world_size()))


def gather_chunks(pieces: dict[int, torch.Tensor]) -> Optional[torch.Tensor]:
    """Every rank's {chunk index: tensor [n_k, ...]} concatenated in chunk order on rank 0; None elsewhere."""
    merged: dict[int, torch.Tensor] = {}
    for part in all_gather_object({k: v.cpu() for k, v in pieces.items()}):
        if set(part) & set(merged):
            raise ValueError(f"chunks {sorted(set(part) & set(merged))} were drawn by two ranks")
        merged.update(part)
    if not is_main():
        return None
    if sorted(merged) != list(range(len(merged))):
        raise ValueError(f"chunks gathered: {sorted(merged)}; expected 0..{len(merged) - 1}")
    return torch.cat([merged[k] for k in range(len(merged))])


def sample_images_sharded(model, process, num_samples: int, image_shape: Sequence[int], steps: int, rule,
                          seed: int, batch_size: int, post: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                          **kwargs: Any) -> Optional[torch.Tensor]:
    """``samplers.sample_images`` split over the ranks (chunk k on rank k % world), ``post`` applied per rank
    (e.g. ``model_to_uint8``, so only uint8 travels), merged in chunk order on rank 0; None on the other ranks.
    The result equals ``post(sample_images(...))`` of one process with the same arguments."""
    from ddpm.diffusion.samplers import sample_images

    mine = chunk_share(math.ceil(num_samples / batch_size))
    x = post(sample_images(model, process, num_samples, tuple(image_shape), steps, rule, seed=seed,
                           batch_size=batch_size, chunks=mine, **kwargs))
    if world_size() == 1:
        return x
    # every chunk holds batch_size images but the globally last one, which is last in `mine` if it is ours
    return gather_chunks(dict(zip(mine, x.split(batch_size))))


# --- launching ------------------------------------------------------------------------------------
def relaunch(module: str, args: Sequence[str], nproc_per_node: int) -> int:
    """Run ``python -m <module> <args>`` as ``nproc_per_node`` processes under ``torchrun --standalone``
    (one machine, a free port) and return torchrun's exit code (non-zero when any rank failed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node),
           "-m", module, *args]
    env = dict(os.environ)
    # torchrun would set 1 thread per process; share the cores instead (CPU runs), unless the user chose
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    log.info("relaunching under torchrun: %s", " ".join(cmd))
    return subprocess.run(cmd, env=env).returncode


# --- several machines ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Nodes:
    """Where this node stands in a multi-node run: ``nnodes`` machines, this one ``node_rank`` (0: the one
    whose address is ``endpoint``, HOST:PORT, hosting the c10d rendezvous and writing the outputs); a node
    that does not (re)join within ``rdzv_timeout`` seconds fails the job; ``max_restarts``: torchrun's
    elastic restarts of every worker after a failure (they resume from the last checkpoint)."""

    nnodes: int
    node_rank: int
    endpoint: str
    max_restarts: int = 0
    rdzv_timeout: int = 600

    def __post_init__(self) -> None:
        problems = []
        if self.nnodes < 1:
            problems.append(f"--nnodes: got {self.nnodes}; allowed: an integer >= 1")
        if not 0 <= self.node_rank < max(self.nnodes, 1):
            problems.append(f"--node-rank: got {self.node_rank}; allowed: 0..{self.nnodes - 1} (one per node)")
        host, _, port = self.endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(f"--rdzv: got {self.endpoint!r}; allowed: HOST:PORT, node 0's address and a free port")
        if self.max_restarts < 0 or self.rdzv_timeout < 1:
            problems.append(f"--max-restarts / --rdzv-timeout: got {self.max_restarts} / {self.rdzv_timeout}; "
                            "allowed: an integer >= 0 / >= 1 (seconds)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def host(self) -> str:
        return self.endpoint.rpartition(":")[0].strip("[]")

    ENV = {"nnodes": "DDPM_NNODES", "node_rank": NODE_RANK_ENV, "endpoint": "DDPM_RDZV",
           "max_restarts": "DDPM_MAX_RESTARTS", "rdzv_timeout": "DDPM_RDZV_TIMEOUT"}

    def to_env(self) -> dict[str, str]:
        """The environment that carries this layout through a command that cannot take flags (``dvc repro``)."""
        return {var: str(getattr(self, key)) for key, var in self.ENV.items()}

    @classmethod
    def from_env(cls) -> Optional["Nodes"]:
        if cls.ENV["endpoint"] not in os.environ:
            return None
        return cls(**{key: (os.environ[var] if key == "endpoint" else int(os.environ[var]))
                      for key, var in cls.ENV.items() if var in os.environ})


def local_address(host: str) -> str:
    """This machine's own address on the route to ``host`` (a UDP connect: nothing is sent)."""
    family, _, _, _, addr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        return s.getsockname()[0]


def interface_of(address: str) -> Optional[str]:
    """The network interface that holds the IPv4 ``address`` (Linux ioctl SIOCGIFADDR), or None."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                got = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address
                continue
            if socket.inet_ntoa(got[20:24]) == address:
                return name
    return None


def launch_nodes(module: str, args: Sequence[str], nodes: Nodes, nproc_per_node: int, run_id: str) -> int:
    """Run ``python -m <module> <args>`` as this node's ``nproc_per_node`` workers of a c10d rendezvous at
    ``nodes.endpoint`` and return torchrun's exit code. The settings a real network needs (found with
    each node in its own network namespace, tests/test_multinode.py):

    * ``--rdzv-conf is_host=1`` on node 0: torchrun guesses whether to host the rendezvous by resolving
      its hostname, which misses an address on a second interface (the other nodes then wait for a
      store nobody serves);
    * ``--local-addr``: this node's own address on the route to node 0; without it torchrun advertises
      the FQDN, which may resolve to 127.0.1.1 or an address the others cannot reach;
    * ``GLOO_SOCKET_IFNAME``: the interface holding that address (kept when already set); without it gloo
      binds to what the hostname resolves to, often ``lo``;
    * ``DDPM_NODE_RANK``: rank 0 on node 0 (:func:`node_ordered_rank`);
    * ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: after an elastic restart the workers' store is new (with
      the agent's shared store the restarted workers hung in ``init_process_group``; pytorch#135712).
    """
    addr = local_address(nodes.host)
    # a fresh workers' store per restart: the agent's shared one keeps the last attempt's keys, and torchrun's
    # per-node restart counts (its key prefix) differ between nodes, so restarted workers waited forever
    env = {**os.environ, NODE_RANK_ENV: str(nodes.node_rank), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    ifname = env.get("GLOO_SOCKET_IFNAME") or interface_of(addr)
    if ifname:
        env["GLOO_SOCKET_IFNAME"] = ifname
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    conf = f"is_host={int(nodes.node_rank == 0)},join_timeout={nodes.rdzv_timeout}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes.nnodes), "--nproc-per-node",
           str(nproc_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", nodes.endpoint, "--rdzv-id", run_id,
           "--rdzv-conf", conf, "--local-addr", addr, "--max-restarts", str(nodes.max_restarts),
           "-m", module, *args]
    log.info("node %d of %d (%s, gloo on %s): %s", nodes.node_rank, nodes.nnodes, addr, ifname or "?", " ".join(cmd))
    return subprocess.run(cmd, env=env).returncode
