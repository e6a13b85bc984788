"""The whole pipeline against a real, shared ``mlflow server`` (its own SQLite backend and artifact folder).

`MLFLOW_TRACKING_URI=http://127.0.0.1:PORT dvc repro` on the tiny config of tests/test_pipeline.py,
then everything is read back from the server: the comparison table through ``mlflow.search_runs``
(one row per schedule x sampler x steps, with the FIDs of reports/fid.csv), and the artifacts in
the server's ``--artifacts-destination`` folder: loss.csv and fid_curve.csv of each train run, the
sample grid of each sample run, the report files of the one `report` run (also fetched with
``mlflow.artifacts.download_artifacts``). Nothing is written to a local store.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from test_pipeline import TINY, make_repo, ran_stages, run
from test_tracking_server import Server, _free_port


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """mlflow's global tracking URI (it also sets $MLFLOW_TRACKING_URI) for a block, then restored."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(before)


@pytest.fixture
def server(tmp_path):
    (tmp_path / "server").mkdir()
    srv = Server(tmp_path / "server", _free_port())
    yield srv
    srv.kill()


def _artifact_dir(server: Server, artifact_uri: str) -> Path:
    """Where the server stored a run's artifacts: mlflow-artifacts:/<exp>/<run>/artifacts -> a folder."""
    prefix = "mlflow-artifacts:/"
    assert artifact_uri.startswith(prefix), artifact_uri  # proxied through the server, not a client path
    return server.root / "artifacts" / artifact_uri[len(prefix):]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_pipeline_logs_runs_and_artifacts_to_a_shared_server(tmp_path, server):
    start_s = server.start()
    params = copy.deepcopy(TINY)
    params["tracking"]["experiment"] = "shared"
    path, env = make_repo(tmp_path / "repo", params)
    env["MLFLOW_TRACKING_URI"] = server.uri
    t0 = time.monotonic()
    ran = ran_stages(run(["dvc", "repro"], path, env))
    repro_s = time.monotonic() - t0
    assert {"train@linear-0", "train@cosine-0", "fid", "report"} <= ran
    # every stage reached the server: no local store, no pending file
    assert not (path / "mlflow.db").exists() and not (path / "mlruns").exists()
    assert sorted(path.rglob("mlflow-pending.jsonl")) == []

    fid_csv = pd.read_csv(path / "reports" / "fid.csv")
    schedules, samplers = params["diffusion"]["schedules"], ["ddpm", "ddim"]
    steps = sorted({int(key.rsplit("-", 1)[1]) for key in params["sample"]["samplers"]})  # sets: <rule>-eta<eta>-<steps>
    with _tracking_uri(server.uri) as mlflow:
        table = mlflow.search_runs(experiment_names=["shared"], filter_string="tags.kind = 'sample'")
        train = mlflow.search_runs(experiment_names=["shared"], filter_string="tags.kind = 'train'",
                                   output_format="list")
        reports = mlflow.search_runs(experiment_names=["shared"], filter_string="tags.kind = 'report'",
                                     output_format="list")
        samples = mlflow.search_runs(experiment_names=["shared"], filter_string="tags.kind = 'sample'",
                                     output_format="list")
        downloaded = Path(mlflow.artifacts.download_artifacts(
            run_id=reports[0].info.run_id, artifact_path="report.md", dst_path=str(tmp_path / "dl"),
            tracking_uri=server.uri))

    # the comparison table: one row per schedule x sampler x steps, the FIDs of reports/fid.csv
    keys = sorted(zip(table["params.schedule"], table["params.sampler"], table["params.steps"].astype(int)))
    assert keys == sorted(itertools.product(schedules, samplers, steps))
    assert table["status"].eq("FINISHED").all() and table["metrics.fid"].notna().all()
    merged = table.assign(steps=table["params.steps"].astype(int)).merge(
        fid_csv, left_on=["params.schedule", "params.sampler", "steps"], right_on=["schedule", "sampler", "steps"])
    assert len(merged) == len(table)
    assert merged["metrics.fid"].to_numpy() == pytest.approx(merged["fid"].to_numpy(), rel=1e-5)
    train_ids = {r.data.params["schedule"]: r.info.run_id for r in train}
    assert sorted(train_ids) == sorted(schedules)
    assert set(table["tags.mlflow.parentRunId"]) == set(train_ids.values())

    # artifacts, byte for byte, in the server's artifact folder
    for r in train:
        stored = _files(_artifact_dir(server, r.info.artifact_uri))
        model_dir = path / "models" / r.data.params["schedule"] / "seed0"
        assert stored == {n: (model_dir / n).read_bytes() for n in ("loss.csv", "fid_curve.csv")}
    figures = _files(path / "reports" / "figures")
    for r in samples:
        stored = _files(_artifact_dir(server, r.info.artifact_uri))
        assert len(stored) == 1, stored  # the grid of this sample set, as in the report
        (name, data), = stored.items()
        label = "ddim-eta0" if r.data.params["sampler"] == "ddim" else r.data.params["sampler"]
        assert name == f"samples_{r.data.params['schedule']}_{label}_{r.data.params['steps']}.png"
        assert data == figures[name]
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    report = reports[0]
    stored = _files(_artifact_dir(server, report.info.artifact_uri))
    expected = {n: (path / "reports" / n).read_bytes() for n in ("report.md", "report.html", "fid.csv",
                                                                  "fid_summary.json", "metrics.json", "nll.csv")}
    expected.update({f"figures/{n}": data for n, data in figures.items()})
    expected["comparisons/comparisons.csv"] = (path / "reports" / "comparisons.csv").read_bytes()  # the question table
    assert stored == expected
    assert downloaded.read_bytes() == (path / "reports" / "report.md").read_bytes()
    metrics = json.loads((path / "reports" / "metrics.json").read_text())
    assert report.data.metrics["best_fid"] == pytest.approx(metrics["best_fid"])
    assert set(report.data.tags["train_run_ids"].split(",")) == set(train_ids.values())
    print(f"\nserver start {start_s:.1f} s, dvc repro against it {repro_s:.1f} s; read back {len(table)} sample "
          f"runs, {len(train)} train runs, 1 report run with {len(stored)} artifacts")
