"""The comparisons through the tracking module: `ddpm compare A B` on a tiny git (+ DVC)
repository with synthetic features files, `table --questions`, and log_comparisons into a sqlite MLflow store."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ddpm.metrics import compare
from ddpm.app import tracking as tr
from ddpm import cli
from ddpm.app.tracking import runs
from ddpm.app.tracking import table

ROOT = Path(__file__).resolve().parents[1]
SETS = ["ddim-eta0-10", "dpmpp_2m-10"]


def _features(shift: float, seed: int = 0):
    """Two schedules x two sets sharing a latent per index; every cell of B is ``shift`` worse in its mean."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(120, 4))
    cells = {(sc, 0, s): (shift + 0.9 * z + 0.3 * rng.normal(size=z.shape)).astype(np.float32)
             for sc in ("linear", "cosine") for s in SETS}
    return cells, np.random.default_rng(99).normal(size=(300, 4)).astype(np.float32)


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """Commit 1: features of A; commit 2: B (all cells shifted by 0.6), both git-tracked."""
    repo = tmp_path_factory.mktemp("cmp")
    _git(repo, "init", "-q")
    path = repo / "reports" / "features.npz"
    for shift, msg in ((0.0, "A"), (0.6, "B")):
        compare.save_features(path, *_features(shift), space="classifier-4d-test")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", msg)
    return repo


def test_cli_compare_two_commits(repo):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "ddpm.cli", "compare", "HEAD~1", "HEAD", "--repo", str(repo),
                          "--n-boot", "200"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["question", "effect", "lo"] and len(lines) == 1 + 4 + 1 + 1
    assert "linear/ddim-eta0-10: B - A" in out.stdout and "all 4 configurations: B - A" in out.stdout
    assert "pooled over 4 configurations" in lines[-1] and "A better" in lines[-1] and "Holm over 5" in lines[-1]
    # in-process, as CSV: the same numbers as the library's cross table
    direct = tr.compare_revs("HEAD~1", "HEAD", repo, n_boot=200)
    ca, ra, _ = compare.load_features(table.read_rev_file("HEAD~1", "reports/features.npz", repo))
    cb, rb, _ = compare.load_features(table.read_rev_file("workspace", "reports/features.npz", repo))
    pd.testing.assert_frame_equal(direct, compare.cross_table(ca, ra, cb, rb, n_boot=200))
    assert direct["effect"].iloc[-1] > 0 and (direct["verdict"] == "A better").all()


def test_cli_compare_errors(repo, tmp_path, capsys):
    assert cli.main(["compare", "HEAD", "no-such-rev", "--repo", str(repo)]) == 1
    assert "reports/features.npz at 'no-such-rev'" in capsys.readouterr().err
    other = tmp_path / "reports" / "features.npz"  # "workspace" reads the working tree: here another feature space
    compare.save_features(other, *_features(0.0), space="inception-2048d-x")
    shutil.copytree(repo / ".git", tmp_path / ".git")
    with pytest.raises(ValueError, match="feature spaces differ"):
        tr.compare_revs("HEAD", "workspace", tmp_path)


@pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc not installed")
def test_compare_reads_dvc_tracked_features(tmp_path):
    """features.npz is a DVC output in the pipeline: read it at a revision from DVC's cache."""
    repo = tmp_path / "dvcrepo"
    repo.mkdir()
    _git(repo, "init", "-q")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True, env=env)
    (repo / "reports").mkdir()
    for shift, msg in ((0.0, "A"), (0.6, "B")):
        compare.save_features(repo / "reports" / "features.npz", *_features(shift), space="s")
        subprocess.run(["dvc", "add", "-q", "reports/features.npz"], cwd=repo, check=True, env=env)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", msg)
    df = tr.compare_revs("HEAD~1", "HEAD", repo, n_boot=100)
    assert df["effect"].iloc[-1] > 0 and df["verdict"].iloc[-1] == "A better"


def test_table_questions_and_log_comparisons(tmp_path, capsys):
    cells, ref = _features(0.0)
    cells[("cosine", 0, SETS[0])] = cells[("cosine", 0, SETS[0])] + 0.8  # cosine worse with ddim only
    path = tmp_path / "comparisons.csv"
    table = compare.grid_comparisons(cells, ref, n_boot=200)
    table.to_csv(path, index=False)
    assert cli.main(["table", "--questions", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    main = table[(table["family"] == "questions") & (table["kind"] != "interaction")]
    resolved = int((main["verdict"] != "tie").sum())
    assert f"{resolved} of 2 main effects resolved at 95% family-wise (Holm over 4 verdicts" in out
    assert "linear vs cosine, averaged over the sample sets" in out and "interaction" in out.splitlines()[0]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tk = tr.Tracker(True, "cmp", uri=uri)
    run = tk.start_run("fid", tags={"kind": "fid"})
    tr.log_comparisons(tk, run, path)
    tk.end_run(run)
    assert not tk.failed
    client = runs._open_client(uri)
    assert client.get_run(run).data.metrics == {"questions": 2.0, "questions_resolved": float(resolved)}
    assert cli.main(["table", "--questions", "--run", run, "--uri", uri]) == 0
    assert f"{resolved} of 2 main effects resolved" in capsys.readouterr().out


def _nll_commit(repo: Path, shift: float, images: str, msg: str) -> None:
    """reports/nll.csv and nll/<schedule>/seed0/nll.npz of two schedules: bpd per image of 50 held-out images."""
    rng = np.random.default_rng(7)
    base = 3.0 + 0.4 * rng.normal(size=50)  # the images' own spread, shared by both sides
    rows = []
    for k, schedule in enumerate(("linear", "cosine")):
        bpd = base + 0.1 * k + shift + 0.01 * np.random.default_rng(k + 10 * abs(int(shift * 100))).normal(size=50)
        path = repo / "nll" / schedule / "seed0" / "nll.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, bpd=bpd, holdout_sha256=np.str_(images))
        rows.append({"schedule": schedule, "seed": 0, "bpd": bpd.mean()})
    (repo / "reports").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(repo / "reports" / "nll.csv", index=False)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", msg)


def test_cli_compare_nll_pairs_per_image_and_refuses_other_images(tmp_path, capsys):
    repo = tmp_path / "nllrepo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _nll_commit(repo, 0.0, "a" * 64, "A")
    _nll_commit(repo, -0.05, "a" * 64, "B: 0.05 bits/dim lower on every image")
    assert cli.main(["compare", "HEAD~1", "HEAD", "--repo", str(repo), "--nll"]) == 0
    out = capsys.readouterr().out
    assert "linear/0: B - A" in out and "pooled over 2 models" in out and "B better" in out.splitlines()[-1]
    df = tr.compare_nll_revs("HEAD~1", "HEAD", repo)
    # the images' spread (0.4) cancels in the pairing: the interval is about the 0.01 noise, not the 0.4 spread
    assert list(df["kind"]) == ["model", "model", "pooled"] and (df["verdict"] == "B better").all()
    assert df["effect"].to_numpy() == pytest.approx(-0.05, abs=0.01) and (df["hi"] - df["lo"]).max() < 0.02
    _nll_commit(repo, 0.0, "b" * 64, "C: scored on other images")
    with pytest.raises(ValueError, match="held-out images differ"):
        tr.compare_nll_revs("HEAD~1", "HEAD", repo)
