"""A DVC remote: `dvc push`, then a fresh `git clone` + `dvc pull` is complete and up to date.

Runs the tiny pipeline in a temporary git repository, commits, pushes to a local-folder remote
(`dvc remote add -d local DIR`), clones the repository into a fresh folder and pulls: `dvc status`
and `dvc repro` there find nothing to do but the MLflow mirror (track), and every pipeline output is
byte-identical to the original's; MLflow in the clone then holds every result (issue 25 item 6). This fails if an output is neither in git nor in the DVC cache (a `cache: false` output
in a gitignored folder is never pushed, so the clone would miss it and rerun its stage).
"""
import copy
import io
import sys

import pandas as pd

from test_pipeline import TINY, make_repo, ran_stages, run

OUTPUTS = ("data/prepared", "featurizer", "models", "samples", "reports")


def _files(root, folders) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for d in folders for f in sorted((root / d).rglob("*"))
            if f.is_file() and f.name != "mlflow-pending.jsonl"}


def test_push_clone_pull_is_up_to_date(tmp_path):
    params = copy.deepcopy(TINY)
    params["diffusion"]["schedules"] = ["linear"]
    params["sample"]["samplers"] = ["ddpm-eta0.0-3"]
    src, env = make_repo(tmp_path / "src", params)
    ran = ran_stages(run(["dvc", "repro"], src, env))
    assert {"prepare", "featurizer", "train@linear-0", "sample@linear-0-ddpm-eta0.0-3", "fid", "nll@linear-0",
            "nll_table", "report", "track"} == ran, ran
    assert not (src / "checkpoints" / "linear").exists()  # removed after a finished run, never pushed
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], src, env)
    run(["git", "add", "-A"], src, env)
    run(["git", "commit", "-qm", "run + remote"], src, env)
    assert "nothing to commit" in run(["git", "status"], src, env)  # every output is in git or DVC's cache
    run(["dvc", "push"], src, env)
    assert "in sync" in run(["dvc", "status", "--cloud"], src, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(src), str(clone)], tmp_path, env)
    assert not (clone / "models").exists() and (clone / "reports" / "report.md").is_file()  # git has reports/
    run(["dvc", "pull"], clone, env)
    status = run(["dvc", "status"], clone, env)
    assert status.split() == ["track:", "always", "changed"], status  # the MLflow mirror runs every time
    out = run(["dvc", "repro"], clone, env)
    assert ran_stages(out) == {"track"}, out[-3000:]  # only the mirror: every output was pulled
    assert (clone / "dvc.lock").read_bytes() == (src / "dvc.lock").read_bytes()
    before, after = _files(src, OUTPUTS), _files(clone, OUTPUTS)
    assert sorted(after) == sorted(before)
    assert [f for f in before if before[f] != after[f]] == []
    assert {"models/linear/seed0/model.pt", "featurizer/metrics.json", "samples/linear/seed0/ddpm-eta0.0-3.json",
            "reports/report.html", "reports/metrics.json"} <= set(after)


    # MLflow in the clone holds what the workspace holds, though DVC skipped train, fid and report there
    table = _table(clone, env)
    fid = pd.read_csv(clone / "reports" / "fid.csv")
    assert len(table) == len(fid) == 1 and table["parent_run_id"].notna().all()
    assert table["fid"].tolist() == fid["fid"].tolist() and table["kid"].tolist() == fid["kid"].tolist()
    assert table[["fid_lo", "fid_hi", "fid_floor"]].notna().all().all()
    assert ran_stages(run(["dvc", "repro"], clone, env)) == {"track"}
    assert _table(clone, env)["run_id"].tolist() == table["run_id"].tolist()  # a rerun adds no run
    assert _runs(clone) == {"report": 1, "sample": 1, "train": 1}


def _table(repo, env) -> pd.DataFrame:
    """`ddpm table --csv` in ``repo`` (the console script's code, run from the checkout under test)."""
    out = run([sys.executable, "-m", "ddpm.cli", "table", "--csv"], repo, env)
    return pd.read_csv(io.StringIO(out))


def _runs(repo) -> dict[str, int]:
    """Runs per kind tag in ``repo``'s mlflow.db."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    kinds = [r.data.tags.get("kind") for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    return {k: kinds.count(k) for k in sorted(set(kinds))}
