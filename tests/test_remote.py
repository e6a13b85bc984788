"""A DVC remote: `dvc push`, then a fresh `git clone` + `dvc pull` is complete and up to date.

Runs the tiny pipeline in a temporary git repository, commits, pushes to a local-folder remote
(`dvc remote add -d local DIR`), clones the repository into a fresh folder and pulls: `dvc status`
and `dvc repro` there find nothing to do, and every pipeline output is byte-identical to the
original's. This fails if an output is neither in git nor in the DVC cache (a `cache: false` output
in a gitignored folder is never pushed, so the clone would miss it and rerun its stage).
"""
import copy

from tests.test_pipeline import TINY, make_repo, ran_stages, run

UP_TO_DATE = "Data and pipelines are up to date."
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
    assert {"prepare", "featurizer", "train@linear-0", "sample@linear-0-ddpm-eta0.0-3", "fid", "report"} == ran, ran
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
    assert UP_TO_DATE in status, status
    out = run(["dvc", "repro"], clone, env)
    assert ran_stages(out) == set() and UP_TO_DATE in out, out[-3000:]
    assert not (clone / "mlflow.db").exists()  # no stage ran, so none logged
    assert (clone / "dvc.lock").read_bytes() == (src / "dvc.lock").read_bytes()
    before, after = _files(src, OUTPUTS), _files(clone, OUTPUTS)
    assert sorted(after) == sorted(before)
    assert [f for f in before if before[f] != after[f]] == []
    assert {"models/linear/seed0/model.pt", "featurizer/metrics.json", "samples/linear/seed0/ddpm-eta0.0-3.json",
            "reports/report.html", "reports/metrics.json"} <= set(after)

