"""Two nodes on one machine: two torchrun agents (`--nnodes 2`, one process each, a c10d rendezvous), each
in its own working copy, started by ``ddpm.training.distributed.launch_nodes`` (what `python -m stages.train
--nnodes 2 --node-rank R --rdzv HOST:PORT` uses).

* exact: the two nodes' 3 recorded steps equal one process on the same full batches (the tolerances of
  tests/test_distributed.py) and are bit-identical to two processes on one node; their sharded sample
  set equals one process's byte for byte; rank 0 (the writer) is on node 0 whatever order the
  rendezvous put the agents in;
* the same with each node in its own network namespace, joined by a veth pair with addresses of their
  own, so the rendezvous and gloo cross a real interface (skipped where `ip netns` is not permitted);
* the one command per node (`python -m stages.train --nnodes 2 ...`) in two git clones that share the
  prepare stage's outputs through a DVC remote: node 0 runs it through `dvc repro`, so a following
  `dvc repro` finds `train` up to date; with `--max-restarts 1`, SIGKILL of node 1's worker after a
  checkpoint restarts both nodes, which resume from it and end with the weights of an uninterrupted
  run, in one MLflow run; a node that never rejoins fails the job after `--rdzv-timeout`, and no
  model is written.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ci_tools import need

from ddpm.data.convert import model_to_uint8
from ddpm.diffusion.samplers import sample_images
from test_distributed import SAMPLE, _max_diff, check_like_one_process, spawn, tiny

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# --- processes and namespaces ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "DDPM_", "GLOO_", "PET_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(copy), str(copy / "tests")]), OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
    return env


@contextlib.contextmanager
def started(*commands: tuple[list[str], Path, dict]):
    """Popen each (argv, cwd, env) in a session of its own; in the end every one of them is SIGKILLed with
    its process group and every process below it (torchrun starts each worker in a session of its own),
    finished or not."""
    procs = []
    try:
        for argv, cwd, env in commands:
            procs.append(subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        yield procs
    finally:
        below = [pid for p in procs for pid, _ in descendants(p.pid)]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in procs:
            p.wait()


def outputs(procs, timeout: float = 240) -> list[str]:
    return [p.communicate(timeout=timeout)[0] for p in procs]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([need("ip"), *args], capture_output=True, text=True, check=check)


@contextlib.contextmanager
def veth_namespaces():
    """Two network namespaces joined by a veth pair, with addresses of their own in a private /30 picked
    here: yields [(namespace, address, interface)] for nodes 0 and 1. Node 0 gets the higher address, so
    the c10d rendezvous (which orders nodes by address) puts node 1 first. Removed in the end."""
    need("ip")
    tag = f"h{os.getpid() % 100000}{random.randrange(1000)}"
    subnet = f"10.{random.randrange(100, 250)}.{random.randrange(256)}"
    nodes = [(f"{tag}n0", f"{subnet}.2", f"{tag}v0"), (f"{tag}n1", f"{subnet}.1", f"{tag}v1")]
    made = []
    try:
        for ns, _, _ in nodes:
            r = ip("netns", "add", ns, check=False)
            if r.returncode:
                pytest.skip(f"`ip netns add` is not permitted here: {r.stderr.strip()}")
            made.append(ns)
        ip("link", "add", nodes[0][2], "type", "veth", "peer", "name", nodes[1][2])
        for ns, addr, dev in nodes:
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and with it the pair
            ip("netns", "del", ns, check=False)


# --- two nodes, exact -----------------------------------------------------------------------------------
def working_copy(path: Path) -> Path:
    """What a node needs for the exact run: the package and the tests' tiny model."""
    shutil.copytree(ROOT / "ddpm", path / "ddpm", ignore=shutil.ignore_patterns("__pycache__"))
    (path / "tests").mkdir(parents=True)
    for name in ("test_distributed.py", "multinode_worker.py", "ci_tools.py"):
        shutil.copy(TESTS / name, path / "tests" / name)
    return path


LAUNCH = ("import sys; from ddpm.training import distributed as d; "
          "raise SystemExit(d.launch_nodes('multinode_worker', ['out'], d.Nodes(2, int(sys.argv[1]), sys.argv[2], "
          "rdzv_timeout=60), 1, 'ddpm-multinode-test'))")


def run_two_nodes(tmp_path: Path, endpoint: str, prefixes=([], [])) -> tuple[list[Path], list[str]]:
    """Node 1 starts first (the rendezvous would make it rank 0 on localhost, where agents are ordered by
    pid); each node runs in its own copy, ``prefixes[r]`` before its command (``ip netns exec NS``)."""
    copies = [working_copy(tmp_path / f"node{r}") for r in range(2)]
    cmds = [([*prefixes[r], sys.executable, "-c", LAUNCH, str(r), endpoint], copies[r], base_env(copies[r]))
            for r in (1, 0)]
    with started(*cmds) as procs:
        logs = outputs(procs)
        codes = [p.returncode for p in procs]
    logs = logs[::-1]  # node 0, node 1
    assert codes == [0, 0], "\n\n".join(log[-4000:] for log in logs)
    return copies, logs


def workers(logs: list[str]) -> list[dict]:
    return [json.loads(line.split("WORKER ", 1)[1]) for log in logs for line in log.splitlines() if "WORKER {" in line]


@pytest.fixture(scope="module")
def local_pair(tmp_path_factory) -> list[dict]:
    """The same worker as two processes on one node (torch.multiprocessing, 127.0.0.1)."""
    out = tmp_path_factory.mktemp("local")
    spawn(_local_pair, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def check_two_nodes(copies: list[Path], logs: list[str], local_pair: list[dict]) -> list[dict]:
    seen = workers(logs)
    assert [(w["node"], w["rank"], w["world"]) for w in seen] == [("0", 0, 2), ("1", 1, 2)], seen
    assert [Path(w["cwd"]) for w in seen] == copies  # each node ran in its own copy
    # each rank's file is in its own node's copy: rank 0 (the writer) on node 0
    ranks = [torch.load(copies[r] / "out" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert not (copies[0] / "out" / "rank1.pt").exists() and not (copies[1] / "out" / "rank0.pt").exists()
    check_like_one_process(ranks)  # like one process on the full batches (test_distributed's tolerances)
    # bit-identical to two processes on one node: the same maths, over another wire
    for r, local in enumerate(local_pair):
        for key in ("model", "ema"):
            assert _max_diff(ranks[r][key], local[key]) == 0.0, key
        assert [h["loss"] for h in ranks[r]["history"]] == [h["loss"] for h in local["history"]]
    # sharded sampling over the two nodes: one process's bytes
    sharded = torch.load(copies[0] / "out" / "sharded.pt")
    one = model_to_uint8(sample_images(*tiny(), **SAMPLE))
    assert sharded.dtype == torch.uint8 and np.array_equal(sharded.numpy(), one.numpy())
    assert not (copies[1] / "out" / "sharded.pt").exists()
    return seen


def _local_pair(out) -> None:
    from multinode_worker import work

    work(out)


@pytest.mark.timeout(300)
def test_two_nodes_on_localhost_train_and_sample_like_one_process(tmp_path, local_pair):
    copies, logs = run_two_nodes(tmp_path, f"127.0.0.1:{free_port()}")
    seen = check_two_nodes(copies, logs, local_pair)
    print("\n".join(f"node {w['node']}: rank {w['rank']} of {w['world']} (torchrun's rank {w['torchrun_rank']}), "
                    f"gloo on {w['gloo_ifname']}, store at {w['master_addr']}" for w in seen))


@pytest.mark.timeout(300)
def test_two_nodes_in_network_namespaces_over_a_veth_pair(tmp_path, local_pair):
    with veth_namespaces() as nodes:
        endpoint = f"{nodes[0][1]}:29500"  # node 0's address
        copies, logs = run_two_nodes(tmp_path, endpoint, [["ip", "netns", "exec", ns] for ns, _, _ in nodes])
        seen = check_two_nodes(copies, logs, local_pair)
        for w, (_, addr, dev) in zip(seen, nodes):  # gloo on the veth, not lo; the workers' store on a veth
            assert w["gloo_ifname"] == dev and w["master_addr"] == nodes[1][1], w  # (torchrun's rank 0: node 1)
        assert seen[0]["torchrun_rank"] == "1"  # the rendezvous ordered node 1 (lower address) first
        print("\n".join(f"node {w['node']} in {ns} at {addr}: rank {w['rank']} of {w['world']} (torchrun's rank "
                        f"{w['torchrun_rank']}), gloo on {w['gloo_ifname']}, store at {w['master_addr']}"
                        for w, (ns, addr, _) in zip(seen, nodes)))


# --- one command per node, through DVC; elastic recovery ----------------------------------------------
def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid`` (from /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        kids = [c for c, p in parent.items() if p == todo[0]]
        todo = todo[1:] + kids
        for c in kids:
            with contextlib.suppress(OSError):
                found.append((c, (Path("/proc") / str(c) / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
    return found


def wait_for(cond, procs, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline and all(p.poll() is None for p in procs), f"gave up waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def clones(tmp_path_factory):
    """Node 0: a git + DVC repository of the tiny pipeline that ran prepare and featurizer and pushed them to
    a local-folder remote; node 1: a git clone of it that pulled the prepare stage's outputs (all it reads)."""
    from test_pipeline import TINY, make_repo, run

    tmp = tmp_path_factory.mktemp("nodes")
    params = json.loads(json.dumps(TINY))
    params["diffusion"]["schedules"] = ["linear"]
    params["train"].update(steps=160, checkpoint_every=40, log_every=20, fid_every=0, keep_checkpoints=2)
    node0, env = make_repo(tmp / "node0", params)
    run(["dvc", "remote", "add", "-d", "local", str(tmp / "remote")], node0, env)
    run(["dvc", "repro", "featurizer"], node0, env)
    run(["dvc", "push"], node0, env)
    run(["git", "add", "-A"], node0, env)
    run(["git", "commit", "-qm", "prepare, featurizer, remote"], node0, env)
    run(["git", "clone", "-q", str(node0), str(tmp / "node1")], tmp, env)
    run(["dvc", "pull", "prepare"], tmp / "node1", env)
    return [node0, tmp / "node1"], env


def train_cmd(rank: int, endpoint: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--nnodes", "2", "--node-rank", str(rank), "--rdzv", endpoint,
            *extra, "linear", "0"]


def model_sha(node0: Path) -> str:
    return hashlib.sha256((node0 / "models" / "linear" / "seed0" / "model.pt").read_bytes()).hexdigest()


def train_runs(node0: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{node0 / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    return client, client.search_runs([exp.experiment_id], "tags.kind = 'train'", order_by=["attributes.start_time"])


@pytest.mark.timeout(600)
def test_one_command_per_node_records_the_model_and_recovers(clones):
    """Uninterrupted, then with node 1's worker SIGKILLed after a checkpoint (`--max-restarts 1`)."""
    from test_pipeline import run

    (node0, node1), env = clones
    port = free_port()
    with started(*[(train_cmd(r, f"127.0.0.1:{port}", "--rdzv-timeout", "60"), n, env)
                   for r, n in ((1, node1), (0, node0))]) as procs:
        logs = outputs(procs)
        assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-4000:] for log in logs)
    assert "Running stage 'train@linear-0'" in logs[1]  # node 0 trained through dvc repro
    assert not (node1 / "models").exists() and not (node1 / "mlflow.db").exists()  # rank 0 is on node 0
    uninterrupted = model_sha(node0)
    status = run(["dvc", "status", "train@linear-0"], node0, env)
    assert "up to date" in status, status
    dry = run(["dvc", "repro", "--dry", "sample@linear-0-ddim-eta0.0-3"], node0, env)  # what repro would run next
    assert "Stage 'train@linear-0' didn't change, skipping" in dry and "Running stage 'sample@" in dry, dry

    # the same job; node 1's worker is SIGKILLed once node 0's first checkpoint exists
    ckpts = node0 / "checkpoints" / "linear" / "seed0"
    port = free_port()
    with started(*[(train_cmd(r, f"127.0.0.1:{port}", "--max-restarts", "1", "--rdzv-timeout", "60"), n, env)
                   for r, n in ((1, node1), (0, node0))]) as procs:
        wait_for(lambda: list(ckpts.glob("ckpt-*.pt")), procs, "node 0's first checkpoint")
        worker = [pid for pid, cmd in descendants(procs[0].pid)
                  if "stages.train linear 0" in cmd and "torch.distributed.run" not in cmd]
        assert len(worker) == 1, descendants(procs[0].pid)
        os.kill(worker[0], signal.SIGKILL)
        killed_after = max(int(p.stem.split("-")[1]) for p in ckpts.glob("ckpt-*.pt"))
        logs = outputs(procs)
        assert [p.returncode for p in procs] == [0, 0], "\n\n".join(
            "\n".join(line for line in log.splitlines() if "train: " not in line)[-6000:] for log in logs)
    lines = [line for log in logs for line in log.splitlines()
             if any(k in line for k in ("elastic restart", "resuming from", "exitcode: -9", "will restart"))]
    print("\n".join(lines))
    resumed = [line for line in logs[1].splitlines() if "elastic restart 1, resuming at step" in line]
    assert len(resumed) == 1, "\n".join(l for log in logs for l in log.splitlines() if "train:" not in l)[-6000:]
    step = int(resumed[0].split("resuming at step ")[1].split()[0])
    assert killed_after <= step < 160 and f"(step {step})" in logs[1]
    assert model_sha(node0) == uninterrupted  # the same final weights (and file) as the uninterrupted run
    print(f"model.pt sha256 after the restart {model_sha(node0)}; uninterrupted {uninterrupted}")
    client, runs = train_runs(node0)
    assert len(runs) == 2  # the uninterrupted run's, and one for the interrupted job (not two)
    last = runs[-1]
    assert last.info.status == "FINISHED" and last.data.tags["elastic_restarts"] == "1"
    assert last.data.tags["resumed_from"] == str(step) and last.data.tags["model_sha256"] == uninterrupted
    assert [m.step for m in client.get_metric_history(last.info.run_id, "elastic_restart")] == [step]
    assert "up to date" in run(["dvc", "status", "train@linear-0"], node0, env)


@pytest.mark.timeout(600)
def test_a_node_that_never_rejoins_fails_the_job_and_writes_no_model(clones):
    (node0, node1), env = clones
    ckpts = node0 / "checkpoints" / "linear" / "seed0"
    shutil.rmtree(ckpts, ignore_errors=True)
    port = free_port()
    args = ("--max-restarts", "1", "--rdzv-timeout", "8")
    with started(*[(train_cmd(r, f"127.0.0.1:{port}", *args), n, env) for r, n in ((1, node1), (0, node0))]) as procs:
        wait_for(lambda: list(ckpts.glob("ckpt-*.pt")), procs, "node 0's first checkpoint")
        node1 = [pid for pid, _ in descendants(procs[0].pid)]  # the worker is in a session of its own
        os.killpg(procs[0].pid, signal.SIGKILL)  # node 1 is gone: its command, agent and worker
        for pid in node1:
            os.kill(pid, signal.SIGKILL)
        log = procs[1].communicate(timeout=300)[0]
        assert procs[1].returncode != 0
    assert "RendezvousTimeoutError" in log, log[-4000:]
    assert "train@linear-0 failed (exit" in log and "--rdzv-timeout=8 s" in log, log[-3000:]
    assert not (node0 / "models" / "linear" / "seed0" / "model.pt").exists()  # no model, not half of one
    print("\n".join(line for line in log.splitlines() if "Rendezvous" in line or "train@linear-0 failed" in line))


def _disagreeing_node(folder) -> None:
    import stages.train as stage
    from ddpm.training import distributed as dist

    stage.PREPARED = folder  # both ranks read the same train.npz; rank 1 has other params or code
    try:
        stage.check_nodes_agree("linear-seed0-PARAMS-CODE" if dist.rank() == 0 else "linear-seed0-OTHER-CODE")
    except SystemExit as err:
        (folder / f"refused{dist.rank()}.txt").write_text(str(err))


def test_nodes_with_other_params_or_code_refuse_to_train(tmp_path):
    (tmp_path / "train.npz").write_bytes(b"the same images")
    spawn(_disagreeing_node, tmp_path)
    for r in range(2):  # every rank stops, with the same message
        assert (tmp_path / f"refused{r}.txt").read_text() == (
            "train: rank(s) [1] differ from rank 0 in params.yaml or code (the same git commit and params "
            "everywhere): linear-seed0-OTHER-CODE vs linear-seed0-PARAMS-CODE")
