"""Tests of ddpm.app.tracking.runs against throw-away SQLite stores in tmp dirs (never the repo's mlflow.db).

One module-scoped store (creating a DB costs seconds) holds a train run with two nested sample runs;
the other tests add runs under other experiment names so they do not disturb its table."""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpm.app import tracking as tr
from ddpm import cli
from ddpm.app.tracking import runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


def _git_repo(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "init"], check=True)
    return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store with experiment 'ddpm': one train run, two nested sample runs with fid."""
    root = tmp_path_factory.mktemp("store")
    commit = _git_repo(root / "repo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_ROOT", str(root / "repo"))
        mp.setenv("DVC_EXP_NAME", "exp-abc")
        mp.setenv("DVC_STAGE", "train@linear")
        t0 = time.perf_counter()
        tk = tr.Tracker(True, "ddpm", uri=uri)
        parent = tk.start_run("train-linear", {"schedule": "linear", "timesteps": 100},
                              {"kind": "train"})
        create_s = time.perf_counter() - t0
        tk.log_metrics(parent, [{"step": i, "loss": 1.0 / (i + 1)} for i in range(10)])
        children = {}
        for sampler, eta, fid in (("ddpm", 1.0, 12.5), ("ddim", 0.0, 8.25)):
            params = {"schedule": "linear", "sampler": sampler, "eta": eta, "steps": 50,
                      "timesteps": 100, "n_samples": 500}
            rid = tk.start_run(f"sample-{sampler}-50", params,
                               {"kind": "sample", "sample_key": f"linear-{sampler}-50"},
                               parent_run_id=parent)
            tk.log_metrics(rid, [{"step": 0, "fid": fid}])
            tk.end_run(rid)
            children[sampler] = rid
        tk.end_run(parent)
    assert not tk.failed
    return {"uri": uri, "db": root / "mlflow.db", "tracker": tk, "parent": parent,
            "children": children, "commit": commit, "create_s": create_s}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ default URI, disabled

def test_default_uri_cwd_dvc_root_and_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tr.default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    real = tmp_path / "real_repo"
    monkeypatch.setenv("DVC_ROOT", str(real))  # e.g. running in .dvc/tmp/exps/<copy>
    assert tr.default_tracking_uri() == f"sqlite:///{real.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tr.default_tracking_uri() == "http://127.0.0.1:5000"
    assert tr.sqlite_path(f"sqlite:///{real}/mlflow.db") == real.resolve() / "mlflow.db"
    assert tr.sqlite_path("http://127.0.0.1:5000") is None
    assert list(tmp_path.iterdir()) == []  # pure: nothing created


def test_disabled_tracker_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tk = tr.Tracker(False, "ddpm", pending_path=tmp_path / "pending.jsonl")
    rid = tk.start_run("x", {"a": 1}, {"kind": "train"})
    assert rid is None
    tk.log_metrics(rid, [{"step": 0, "loss": 1.0}])
    tk.log_metrics("abc", [{"step": 0, "loss": 1.0}])
    tk.log_params("abc", {"a": 1})
    tk.set_tags("abc", {"a": 1})
    (tmp_path / "f.txt").write_text("x")
    tk.log_artifact("abc", tmp_path / "f.txt")
    tk.log_artifacts("abc", tmp_path)
    tk.end_run("abc")
    assert tk.find_runs("tags.kind = 'train'") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no db, no mlruns, no pending


# ------------------------------------------------------------------ store, runs, table

def test_wal_mode_and_schema(store):
    con = sqlite3.connect(store["db"])
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()
    assert {"experiments", "runs", "metrics", "params", "tags"} <= tables
    # artifacts live next to the database, not in the cwd (a DVC temp copy would lose them)
    from mlflow import MlflowClient
    exp = MlflowClient(store["uri"]).get_experiment_by_name("ddpm")
    assert Path(exp.artifact_location) == store["db"].parent / "mlruns" / "ddpm"


def test_run_tags_and_nesting(store):
    from mlflow import MlflowClient
    client = MlflowClient(store["uri"])
    parent = client.get_run(store["parent"])
    assert parent.data.tags["kind"] == "train"
    assert parent.data.tags["git_commit"] == store["commit"]
    assert parent.data.tags["dvc_exp_name"] == "exp-abc"
    assert parent.data.tags["dvc_stage"] == "train@linear"
    assert parent.data.params == {"schedule": "linear", "timesteps": "100"}
    assert parent.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(store["parent"], "loss")][:2] == [1.0, 0.5]
    child = client.get_run(store["children"]["ddim"])
    assert child.data.tags["mlflow.parentRunId"] == store["parent"]
    assert child.data.metrics["fid"] == 8.25


def test_find_runs(store):
    tk, parent = store["tracker"], store["parent"]
    assert tk.find_runs("tags.sample_key = 'linear-ddim-50'", parent_run_id=parent) == \
        [store["children"]["ddim"]]
    assert tk.find_runs("tags.sample_key = 'linear-ddim-999'", parent_run_id=parent) == []
    assert sorted(tk.find_runs("", parent_run_id=parent)) == sorted(store["children"].values())
    assert tr.Tracker(True, "no-such-exp", uri=store["uri"]).find_runs("tags.kind = 'x'") == []


def test_comparison_table(store):
    df = tr.comparison_table("ddpm", uri=store["uri"])
    assert list(df.columns) == tr.TABLE_COLUMNS
    assert len(df) == 2  # the train run is not a row
    assert list(df["sampler"]) == ["ddim", "ddpm"]  # sorted by fid
    assert list(df["fid"]) == [8.25, 12.5]
    assert list(df["run_id"]) == [store["children"]["ddim"], store["children"]["ddpm"]]
    row = df.iloc[0]
    assert row["experiment"] == "ddpm" and row["parent_run_id"] == store["parent"]
    assert row["schedule"] == "linear" and row["eta"] == 0.0
    assert (row["steps"], row["timesteps"], row["n_samples"]) == (50, 100, 500)
    assert row["dvc_exp_name"] == "exp-abc" and row["git_commit"] == store["commit"]
    assert str(df["start_time"].dtype).startswith("datetime64")

    one = tr.comparison_table("ddpm", "params.sampler = 'ddpm'", uri=store["uri"])
    assert list(one["run_id"]) == [store["children"]["ddpm"]]
    assert len(tr.comparison_table("ddpm", "params.schedule = 'cosine'", uri=store["uri"])) == 0
    assert len(tr.comparison_table("ddpm", "metrics.fid < 10", uri=store["uri"])) == 1


def test_comparison_table_empty(tmp_path, store):
    missing = tmp_path / "none" / "mlflow.db"
    df = tr.comparison_table(uri=f"sqlite:///{missing}")
    assert df.empty and list(df.columns) == tr.TABLE_COLUMNS
    assert not missing.exists()  # reading never creates a store
    df = tr.comparison_table("no-such-experiment", uri=store["uri"])
    assert df.empty and list(df.columns) == tr.TABLE_COLUMNS


def test_cli_table(store, tmp_path, capsys):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "ddpm.cli", "table", "--experiment", "ddpm",
                          "--uri", store["uri"]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["schedule", "seed", "sampler", "eta"] and lines[0].split()[-2:] == [
        "run_id", "parent_run_id"]
    assert len(lines) == 3 and store["children"]["ddim"] in lines[1] and "8.25" in lines[1]

    # CSV and filter (in-process: same code path, saves a second interpreter start)
    assert cli.main(["table", "--uri", store["uri"], "--experiment", "ddpm", "--csv",
                    "--filter", "params.sampler = 'ddim'"]) == 0
    csv = capsys.readouterr().out.strip().splitlines()
    assert csv[0] == ",".join(tr.TABLE_COLUMNS) and len(csv) == 2 and "ddim" in csv[1]
    assert cli.main(["table", "--uri", f"sqlite:///{tmp_path / 'empty.db'}"]) == 0
    assert capsys.readouterr().out.strip() == "no runs"


# ------------------------------------------------------------------ batching and cost

def test_log_batch_chunking_and_cost(store, monkeypatch):
    tk = tr.Tracker(True, "ddpm-bench", uri=store["uri"])
    rid = tk.start_run("bench", {}, {"kind": "train"})
    client = tk._get_client()
    sizes = []
    real = client.log_batch

    def spy(run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            sizes.append(len(metrics))
        return real(run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(client, "log_batch", spy)
    rows = [{"step": i, "loss": 1.0 / (i + 1), "loss_q0": 0.1, "loss_q1": 0.2, "loss_q2": 0.3,
             "loss_q3": float("nan") if i == 7 else 0.4} for i in range(1000)]
    t0 = time.perf_counter()
    tk.log_metrics(rid, rows)
    elapsed = time.perf_counter() - t0
    assert sizes == [1000] * 4 + [999]  # 4999 points (one NaN skipped), <= 1000 per call
    assert not tk.failed
    hist = client.get_metric_history(rid, "loss_q3")
    assert len(hist) == 999 and all(not math.isnan(m.value) for m in hist)
    assert len(client.get_metric_history(rid, "loss")) == 1000
    print(f"\n1000 steps x 5 metrics: {elapsed:.3f} s; first run in a new DB: {store['create_s']:.1f} s")


# ------------------------------------------------------------------ failures and replay

def test_unreachable_server_pending_and_import(store, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    pending = tmp_path / "pending.jsonl"
    uri = f"http://127.0.0.1:{_free_port()}"
    caplog.set_level(logging.WARNING, logger="ddpm.app.tracking")
    tk = tr.Tracker(True, "ddpm-offline", uri=uri, pending_path=pending)
    parent = tk.start_run("train-cosine", {"schedule": "cosine", "timesteps": 100}, {"kind": "train"})
    tk.log_metrics(parent, [{"step": i, "loss": 1.0 / (i + 1)} for i in range(20)])
    child = tk.start_run("sample-ddim-10", {"schedule": "cosine", "sampler": "ddim", "eta": 0.0,
                                            "steps": 10, "timesteps": 100, "n_samples": 500},
                         {"kind": "sample", "sample_key": "cosine-ddim-10"}, parent_run_id=parent)
    tk.log_metrics(child, [{"step": 0, "fid": 3.5}])
    tk.end_run(child)
    tk.end_run(parent)
    assert tk.find_runs("tags.kind = 'sample'") == []
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # what bounds the wait on a dead server
    assert tk.failed
    warnings = [r for r in caplog.records if r.name.startswith("ddpm.app.tracking") and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert uri in warnings[0].getMessage() and str(pending) in warnings[0].getMessage()
    assert parent.startswith(tr.PENDING_PREFIX) and child.startswith(tr.PENDING_PREFIX)

    records = [json.loads(line) for line in pending.read_text().splitlines()]
    assert [r["op"] for r in records] == ["start_run", "metrics", "start_run", "metrics",
                                          "end_run", "end_run"]
    assert len(records[1]["metrics"]) == 20 and records[3]["metrics"][0][:3] == ["fid", 3.5, 0]

    mapping = tr.import_pending(pending, store["uri"])
    assert set(mapping) == {parent, child}
    assert tr.import_pending(pending, store["uri"]) == mapping  # idempotent
    df = tr.comparison_table("ddpm-offline", uri=store["uri"])
    assert len(df) == 1 and df.iloc[0]["fid"] == 3.5 and df.iloc[0]["schedule"] == "cosine"
    assert df.iloc[0]["parent_run_id"] == mapping[parent]
    from mlflow import MlflowClient
    client = MlflowClient(store["uri"])
    assert len(client.get_metric_history(mapping[parent], "loss")) == 20  # not duplicated
    assert client.get_run(mapping[child]).info.status == "FINISHED"


def test_store_error_mid_run_keeps_points(store, tmp_path, monkeypatch, caplog):
    """A run that exists, then the store fails (e.g. DB locked): one warning, points kept, replayable."""
    pending = tmp_path / "pending.jsonl"
    tk = tr.Tracker(True, "ddpm-midrun", uri=store["uri"], pending_path=pending)
    rid = tk.start_run("train", {"schedule": "linear"}, {"kind": "train"})
    tk.log_metrics(rid, [{"step": 0, "loss": 1.0}])
    client = tk._get_client()

    def boom(*a, **k):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(client, "log_batch", boom)
    caplog.set_level(logging.WARNING, logger="ddpm.app.tracking")
    tk.log_metrics(rid, [{"step": 1, "loss": 0.5}])
    tk.log_metrics(rid, [{"step": 2, "loss": 0.25}])
    tk.end_run(rid)
    assert tk.failed
    ours = [r for r in caplog.records if r.name.startswith("ddpm.app.tracking")]
    assert len(ours) == 1 and "database is locked" in ours[0].getMessage()
    monkeypatch.undo()

    mapping = tr.import_pending(pending, store["uri"])
    assert mapping == {rid: rid}  # the run exists in this store: points go to it
    from mlflow import MlflowClient
    c = MlflowClient(store["uri"])
    assert [m.value for m in sorted(c.get_metric_history(rid, "loss"), key=lambda m: m.step)] == \
        [1.0, 0.5, 0.25]
    assert c.get_run(rid).info.status == "FINISHED"


def test_artifact_failure_keeps_tracking_metrics(store, tmp_path, monkeypatch, caplog):
    """The artifact store fails (e.g. S3 credentials): one warning, artifacts kept in the pending file,
    metrics and the run's end still reach the tracking store; replaying later uploads the files."""
    pending = tmp_path / "pending.jsonl"
    tk = tr.Tracker(True, "ddpm-artifacts", uri=store["uri"], pending_path=pending)
    rid = tk.start_run("train", {"schedule": "linear"}, {"kind": "train"})
    out = tmp_path / "reports"  # import-pending copies files from the project's output folders only
    (out / "figures").mkdir(parents=True)
    (out / "loss.csv").write_text("step,loss\n1,0.5\n")
    (out / "figures" / "a.png").write_bytes(b"png")
    client = tk._get_client()
    calls = []

    def boom(*a, **k):
        calls.append(a)
        raise PermissionError("Access Denied (s3://bucket/ddpm)")

    monkeypatch.setattr(client, "log_artifact", boom)
    caplog.set_level(logging.WARNING, logger="ddpm.app.tracking")
    tk.log_artifact(rid, out / "loss.csv")
    tk.log_artifacts(rid, out / "figures", "figures")  # not attempted after the first failure
    tk.log_metrics(rid, [{"step": 1, "loss": 0.5}])
    tk.end_run(rid)
    assert tk.artifacts_failed and not tk.failed and len(calls) == 1
    ours = [r for r in caplog.records if r.name.startswith("ddpm.app.tracking")]
    assert len(ours) == 1, [r.getMessage() for r in ours]
    assert "loss.csv" in ours[0].getMessage() and "Access Denied" in ours[0].getMessage()
    assert [r["op"] for r in tr.read_pending(pending)] == ["artifact", "artifacts"]
    monkeypatch.undo()

    from mlflow import MlflowClient
    c = MlflowClient(store["uri"])
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.5
    assert c.list_artifacts(rid) == []
    assert tr.import_pending(pending, store["uri"], root=tmp_path) == {rid: rid}
    assert sorted(f.path for f in c.list_artifacts(rid)) == ["figures", "loss.csv"]
    assert [f.path for f in c.list_artifacts(rid, "figures")] == ["figures/a.png"]


def test_tracker_without_pending_path_drops_with_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="ddpm.app.tracking")
    tk = tr.Tracker(True, "x", uri=f"http://127.0.0.1:{_free_port()}")
    assert tk.start_run("r", {}, {}) is None
    tk.log_metrics(None, [{"step": 0, "loss": 1.0}])
    ours = [r for r in caplog.records if r.name.startswith("ddpm.app.tracking")]
    assert len(ours) == 1 and "dropped" in ours[0].getMessage()
    assert list(tmp_path.iterdir()) == []


def test_nested_under_pending_parent_from_another_process(store, tmp_path, monkeypatch, caplog):
    """Parent logged while the server was down (file A); a healthy process nests a run under its
    placeholder id (file B); replaying A then B rebuilds the nesting."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    a = tr.Tracker(True, "ddpm-xproc", uri=f"http://127.0.0.1:{_free_port()}",
                   pending_path=tmp_path / "a.jsonl")
    parent = a.start_run("train", {"schedule": "linear"}, {"kind": "train"})
    a.end_run(parent)
    caplog.set_level(logging.WARNING, logger="ddpm.app.tracking")
    caplog.clear()
    b = tr.Tracker(True, "ddpm-xproc", uri=store["uri"], pending_path=tmp_path / "b.jsonl")
    child = b.start_run("sample", {"schedule": "linear", "sampler": "ddpm", "steps": 5},
                        {"kind": "sample"}, parent_run_id=parent)
    b.log_metrics(child, [{"step": 0, "fid": 9.0}])
    assert child.startswith(tr.PENDING_PREFIX) and not b.failed
    assert len([r for r in caplog.records if r.name.startswith("ddpm.app.tracking")]) == 1
    ma = tr.import_pending(tmp_path / "a.jsonl", store["uri"])
    mb = tr.import_pending(tmp_path / "b.jsonl", store["uri"])
    df = tr.comparison_table("ddpm-xproc", uri=store["uri"])
    assert list(df["run_id"]) == [mb[child]] and list(df["parent_run_id"]) == [ma[parent]]


def test_two_processes_log_concurrently(store, tmp_path):
    script = (
        "import sys; from ddpm.app import tracking as tr\n"
        "t = tr.Tracker(True, 'ddpm-concurrent', uri=sys.argv[1])\n"
        "r = t.start_run('w' + sys.argv[2], {}, {'kind': 'train'})\n"
        "for k in range(10):\n"
        "    t.log_metrics(r, [{'step': k * 200 + i, 'loss': 1.0} for i in range(200)])\n"
        "t.end_run(r)\n"
        "sys.exit(1 if t.failed else 0)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script, store["uri"], str(i)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
    con = sqlite3.connect(store["db"])
    try:
        counts = con.execute(
            "SELECT count(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
            "JOIN experiments e ON r.experiment_id = e.experiment_id "
            "WHERE e.name = 'ddpm-concurrent' GROUP BY m.run_uuid").fetchall()
    finally:
        con.close()
    assert sorted(counts) == [(2000,), (2000,)]


# ------------------------------------------------------------------ secrets, pending location, table, UI

SECRET, TOKEN = "S3cretPW", "T0KEN42"


def test_redact_uri_and_messages():
    uri = f"http://alice:{SECRET}@host:5000/?token={TOKEN}&x=1"
    assert tr.redact_uri(uri) == "http://***@host:5000/?token=***&x=***"
    assert tr.redact_uri("https://TOKEN123@host/p") == "https://***@host/p"
    assert tr.redact_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"
    assert tr.redact_uri("postgresql://u:p%40ss@db/ml") == "postgresql://***@db/ml"
    text = f"API request to {uri}/api/2.0 failed: url: /?token={TOKEN}/api ({SECRET}) other://bob:pw@h"
    clean = tr.redact(text, uri)
    assert SECRET not in clean and TOKEN not in clean and "pw@" not in clean and "***@host:5000" in clean


def _all_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


def test_credentials_never_reach_logs_stderr_or_files(tmp_path, monkeypatch, caplog, capfd):
    """A dead server whose URI carries a password and a token: the Tracker's warning, MLflow's and
    urllib3's logs, the pending file and the CLI's errors all show the URI redacted."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    uri = f"http://alice:{SECRET}@127.0.0.1:{_free_port()}/?token={TOKEN}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    caplog.set_level(logging.DEBUG)
    tk = tr.Tracker(True, "ddpm-secret", pending_path=tr.pending_file("train@linear"))
    rid = tk.start_run("train-linear", {"schedule": "linear"}, {"kind": "train"})
    tk.log_metrics(rid, [{"step": 1, "loss": 0.5}])
    tk.end_run(rid)
    assert tk.failed and rid.startswith(tr.PENDING_PREFIX)
    warning = [r.getMessage() for r in caplog.records if r.name.startswith("ddpm.app.tracking")][0]
    assert f"http://***@127.0.0.1:" in warning and "token=***" in warning
    pending = tmp_path / "mlflow-pending" / "train@linear.jsonl"
    assert tr.read_pending(pending)[0]["uri"] == tr.redact_uri(uri)
    with pytest.raises(tr.TrackingError) as err:
        tr.import_pending(pending, uri)
    assert SECRET not in str(err.value) and err.value.__cause__ is None

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [subprocess.run([sys.executable, "-m", "ddpm.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
           for args in (["table"], ["import-pending", str(pending)])]
    assert [c.returncode for c in cli] == [1, 1] and all("error:" in c.stderr for c in cli)
    out, errs = capfd.readouterr()
    seen = "\n".join([caplog.text, out, errs, *(c.stdout + c.stderr for c in cli), _all_text(tmp_path)])
    assert "127.0.0.1" in seen and SECRET not in seen and TOKEN not in seen


def test_pending_file_lives_outside_dvc_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    monkeypatch.setenv("DVC_STAGE", "sample@cosine-0-ddim-eta0.0-10")
    assert tr.pending_file() == tmp_path / "repo" / "mlflow-pending" / "sample@cosine-0-ddim-eta0.0-10.jsonl"
    assert tr.pending_file("../../evil name").parent == tmp_path / "repo" / "mlflow-pending"
    ignored = [line.strip() for f in (".gitignore", ".dvcignore") for line in (ROOT / f).read_text().splitlines()]
    assert ignored.count("/mlflow-pending/") == 2
    import yaml

    outs = {o if isinstance(o, str) else next(iter(o)) for st in yaml.safe_load((ROOT / "dvc.yaml").read_text())[
        "stages"].values() for o in st.get("outs", st.get("do", {}).get("outs", []))}
    assert not any(o.split("/")[0] == "mlflow-pending" for o in outs), outs


def test_new_experiments_open_on_the_training_runs_table(store):
    from mlflow import MlflowClient

    exp = MlflowClient(store["uri"]).get_experiment_by_name("ddpm")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"


def test_existing_experiments_get_the_kind_tag_and_a_chosen_one_stays(tmp_path):
    """Issue 25 item 6: experiments made before the tag (or by hand) get it when the pipeline next logs, or when
    `ddpm serve` lists them; a kind someone chose in the UI stays."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = runs._open_client(uri)
    old, chosen = client.create_experiment("old"), client.create_experiment("chosen")
    client.set_experiment_tag(chosen, "mlflow.experimentKind", "genai_development")
    assert "mlflow.experimentKind" not in MlflowClient(uri).get_experiment(old).tags
    tk = tr.Tracker(True, "old", uri=uri)
    tk.end_run(tk.start_run("r"))
    assert MlflowClient(uri).get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert tr.experiments(uri) == {"Default": "0", "old": old, "chosen": chosen}
    tags = {e.name: e.tags.get("mlflow.experimentKind") for e in MlflowClient(uri).search_experiments()}
    assert tags == {"Default": "custom_model_development", "old": "custom_model_development",
                    "chosen": "genai_development"}
    assert tr.experiments(f"sqlite:///{tmp_path / 'none.db'}") == {} and not (tmp_path / "none.db").exists()


def test_ddpm_cli_has_every_subcommand_and_serves(store, tmp_path, capsys, monkeypatch):
    from ddpm import cli

    names = ("table", "compare", "import-pending", "serve")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_ = capsys.readouterr().out
    assert all(n in help_ for n in names)
    for name in names:  # each subcommand has its own --help
        with pytest.raises(SystemExit) as exit_:
            cli.main([name, "--help"])
        assert exit_.value.code == 0 and f"usage: ddpm {name}" in capsys.readouterr().out
    assert cli.main(["table", "--uri", store["uri"], "--experiment", "ddpm", "--csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # header + the store's two sample runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:s3cret-token@host:5000")
    assert cli.main(["serve"]) == 0  # a server already: nothing to start, no secret printed
    out = capsys.readouterr().out
    assert "s3cret-token" not in out and "http://***@host:5000" in out
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert cli.main(["serve", "--uri", store["uri"], "--port", "5123", "--dry-run"]) == 0
    out = capsys.readouterr().out
    eid = tr.experiments(store["uri"])["ddpm"]
    assert f"ddpm: http://127.0.0.1:5123/#/experiments/{eid}/runs?workflowType=machine_learning" in out
    assert f"-m mlflow ui --backend-store-uri {store['uri']} --host 127.0.0.1 --port 5123" in out


def test_table_shows_intervals_first_and_run_ids_last(store):
    tk = tr.Tracker(True, "ddpm-intervals", uri=store["uri"])
    parent = tk.start_run("train", {"schedule": "cosine", "seed": 1, "timesteps": 100}, {"kind": "train"})
    for sampler, fid, lo, hi in (("ddim", 4.0, 3.5, 4.6), ("ddpm", 3.0, 2.0, 4.1)):
        rid = tk.start_run(f"sample-{sampler}", {"schedule": "cosine", "sampler": sampler, "eta": 0.0, "steps": 10,
                                                 "spacing": "trailing", "n_samples": 400,
                                                 "features": "classifier-32d-0123abcd"},
                           {"kind": "sample"}, parent_run_id=parent)
        tk.log_metrics(rid, [{"step": 0, "fid": fid, "fid_lo": lo, "fid_hi": hi, "kid": fid / 1000,
                              "kid_std": 1e-4, "fid_floor": 0.4}])
    df = tr.comparison_table("ddpm-intervals", uri=store["uri"])
    assert list(df.columns[:10]) == ["schedule", "seed", "sampler", "eta", "steps", "spacing", "fid", "fid_lo",
                                     "fid_hi", "kid"]
    assert list(df.columns[-2:]) == ["run_id", "parent_run_id"]
    assert list(df["sampler"]) == ["ddpm", "ddim"] and list(df["seed"]) == [1, 1]  # seed from the train run
    assert list(df["fid_lo"]) == [2.0, 3.5] and list(df["fid_hi"]) == [4.1, 4.6] and list(df["kid"]) == [0.003, 0.004]
    assert set(df["features"]) == {"classifier-32d-0123abcd"} and set(df["spacing"]) == {"trailing"}


def test_seed_summary_gives_mean_and_sd_over_training_seeds(store):
    tk = tr.Tracker(True, "ddpm-seeds", uri=store["uri"])
    fids = {0: 4.0, 1: 6.0, 2: 5.0}
    for seed, fid in fids.items():
        parent = tk.start_run(f"train-{seed}", {"schedule": "linear", "seed": seed}, {"kind": "train"})
        for sampler, offset in (("ddim", 0.0), ("ddpm", 10.0)):
            rid = tk.start_run("s", {"schedule": "linear", "sampler": sampler, "eta": 0.0, "steps": 10},
                               {"kind": "sample"}, parent_run_id=parent)
            tk.log_metrics(rid, [{"step": 0, "fid": fid + offset, "kid": (fid + offset) / 100}])
    df = tr.comparison_table("ddpm-seeds", uri=store["uri"])
    summary = tr.seed_summary(df)
    assert list(summary["sampler"]) == ["ddim", "ddpm"] and list(summary["n_seeds"]) == [3, 3]
    assert list(summary["fid_mean"]) == [5.0, 15.0] and list(summary["fid_sd"]) == [1.0, 1.0]
    assert summary["kid_sd"].round(12).tolist() == [0.01, 0.01]
    assert cli.main(["table", "--uri", store["uri"], "--experiment", "ddpm-seeds", "--seeds", "--csv"]) == 0
