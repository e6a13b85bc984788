"""Two queued DVC experiments run in parallel and both land, complete and apart, in the default MLflow store.

`dvc exp run --queue -S timesteps=20 -n q20` and `... timesteps=30 -n q30`, then `dvc queue start -j 2`:
both experiments run at once in `.dvc/tmp/exps` copies, each logging to `<repo>/mlflow.db` (found via
`DVC_ROOT`) and racing to create it. Checks that both finish, that `dvc exp show` lists both with
metrics, and that the store has, per experiment, exactly one train run (tag `dvc_exp_name`, matching
`params.timesteps`, the whole loss curve) with its own nested sample runs (none hung under the other
experiment's train run). Tiny grid: 1 schedule x 1 sampler x 1 step count.
"""
import copy
import subprocess
import time
from io import StringIO

import pandas as pd
import pytest

from ci_tools import need

from test_pipeline import ROOT, TINY, make_repo, run

QUEUE_TIMEOUT_S = 300
EXPS = {"q20": 20, "q30": 30}  # experiment name -> timesteps


def _queue_status(path, env) -> str:
    r = subprocess.run(["dvc", "queue", "status"], cwd=path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _wait_for_queue(path, env, names) -> str:
    """Poll `dvc queue status` until every named task is Success or Failed (bounded)."""
    deadline = time.time() + QUEUE_TIMEOUT_S
    while True:
        status = _queue_status(path, env)
        # columns: Task, Name, Created (e.g. "11:18 AM"), Status: the status is the last word
        rows = {line.split()[1]: line.split()[-1] for line in status.splitlines()[1:]
                if len(line.split()) >= 4 and line.split()[1] in names}
        if set(rows) == set(names) and all(s in ("Success", "Failed") for s in rows.values()):
            return status
        if time.time() > deadline:
            pytest.fail(f"queue not done after {QUEUE_TIMEOUT_S}s:\n{status}")
        time.sleep(2)


def test_cache_links_by_copy():
    """Parallel queue workers commit the same objects into one cache; DVC's default (reflink, copy) on a
    filesystem without reflink unlinks a shared cache file mid-commit and the other worker fails with
    "unable to remove ... without a confirmation". `.dvc/config` sets `cache.type = copy` to avoid it."""
    need("dvc")
    from dvc.repo import Repo

    repo = Repo(str(ROOT))
    try:
        assert repo.cache.local.cache_types == ["copy"], repo.cache.local.cache_types
    finally:
        repo.close()


def test_two_queued_experiments_log_to_one_store(tmp_path):
    """Two queued experiments started with `dvc queue start -j 2` both finish, and both sets of MLflow
    runs (train + nested sample runs) are in `<repo>/mlflow.db`, none missing, none crossed."""
    from ddpm.app.tracking.runs import _open_client
    from ddpm.app.tracking.table import comparison_table

    params = copy.deepcopy(TINY)
    params["diffusion"]["schedules"] = ["linear"]
    params["sample"]["samplers"] = ["ddpm-eta0.0-3"]
    params["tracking"]["experiment"] = "queued"
    train_steps = params["train"]["steps"]
    path, env = make_repo(tmp_path, params)

    for name, T in EXPS.items():
        run(["dvc", "exp", "run", "--queue", "-S", f"timesteps={T}", "-n", name], path, env)
    # not run(): the detached queue workers inherit its captured pipes, so it would block until they exit
    t0 = time.time()
    with open(tmp_path / "queue-start.log", "w") as log:
        r = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=path, env=env, stdout=log,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 0, (tmp_path / "queue-start.log").read_text()
    try:
        status = _wait_for_queue(path, env, set(EXPS))
        print(f"queue finished in {time.time() - t0:.1f}s")
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=path, env=env, capture_output=True, timeout=120)
    for name in EXPS:
        line = next(l for l in status.splitlines() if f" {name} " in f" {l} ")
        if "Success" not in line:
            logs = subprocess.run(["dvc", "queue", "logs", name], cwd=path, env=env, capture_output=True,
                                  text=True, timeout=120)
            pytest.fail(f"{name} did not succeed:\n{status}\n{logs.stdout[-4000:]}{logs.stderr[-2000:]}")

    show = pd.read_csv(StringIO(run(["dvc", "exp", "show", "--no-pager", "--csv"], path, env)))
    for name, T in EXPS.items():
        row = show[show["Experiment"] == name]
        assert len(row) == 1, show[["Experiment", "rev"]]
        assert int(row["timesteps"].iloc[0]) == T
        assert pd.notna(pd.to_numeric(row["best_fid"], errors="coerce").iloc[0]), row.T

    uri = f"sqlite:///{path}/mlflow.db"
    assert (path / "mlflow.db").is_file(), "the queued experiments did not log to <repo>/mlflow.db"
    client = _open_client(uri)
    exp = client.get_experiment_by_name("queued")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    train = {r.data.tags.get("dvc_exp_name"): r for r in runs if r.data.tags.get("kind") == "train"}
    assert sum(r.data.tags.get("kind") == "train" for r in runs) == len(EXPS), \
        [(r.data.tags.get("kind"), r.data.tags.get("dvc_exp_name")) for r in runs]
    assert set(train) == set(EXPS), list(train)
    for name, T in EXPS.items():
        tr = train[name]
        assert tr.info.status == "FINISHED", (name, tr.info.status)
        assert tr.data.params["timesteps"] == str(T), (name, tr.data.params["timesteps"])
        loss = client.get_metric_history(tr.info.run_id, "loss")
        assert sorted(m.step for m in loss) == list(range(1, train_steps + 1)), (name, [m.step for m in loss])

    table = comparison_table(experiment="queued", uri=uri)
    assert len(table) == len(EXPS), table
    for name, T in EXPS.items():
        rows = table[table["dvc_exp_name"] == name]
        assert len(rows) == 1, (name, table)
        row = rows.iloc[0]
        assert row["parent_run_id"] == train[name].info.run_id, (name, row["parent_run_id"])
        assert row["timesteps"] == T and row["schedule"] == "linear" and row["sampler"] == "ddpm"
        assert row["steps"] == 3 and pd.notna(row["fid"]), row
