"""Tracking against a real ``mlflow server`` on 127.0.0.1 while the real training loop runs.

Requirement: with the tracking URI pointing at an ``mlflow server``, if the server is down at the
start or is killed mid-training, training goes on, the outputs are complete, the user sees one
clear warning, and the metrics not sent are kept (pending JSONL file) and can be imported later.

Each server is a real subprocess in its own session (process group) with its own SQLite backend
and artifact root under tmp_path; it is always SIGKILLed (whole group) in teardown.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ci_tools import server_healthy

from ddpm.app import tracking as tr
from ddpm.data.datasets import load_dataset
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.training.loop import TrainSettings, train
from ddpm.nn.unet import Unet

STEPS = 24
LOG_EVERY = 4
EVAL_EVERY = 8
KILL_AFTER = 8  # rows logged (steps 1..8) before the server is killed
SERVER_START_TIMEOUT = 60.0  # seconds; measured 6-17 s on a 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



class Server:
    """A real ``mlflow server`` subprocess (own session), started and waited for, or killed."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.proc: subprocess.Popen | None = None
        self.log_path = root / f"server-{port}-{time.monotonic_ns()}.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'srv.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log_fh:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log_fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = t0 + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if server_healthy(f"http://127.0.0.1:{self.port}"):
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                break
            time.sleep(0.25)
        self.kill()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        pytest.fail(f"mlflow server on port {self.port} did not answer /health within "
                    f"{SERVER_START_TIMEOUT:.0f} s (exit code {self.proc.returncode}); log:\n{tail}")

    def kill(self) -> None:
        """SIGKILL the server's whole process group and reap it (idempotent)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # start_new_session: pgid == pid
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)


@pytest.fixture
def servers(tmp_path):
    """Factory for servers sharing tmp_path's backend DB; every one is killed at teardown."""
    started: list[Server] = []

    def make(port: int) -> Server:
        srv = Server(tmp_path, port)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.kill()


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Unet(dim=8, dim_mults=(1, 2), channels=1)
    process = GaussianProcess(get_beta_schedule("linear", 50))
    images = torch.from_numpy(load_dataset("digits").images[:128])
    settings = TrainSettings(steps=STEPS, batch_size=16, log_every=LOG_EVERY, eval_every=EVAL_EVERY,
                             checkpoint_every=STEPS, ema_warmup=0)
    return model, process, images, settings


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def mlflow_warnings():
    """WARNING+ records of the ``mlflow`` logger, which does not propagate to caplog's handler."""
    handler = _Records()
    logger = logging.getLogger("mlflow")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def _one_warning(caplog, mlflow_warnings) -> logging.LogRecord:
    """The user sees exactly one warning: ddpm.app.tracking.runs's (no urllib3 retry noise, no MLflow's)."""
    every = [r for r in caplog.records if r.levelno >= logging.WARNING] + mlflow_warnings
    assert len(every) == 1 and every[0].name.startswith("ddpm.app.tracking"), \
        [f"{r.name}: {r.getMessage()[:200]}" for r in every]
    return every[0]


def _pending_metric_steps(records: list[dict], run_id: str, key: str) -> set[int]:
    return {m[2] for r in records if r["op"] == "metrics" and r["run_id"] == run_id
            for m in r["metrics"] if m[0] == key}


def _check_outputs(result, ckpt_dir: Path, evals: list[int]) -> None:
    assert result.step == STEPS
    assert [row["step"] for row in result.history] == list(range(1, STEPS + 1))
    assert [e["step"] for e in result.extra["eval"]] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert evals == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert (ckpt_dir / f"ckpt-{STEPS:08d}.pt").exists()


def test_server_killed_mid_training(tmp_path, servers, setup, caplog, mlflow_warnings, monkeypatch):
    model, process, images, settings = setup
    port = _free_port()
    srv = servers(port)
    start_s = srv.start()
    uri = srv.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    pending = tmp_path / "pending.jsonl"
    caplog.set_level(logging.WARNING)

    tracker = tr.Tracker(enabled=True, experiment="srv", uri=uri, pending_path=pending)
    run_id = tracker.start_run("train-linear", {"schedule": "linear", "steps": STEPS},
                               {"kind": "train"})
    assert run_id and not run_id.startswith(tr.PENDING_PREFIX) and not tracker.failed

    sent_steps: list[int] = []  # steps logged while the server was up
    kill_times: dict[str, float] = {}
    evals: list[int] = []

    def on_log(rows):
        if len(sent_steps) >= KILL_AFTER and not kill_times:
            t0 = time.monotonic()
            srv.kill()
            kill_times["kill_s"] = time.monotonic() - t0
            kill_times["t"] = time.monotonic()
        t0 = time.monotonic()
        tracker.log_metrics(run_id, rows)
        if kill_times and "first_fail_s" not in kill_times:
            kill_times["first_fail_s"] = time.monotonic() - t0  # the call that hit the dead server
        if not kill_times:
            assert not tracker.failed
            sent_steps.extend(r["step"] for r in rows)

    def on_eval(step, ema_model):
        evals.append(step)
        value = float(sum(p.detach().abs().sum() for p in ema_model.parameters()))
        tracker.log_metrics(run_id, [{"step": step, "ema_l1": value}])
        return {"ema_l1": value}

    t0 = time.monotonic()
    result = train(model, process, images, settings, seed=0, checkpoint_dir=tmp_path / "ckpt",
                   on_log=on_log, on_eval=on_eval, progress=False)
    train_s = time.monotonic() - t0
    tracker.end_run(run_id)

    # training went on and its outputs are complete
    assert kill_times, "the server was never killed"
    _check_outputs(result, tmp_path / "ckpt", evals)
    assert sent_steps == list(range(1, KILL_AFTER + 1))
    assert tracker.failed
    # tracking.py's short retries for http URIs (MLflow's defaults wait ~4 minutes per call)
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2 and float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30

    # one clear warning, naming the URI and the pending file
    msg = _one_warning(caplog, mlflow_warnings).getMessage()
    assert uri in msg and str(pending) in msg and "import-pending" in msg

    # the unsent rows are in the pending file
    records = tr.read_pending(pending)
    assert records and all(r["uri"] == uri for r in records)
    unsent = set(range(KILL_AFTER + 1, STEPS + 1))
    kept = _pending_metric_steps(records, run_id, "loss")
    assert unsent <= kept, sorted(unsent - kept)
    assert not kept & set(sent_steps), "rows already sent were kept again"
    assert _pending_metric_steps(records, run_id, "ema_l1") == {16, 24}  # eval after the kill
    assert any(r["op"] == "start_run" and r["run_id"] == run_id for r in records)
    assert records[-1]["op"] == "end_run"

    # a new server on the same backend DB and address; replay the file
    restart_s = servers(port).start()
    t0 = time.monotonic()
    mapping = tr.import_pending(pending, uri)
    import_s = time.monotonic() - t0
    assert mapping == {run_id: run_id}  # the run exists on the server: points go to it
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    loss = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))  # full history, no duplicates
    by_step = {m.step: m.value for m in loss}
    assert all(by_step[row["step"]] == pytest.approx(row["loss"]) for row in result.history)
    assert sorted(m.step for m in client.get_metric_history(run_id, "ema_l1")) == [8, 16, 24]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["schedule"] == "linear"
    # replaying again duplicates nothing
    assert tr.import_pending(pending, uri) == mapping
    assert len(client.get_metric_history(run_id, "loss")) == STEPS
    print(f"\nserver start {start_s:.1f} s, restart {restart_s:.1f} s, train {train_s:.1f} s "
          f"(kill {kill_times['kill_s']:.2f} s, first call to the dead server "
          f"{kill_times['first_fail_s']:.1f} s), import {import_s:.1f} s")


def test_server_down_from_start(tmp_path, setup, caplog, mlflow_warnings, monkeypatch):
    model, process, images, settings = setup
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    pending = tmp_path / "pending.jsonl"
    caplog.set_level(logging.WARNING)

    t0 = time.monotonic()
    tracker = tr.Tracker(enabled=True, experiment="srv", uri=uri, pending_path=pending)
    run_id = tracker.start_run("train-linear", {"schedule": "linear", "steps": STEPS},
                               {"kind": "train"})
    start_run_s = time.monotonic() - t0
    assert run_id.startswith(tr.PENDING_PREFIX) and tracker.failed
    # short retries for http URIs, not MLflow's ~4 minutes
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2 and float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30
    evals: list[int] = []

    def on_eval(step, ema_model):
        evals.append(step)
        tracker.log_metrics(run_id, [{"step": step, "ema_l1": float(step)}])
        return {"ema_l1": float(step)}

    t0 = time.monotonic()
    result = train(model, process, images, settings, seed=0, checkpoint_dir=tmp_path / "ckpt",
                   on_log=lambda rows: tracker.log_metrics(run_id, rows), on_eval=on_eval,
                   progress=False)
    train_s = time.monotonic() - t0
    tracker.end_run(run_id)
    _check_outputs(result, tmp_path / "ckpt", evals)

    msg = _one_warning(caplog, mlflow_warnings).getMessage()
    assert uri in msg and str(pending) in msg and "import-pending" in msg

    records = tr.read_pending(pending)
    assert [r["op"] for r in records][:1] == ["start_run"] and records[-1]["op"] == "end_run"
    assert _pending_metric_steps(records, run_id, "loss") == set(range(1, STEPS + 1))
    assert _pending_metric_steps(records, run_id, "ema_l1") == {8, 16, 24}

    store = f"sqlite:///{tmp_path / 'import' / 'mlflow.db'}"
    t0 = time.monotonic()
    mapping = tr.import_pending(pending, store)
    import_s = time.monotonic() - t0
    assert set(mapping) == {run_id}
    from mlflow import MlflowClient
    client = MlflowClient(store)
    new_id = mapping[run_id]
    loss = client.get_metric_history(new_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))
    run = client.get_run(new_id)
    assert run.info.status == "FINISHED" and run.data.tags["pending_id"] == run_id
    assert run.data.params == {"schedule": "linear", "steps": str(STEPS)}
    print(f"\nstart_run against nothing {start_run_s:.1f} s, train {train_s:.1f} s, "
          f"import into sqlite {import_s:.1f} s")
