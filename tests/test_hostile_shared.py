"""Issue 28, rows 1, 2, 3 and 8: shared files are data. Each test performs the attack or the fault, then
checks the fixed behaviour: a planted symlink at the MLflow set-up lock, a pending file from someone else
replayed with import-pending, a kill -9 of `dvc repro` while a sample set is written, and a path in
reports/fid.csv."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ddpm.app import tracking as tr
from ddpm import cli
from ddpm.app.tracking import pending
from ddpm.app.tracking import runs

ROOT = Path(__file__).resolve().parents[1]
USER_TEXT = "the user's own file\n"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------ row 1: the set-up lock

def test_symlinked_init_lock_is_never_followed(tmp_path, caplog, capsys):
    """Symlinks at the old lock path (shared temp folder, md5 of the db path) and at the new one (beside
    the db) pointing at a user's file: a tracking call and `table` leave the file as it was."""
    victim = tmp_path / "home" / "notes.txt"
    victim.parent.mkdir()
    victim.write_text(USER_TEXT)
    db = tmp_path / "project" / "mlflow.db"
    db.parent.mkdir()
    digest = hashlib.md5(str(db.resolve()).encode(), usedforsecurity=False).hexdigest()[:16]
    old = Path(tempfile.gettempdir()) / f"ddpm-mlflow-init-{digest}.lock"
    new = runs.init_lock_path(db)
    assert new.parent == db.parent
    old.unlink(missing_ok=True)
    old.symlink_to(victim)
    new.symlink_to(victim)
    uri = f"sqlite:///{db}"
    import sqlite3
    sqlite3.connect(db).close()  # an existing (empty) store, so that `table` opens it
    try:
        tk = tr.Tracker(True, "x", uri=uri)
        assert tk.start_run("r", {"a": 1}, {}) is None  # refused: the Tracker warns and stops, never raises
        assert tk.failed and "symbolic link" in caplog.text and str(new) in caplog.text
        assert cli.main(["table", "--uri", uri]) == 1
        err = capsys.readouterr().err
        assert "symbolic link" in err and str(new) in err and "\n" not in err.strip()
        assert victim.read_text() == USER_TEXT and old.is_symlink() and new.is_symlink()
    finally:
        old.unlink(missing_ok=True)


def test_init_lock_is_a_private_regular_file_beside_the_db(tmp_path):
    db = tmp_path / "mlflow.db"
    lock = runs.init_lock_path(db)
    lock.write_text("kept")  # an existing lock is opened without truncation
    with runs._init_lock(f"sqlite:///{db}"):
        pass
    assert lock.read_text() == "kept" and not lock.is_symlink()
    lock.unlink()
    with runs._init_lock(f"sqlite:///{db}"):
        pass
    assert lock.is_file() and lock.stat().st_mode & 0o777 == 0o600


def test_no_predictable_names_in_the_shared_temp_folder():
    """No module of the package builds a path in the shared temp folder by hand."""
    for path in [*(ROOT / "ddpm").glob("*.py"), *(ROOT / "stages").glob("*.py")]:
        text = path.read_text()
        assert "gettempdir" not in text and "\"/tmp" not in text and "'/tmp" not in text, path


# ------------------------------------------------------------------ row 2: import-pending

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with one run of the user's (created by a Tracker, so it carries a writer tag)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tk = tr.Tracker(True, "mine", uri=uri)
        rid = tk.start_run("train", {"schedule": "linear"}, {"kind": "train", "model_sha256": "ab" * 32})
        tk.log_metrics(rid, [{"step": 0, "loss": 1.0}])
        tk.end_run(rid)
    assert not tk.failed
    return {"uri": uri, "run": rid, "root": root}


def _client(store):
    from mlflow import MlflowClient
    return MlflowClient(store["uri"])


def _snapshot(store) -> tuple:
    """The user's run (tags, status, metrics) and the number of active runs in the store."""
    c = _client(store)
    run = c.get_run(store["run"])
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    return run.data.tags, run.info.status, run.data.metrics, len(runs)


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _start(rid: str, **extra) -> dict:
    return {"op": "start_run", "run_id": rid, "experiment": "theirs", "name": "r", "params": {"a": "1"},
            "tags": {"kind": "sample"}, "parent_run_id": None, "start_time": 1, **extra}


PENDING = "pending-" + "1" * 32


def _refused(store, path: Path, *needles: str, root: Path | None = None) -> str:
    before = _snapshot(store)
    with pytest.raises(tr.PendingError) as err:
        tr.import_pending(path, store["uri"], root=root or path.parent)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and all(n in msg for n in needles), msg
    assert _snapshot(store) == before  # nothing written, not even the valid records before the bad one
    return msg


def test_records_for_someone_elses_run_are_refused(store, tmp_path):
    rid = store["run"]
    attacks = [
        [{"op": "tags", "run_id": rid, "tags": {"model_sha256": "evil"}}],
        [{"op": "end_run", "run_id": rid, "status": "FAILED", "end_time": 5}],
        [{"op": "metrics", "run_id": rid, "metrics": [["loss", 9.0, 1, 1]], "key": "0" * 32}],  # a wrong key
        [_start(PENDING), _start(rid, key="1" * 32), {"op": "tags", "run_id": rid, "tags": {"x": "y"}}],
    ]
    for i, records in enumerate(attacks):
        path = _write(tmp_path / f"a{i}.jsonl", records)
        line = "line 2" if i == 3 else "line 1"
        _refused(store, path, line, rid, "did not create")


def test_artifacts_only_from_the_projects_output_folders(store, tmp_path):
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    secret.parent.mkdir(parents=True)
    secret.write_text("PRIVATE KEY")
    project = tmp_path / "project"
    (project / "reports" / "figures").mkdir(parents=True)
    (project / "reports" / "link.txt").symlink_to(secret)
    (project / "reports" / "figures" / "a.png").write_bytes(b"png")
    (project / "reports" / "figures" / "b.png").symlink_to(secret)
    for i, (op, path) in enumerate([("artifact", str(secret)), ("artifact", "../home/.ssh/id_rsa"),
                                    ("artifact", "reports/../../home/.ssh/id_rsa"),
                                    ("artifact", str(project / "reports" / "link.txt")),
                                    ("artifacts", str(project / "reports" / "figures"))]):
        records = [_start(PENDING), {"op": op, "run_id": PENDING, "path": path, "artifact_path": None}]
        msg = _refused(store, _write(tmp_path / f"art{i}.jsonl", records), "line 2", "path", root=project)
        assert "PRIVATE KEY" not in msg
    bad_dest = [_start(PENDING), {"op": "artifact", "run_id": PENDING, "path": "reports/figures/a.png",
                                  "artifact_path": "../../elsewhere"}]
    _refused(store, _write(tmp_path / "dest.jsonl", bad_dest), "line 2", "artifact_path", root=project)


def test_values_never_reach_a_filter_string(store, tmp_path):
    quote = "x' or tags.kind != '"
    for field, records in [("run_id", [_start(quote)]),
                           ("parent_run_id", [_start(PENDING, parent_run_id=quote)]),
                           ("tags name", [_start(PENDING, tags={"a'b": "c"})])]:
        _refused(store, _write(tmp_path / "q.jsonl", records), "line 1", field)
    with pytest.raises(ValueError, match="sample_key"):
        tr.eq_filter([("tags.sample_key", quote)])
    with pytest.raises(ValueError, match="allowed"):
        tr.filter_pairs("tags.kind = 'train' or tags.kind = 'sample'")
    tk = tr.Tracker(True, "mine", uri=store["uri"])
    with pytest.raises(ValueError):
        tk.find_runs(tags={"sample_key": quote})
    with pytest.raises(ValueError):
        tk.find_runs(parent_run_id=quote)
    assert tk.find_runs(tags={"kind": "train", "model_sha256": "ab" * 32}) == [store["run"]]


def test_the_whole_file_is_checked_first_and_bounded(store, tmp_path, monkeypatch):
    good = _start(PENDING)
    cases = [([good, "{not json", good], "line 2", "JSON"),
             ([good, {"op": "delete_run", "run_id": PENDING}], "line 2", "op"),
             ([good, {"op": "end_run", "run_id": PENDING, "status": "DELETED"}], "line 2", "status"),
             ([good, {"op": "metrics", "run_id": PENDING, "metrics": [["loss", "1", 0, 0]]}], "line 2", "metric"),
             ([good, {"op": "tags", "run_id": PENDING, "tags": {"pending_id": "x"}}], "line 2", "pending_id")]
    for i, (records, *needles) in enumerate(cases):
        _refused(store, _write(tmp_path / f"c{i}.jsonl", records), *needles)
    path = _write(tmp_path / "big.jsonl", [good] * 3)
    monkeypatch.setattr(pending, "MAX_PENDING_BYTES", 100)
    _refused(store, path, "bytes")
    monkeypatch.setattr(pending, "MAX_PENDING_BYTES", 1 << 20)
    monkeypatch.setattr(pending, "MAX_PENDING_LINE", 50)
    _refused(store, path, "line 1", "bytes")
    monkeypatch.setattr(pending, "MAX_PENDING_LINE", 1 << 20)
    monkeypatch.setattr(pending, "MAX_PENDING_LINES", 2)
    _refused(store, path, "line 3", "lines")


def test_an_import_that_fails_half_way_leaves_nothing_and_resumes(store, tmp_path, monkeypatch):
    other = "pending-" + "2" * 32
    path = _write(tmp_path / "ok.jsonl", [
        _start(PENDING), {"op": "metrics", "run_id": PENDING, "metrics": [["fid", 3.0, 0, 1]]},
        _start(other, parent_run_id=PENDING), {"op": "end_run", "run_id": other, "status": "FINISHED"},
        '{"op": "end_run", "run_id": "pending-'])  # a truncated last line (a crash) is skipped
    before = _snapshot(store)
    real_send = pending._send

    def flaky(client, rid, rec, root):
        if rec["op"] == "end_run":
            raise RuntimeError("database is locked")
        real_send(client, rid, rec, root)

    monkeypatch.setattr(pending, "_send", flaky)
    with pytest.raises(tr.TrackingError, match="database is locked"):
        tr.import_pending(path, store["uri"], root=tmp_path)
    assert _snapshot(store) == before  # the runs it had created are deleted again
    monkeypatch.undo()
    mapping = tr.import_pending(path, store["uri"], root=tmp_path)
    assert set(mapping) == {PENDING, other}
    assert tr.import_pending(path, store["uri"], root=tmp_path) == mapping  # idempotent
    c = _client(store)
    child = c.get_run(mapping[other])
    assert child.data.tags["mlflow.parentRunId"] == mapping[PENDING] and child.info.status == "FINISHED"
    assert c.get_run(mapping[PENDING]).data.metrics == {"fid": 3.0}
    assert _snapshot(store)[:3] == before[:3]  # the user's run untouched


def test_a_trackers_own_pending_file_still_reaches_its_runs(store, tmp_path, monkeypatch):
    """The writer key: records a Tracker keeps for the runs it created replay into them; records for runs
    that another process created are not kept at all."""
    tk = tr.Tracker(True, "mine", uri=store["uri"], pending_path=tmp_path / "p.jsonl")
    rid = tk.start_run("fid", {}, {"kind": "sample"})
    monkeypatch.setattr(tk, "_get_client", lambda: (_ for _ in ()).throw(RuntimeError("down")))
    tk.log_metrics(rid, [{"step": 0, "fid": 2.5}])
    tk.set_tags(store["run"], {"model_sha256": "evil"})  # a run of another process: not kept
    tk.end_run(rid)
    monkeypatch.undo()
    records = tr.read_pending(tmp_path / "p.jsonl")
    assert {r["run_id"] for r in records} == {rid} and all(len(r["key"]) == 32 for r in records)
    assert tr.import_pending(tmp_path / "p.jsonl", store["uri"], root=tmp_path) == {rid: rid}
    run = _client(store).get_run(rid)
    assert run.data.metrics["fid"] == 2.5 and run.info.status == "FINISHED"
    assert _client(store).get_run(store["run"]).data.tags["model_sha256"] == "ab" * 32



def test_a_resumed_process_adopts_its_run_with_the_key(store, tmp_path, monkeypatch):
    """A resumed training process continues the run an earlier process created: with the writer key from
    its resume checkpoint (Tracker.adopt) its pending records replay into that run; without it, none is kept."""
    first = tr.Tracker(True, "mine", uri=store["uri"])
    rid = first.start_run("train", {}, {"kind": "train"})
    key = first.writer_key(rid)
    for adopt, name in ((True, "with.jsonl"), (False, "without.jsonl")):
        tk = tr.Tracker(True, "mine", uri=store["uri"], pending_path=tmp_path / name)
        if adopt:
            tk.adopt(rid, key)
        monkeypatch.setattr(tk, "_get_client", lambda: (_ for _ in ()).throw(RuntimeError("down")))
        tk.log_metrics(rid, [{"step": 1, "loss": 0.5}])
        monkeypatch.undo()
    assert not (tmp_path / "without.jsonl").exists()
    assert tr.import_pending(tmp_path / "with.jsonl", store["uri"], root=tmp_path) == {rid: rid}
    assert _client(store).get_run(rid).data.metrics["loss"] == 0.5


# ------------------------------------------------------------------ row 8: names from fid.csv

def test_names_in_fid_csv_never_leave_the_repository(tmp_path, monkeypatch):
    """`schedule = ../../outside` in reports/fid.csv, with a loss.csv and a sample set planted where that
    path leads: a one-line error naming the file, line and column; nothing outside is opened."""
    import builtins

    import numpy as np
    import report_fixture as rf

    from ddpm.app.results import ResultsError, inside, load_results

    repo = rf.write_tree(tmp_path / "a" / "b" / "repo", schedules=("linear",), samplers=(("ddpm", 0.0),),
                         steps=(5,))
    outside = tmp_path / "a" / "b" / "outside" / "seed0"  # where repo/models/../../outside/seed0 leads
    outside.mkdir(parents=True)
    shutil.copy(repo / "models" / "linear" / "seed0" / "loss.csv", outside / "loss.csv")
    np.savez(outside / "ddpm-eta0.0-5.npz", images=np.zeros((4, 1, 8, 8), np.uint8))
    fid = repo / "reports" / "fid.csv"
    clean = fid.read_text()
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    bad_values = {"schedule": "../../outside", "sampler": "../x", "spacing": "/etc", "seed": "0/../1", "steps": "1e99"}
    for col, value in bad_values.items():
        df = pd.read_csv(io.StringIO(clean))
        df[col] = df[col].astype(object)
        df.loc[0, col] = value
        df.to_csv(fid, index=False)
        opened.clear()
        with pytest.raises(ResultsError) as err:
            load_results(rf.params(), repo)
        msg = str(err.value)
        assert "\n" not in msg and str(fid) in msg and "line 2" in msg and col in msg and "allowed" in msg, msg
        assert not [f for f in opened if "outside" in f], opened
    with pytest.raises(ResultsError, match="outside the repository"):
        inside(repo, Path("models/../../x"))
    assert inside(repo, Path("models/linear/seed0")) == repo / "models/linear/seed0"


# ------------------------------------------------------------------ row 3: kill -9 while a sample set is written

# Imported by every Python process of the killed `dvc repro` (PYTHONPATH): the sample stage's rename of its
# finished .npz temp file waits, so that the test can SIGKILL the whole run while the temp file exists.
HOOK = '''
import os, time
_replace = os.replace
def _slow_replace(src, dst, *a, **k):
    if str(src).endswith(".ddpm-tmp") and str(dst).endswith(".npz") and "samples" in str(dst):
        open(os.environ["H28A_MARKER"], "w").write(str(src))
        time.sleep(600)
    return _replace(src, dst, *a, **k)
os.replace = _slow_replace
'''


def _lock_entries(path: Path) -> dict:
    lock = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
    return {name: {k: st.get(k) for k in ("deps", "outs")} for name, st in lock.items()}


def test_sigkill_mid_write_leaves_nothing_dvc_records(tmp_path):
    """kill -9 of a real `dvc repro` while the sample stage writes its .npz; `dvc repro` again: dvc.lock's
    `samples` (the fid and report stages' dependency) lists no temp file, and every stage's deps and outs
    equal those of an uninterrupted run from the same trained model."""
    import copy

    from test_pipeline import TINY, make_repo, run

    params = copy.deepcopy(TINY)
    params["diffusion"]["schedules"] = ["linear"]
    params["sample"]["samplers"] = ["ddim-eta0.0-3"]
    params["train"].update(fid_every=0)
    params["tracking"]["enabled"] = False
    path, env = make_repo(tmp_path / "killed", params)
    run(["dvc", "repro", "train"], path, env)
    clean = tmp_path / "clean"
    shutil.copytree(path, clean, symlinks=True)
    run(["dvc", "repro"], clean, env)

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    marker = tmp_path / "marker"
    proc = subprocess.Popen(["dvc", "repro"], cwd=path, env={**env, "PYTHONPATH": str(hook),
                                                             "H28A_MARKER": str(marker)},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the sample stage never reached its write"
    samples = path / "samples" / "linear" / "seed0"
    temps = [p.name for p in samples.glob(".*.ddpm-tmp")]
    assert temps and not (samples / "ddim-eta0.0-3.npz").exists()  # killed mid-write: the temp file stayed

    run(["dvc", "repro"], path, env)
    assert not list((path / "samples").rglob("*.ddpm-tmp"))  # removed when the sample stage started again
    killed, ref = _lock_entries(path), _lock_entries(clean)
    assert killed == ref
    fid_samples = [d for d in killed["fid"]["deps"] if d["path"] == "samples"][0]
    assert fid_samples["nfiles"] == 2  # the .npz and its .json
    (samples / ".ddim-eta0.0-3.npz.planted.ddpm-tmp").write_bytes(b"x" * 100)  # a leftover, by hand
    status = run(["dvc", "status"], path, env)  # only the track stage, which always runs, is listed
    assert status.strip().splitlines() == ["track:", "\talways changed"], status


def test_remove_stale_temps_removes_only_the_targets_own(tmp_path):
    from ddpm.io import TMP_SUFFIX, atomic_write_bytes, remove_stale_temps

    target = tmp_path / "ddim-eta0.0-3.npz"
    mine = tmp_path / f".{target.name}.ab12cd{TMP_SUFFIX}"
    other = tmp_path / f".ddpm-eta0.0-3.npz.ab12cd{TMP_SUFFIX}"
    user = tmp_path / "notes.txt"
    for f in (mine, other, user):
        f.write_text("x")
    link = tmp_path / f".{target.name}.zz{TMP_SUFFIX}"
    link.symlink_to(user)
    assert remove_stale_temps(target) == [mine]
    assert other.exists() and user.read_text() == "x" and link.is_symlink()
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, other.name, user.name, link.name])
