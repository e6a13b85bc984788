"""`ddpm serve` opens `mlflow ui` on the project's store, and the link it prints lands on the runs table.

A real `ddpm serve` subprocess (its own session, killed with its group in teardown) on a small SQLite store, read
by headless Chromium (skipped without it; a failure under CI=true, as every browser test): the page behind the
printed link, once MLflow's scripts have run, lists the experiment's run by name. (Checked by hand on 2026-12-04
with MLflow 3.17.2 and Chromium 150: the experiment's bare link `#/experiments/<id>`, tag or no tag, renders the
GenAI overview and no run name; the printed one renders the runs table.)
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ci_tools import need, server_healthy
from ddpm.app import tracking as tr

ROOT = Path(__file__).resolve().parents[1]

START_TIMEOUT = 90.0  # seconds; `mlflow ui` took 6-17 s to answer on a 2-core machine (FACTS)



def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """(printed runs-table link, run name) of a running `ddpm serve` on a store with one tagged experiment."""
    chromium = need("chromium")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tk = tr.Tracker(True, "ddpm", uri=uri)
    name = "train-linear-seed0-ui-check"
    tk.end_run(tk.start_run(name, {"schedule": "linear"}, {"kind": "train"}))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "ddpm.cli", "serve", "--uri", uri, "--port", str(port)],
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server_healthy(f"http://127.0.0.1:{port}") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert server_healthy(f"http://127.0.0.1:{port}"), log.read_text()[-3000:]
        link = re.search(r"ddpm: (http://\S+)", log.read_text())
        assert link, log.read_text()[-3000:]
        yield chromium, link.group(1), name
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_serve_link_lands_on_the_runs_table_in_headless_chromium(served, tmp_path):
    chromium, link, name = served
    assert link.endswith("/runs?workflowType=machine_learning")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000",
           "--dump-dom", link]
    page = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert name in page.stdout, f"run {name!r} not on the page (rc={page.returncode}):\n{page.stderr[-2000:]}"
