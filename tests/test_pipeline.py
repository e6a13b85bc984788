"""Drives the real `dvc repro` and `dvc exp run` on a tiny config in a temporary git repository.

Checks the outputs' shapes, the MLflow runs, and the rerun rules: nothing changed -> nothing runs;
a sampling param -> sample, fid and report only; `timesteps` -> train onward, not prepare or featurizer.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from ci_tools import need

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 0, "seeds": [0], "timesteps": 20, "device": "cpu", "fast": False,
    "data": {"name": "digits", "root": "data/raw", "image_size": None, "channels": None, "holdout_fraction": 0.25},
    "featurizer": {"kind": "classifier", "feature_dim": 8, "epochs": 1, "batch_size": 128, "lr": 0.01,
                   "inception_weights": None},
    "model": {"dim": 8, "dim_mults": [1, 2], "dropout": 0.0, "attn_heads": 1, "attn_dim_head": 8},
    "diffusion": {"schedules": ["linear", "cosine"], "objective": "pred_noise", "zero_terminal_snr": False,
                  "min_snr_gamma": None, "clip_denoised": True, "variance": "fixed_small"},
    "train": {"steps": 6, "batch_size": 16, "lr": 0.001, "weight_decay": 0.0, "warmup_steps": 2, "grad_accum": 1,
              "max_grad_norm": 1.0, "ema_decay": 0.9, "ema_warmup": 10, "ema_every": 1, "amp": False,
              "horizontal_flip": False, "log_every": 3, "checkpoint_every": 3, "keep_checkpoints": 2,
              "fid_every": 3, "fid_samples": 16, "fid_sampling_steps": 2, "nproc_per_node": 1},
    "sample": {"samplers": ["ddpm-eta0.0-3", "ddim-eta0.0-3"], "spacing": "linspace",
               "n_samples": 24, "batch_size": 24, "nproc_per_node": 1},
    "nll": {"estimator": "stratified", "n_t": 4, "images": 16},
    "report": {"grid_images": 16, "grid_scale": 2, "forward_images": 2},
    "tracking": {"enabled": True, "experiment": "tiny"},
}


def run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout + r.stderr


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def make_repo(path, params):
    """A git + DVC repository at ``path`` with this project's code and the given params, committed."""
    need("dvc")  # under CI=true a missing dvc fails instead of skipping every pipeline test
    for item in ("ddpm", "stages", "dvc.yaml", ".dvc/config", ".dvc/plots", ".dvcignore", ".gitignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, path / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (path / item).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, path / item)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               PYTHONPATH="", OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
    run(["git", "init", "-q"], path, env)
    (path / ".dvc" / "tmp").mkdir(exist_ok=True)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "tiny"], path, env)
    return path, env


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path, env = make_repo(tmp_path_factory.mktemp("pipeline"), TINY)
    out = run(["dvc", "repro"], path, env)
    return path, env, out


def test_repro_writes_the_outputs(repo):
    path, env, out = repo
    assert ran_stages(out) >= {"prepare", "featurizer", "train@linear-0", "train@cosine-0", "fid", "report",
                               "nll@linear-0", "nll@cosine-0", "nll_table"}
    fid = pd.read_csv(path / "reports" / "fid.csv")
    assert list(fid.columns) == ["schedule", "sampler", "eta", "steps", "fid", "n_samples", "features", "seed",
                                 "spacing", "fid_lo", "fid_hi", "kid", "kid_std", "fid_inf",
                                 *[f"{m}{x}" for m in ("precision", "recall", "density", "coverage")
                                   for x in ("", "_lo", "_hi")]]
    assert ((fid["precision_lo"] <= fid["precision"]) & (fid["precision"] <= fid["precision_hi"])).all()
    nll = pd.read_csv(path / "reports" / "nll.csv")  # issue 27: bits/dim per model, on the same held-out images
    assert list(nll["schedule"]) == ["linear", "cosine"] and (nll["images"] == 16).all() and (nll["levels"] == 17).all()
    assert ((nll["bpd_lo"] < nll["bpd"]) & (nll["bpd"] < nll["bpd_hi"])).all()
    with np.load(path / "nll" / "linear" / "seed0" / "nll.npz") as f:
        assert f["bpd"].shape == (16,) and f["t"].shape == (16, 4)
    assert np.isfinite(fid["fid_inf"]).all()  # n = 24 > D + 2 = 10: the FID-infinity fit has its sizes
    assert (fid["fid_lo"] < fid["fid_hi"]).all() and (fid["kid_std"] > 0).all()
    assert fid["features"].str.fullmatch(r"classifier-8d-[0-9a-f]{8}").all()
    assert len(fid) == 2 * 2 * 1 and (fid["n_samples"] == 24).all() and (fid["fid"] >= 0).all()
    metrics = json.loads((path / "reports" / "metrics.json").read_text())
    for key in ("fid_floor", "best_fid", "featurizer_val_accuracy", "final_loss_linear", "final_loss_cosine"):
        assert key in metrics, key
    for f in ("report.md", "report.html", "plots/loss.csv", "plots/fid_steps.csv"):
        assert (path / "reports" / f).is_file(), f
    comp = pd.read_csv(path / "reports" / "comparisons.csv")  # 1 schedule pair + 1 set pair, each + interaction
    assert list(comp[comp["family"] == "questions"]["kind"]) == ["schedule", "interaction", "sampler",
                                                                 "interaction"]
    assert metrics["questions"] == 2 and "## Questions of the design" in (path / "reports" / "report.md").read_text()
    with np.load(path / "reports" / "features.npz") as f:
        assert f["features"].shape == (4, 24, 8) and f["features"].dtype == np.float32
    ckpt = path / "models" / "linear" / "seed0" / "model.pt"
    assert ckpt.is_file() and len(pd.read_csv(path / "models" / "linear" / "seed0" / "loss.csv")) == 6
    curve = pd.read_csv(path / "models" / "cosine" / "seed0" / "fid_curve.csv")
    assert list(curve.columns) == ["step", "fid", "floor"] and list(curve["step"]) == [3, 6]
    assert curve["floor"].nunique() == 1 and curve["floor"].iloc[0] > 0  # real vs real at the curve's own count
    info = json.loads((path / "models" / "linear" / "seed0" / "train.json").read_text())
    assert not {"seconds", "images_per_second"} & set(info)  # no timings in DVC outputs
    # issue 25 item 4: the kernels' record (fast: false turns them off) in the model file, train.json, sample .json
    import torch

    off = {"fused_kernels": False, "isa": None, "aten_isa": torch.backends.cpu.get_cpu_capability(),
           "flush_denormals": False, "reason": "fast: false"}
    assert torch.load(ckpt, weights_only=True)["kernels"] == off and info["kernels"] == off
    assert json.loads((path / "samples" / "linear" / "seed0" / "ddim-eta0.0-3.json").read_text())["kernels"] == off


def test_mlflow_runs_form_the_comparison_table(repo):
    path, env, _ = repo
    r = subprocess.run([sys.executable, "-m", "ddpm.cli", "table", "--csv"], cwd=path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from io import StringIO

    table = pd.read_csv(StringIO(r.stdout))
    assert len(table) == 4 and set(table["schedule"]) == {"linear", "cosine"}
    assert set(table["sampler"]) == {"ddpm", "ddim"} and table["parent_run_id"].notna().all()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for run in client.search_runs([exp.experiment_id], "tags.kind != 'report'"):  # train and sample runs
        assert run.data.tags["kernels.fused_kernels"] == "False" and run.data.tags["kernels.reason"] == "fast: false"


def test_force_repro_is_reproducible(repo):
    """Issue 12 point 5: every DVC output (models, samples, fid, report) is a pure function of its inputs, MLflow
    tracking on: `dvc repro --force` gives the same dvc.lock (no timings, run ids or resume steps in outputs)."""
    path, env, _ = repo
    lock = (path / "dvc.lock").read_text()
    before = {f: (path / f).read_bytes() for f in ("reports/fid.csv", "models/linear/seed0/loss.csv", "models/cosine/seed0/loss.csv")}
    samples = sorted((path / "samples").rglob("*.npz"))
    arrays = {f: np.load(f)["images"] for f in samples}
    ran = ran_stages(run(["dvc", "repro", "--force"], path, env))
    assert {"prepare", "featurizer", "train@linear-0", "sample@linear-0-ddpm-eta0.0-3", "fid", "report"} <= ran
    assert (path / "dvc.lock").read_text() == lock
    for f, data in before.items():
        assert (path / f).read_bytes() == data, f
    for f, a in arrays.items():
        assert np.array_equal(np.load(f)["images"], a), f


def test_rerun_rules(repo):
    path, env, _ = repo
    assert ran_stages(run(["dvc", "repro"], path, env)) == {"track"}  # nothing changed, nothing runs but the mirror
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["sample"]["samplers"] = ["ddpm-eta0.0-3", "dpmpp_2m-eta0.0-5", "ddim-eta0.0-3"]  # a set inserted
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = ran_stages(run(["dvc", "repro"], path, env))
    assert ran == {"sample@linear-0-dpmpp_2m-eta0.0-5", "sample@cosine-0-dpmpp_2m-eta0.0-5", "fid", "report",
                   "track"}, ran
    fid = pd.read_csv(path / "reports" / "fid.csv")
    assert len(fid) == 6 and set(fid["spacing"]) == {"linspace"}
    assert json.loads((path / "samples" / "linear" / "seed0" / "dpmpp_2m-eta0.0-5.json").read_text())["spacing"] == \
        "linspace"
    params["sample"]["samplers"] = ["dpmpp_2m-eta0.0-5"]  # removing sets leaves no stale rows behind
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = ran_stages(run(["dvc", "repro"], path, env))
    assert ran == {"fid", "report", "track"}, ran
    assert list(pd.read_csv(path / "reports" / "fid.csv")["sampler"].unique()) == ["dpmpp_2m"]
    params["report"]["grid_scale"] = 3  # a report param: the report only
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(run(["dvc", "repro"], path, env)) == {"report", "track"}
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "steps"], path, env)


def test_exp_run_timesteps(repo):
    path, env, _ = repo
    out = run(["dvc", "exp", "run", "-S", "timesteps=30", "-n", "t30"], path, env)
    ran = ran_stages(out)
    assert "prepare" not in ran and "featurizer" not in ran
    assert {"train@linear-0", "train@cosine-0", "fid", "report"} <= ran
    show = run(["dvc", "exp", "show", "--no-pager", "--csv"], path, env)
    assert "t30" in show and "best_fid" in show
    table = run([sys.executable, "-m", "ddpm.cli", "table", "--csv"], path, env)
    assert "30" in table  # the t30 runs carry timesteps=30


def test_sigkill_during_training_resumes_bit_for_bit(tmp_path):
    """SIGKILL the train stage after a checkpoint; `dvc repro` again continues from it, and the final
    weights equal those of an uninterrupted run (CPU)."""
    import copy
    import signal
    import time

    import torch

    params = copy.deepcopy(TINY)
    params["diffusion"]["schedules"] = ["linear"]
    params["train"].update(steps=500, checkpoint_every=50, log_every=25, fid_every=0, keep_checkpoints=2)
    path, env = make_repo(tmp_path, params)
    run(["dvc", "repro", "featurizer"], path, env)
    ckpts = path / "checkpoints" / "linear" / "seed0"
    model_dir = path / "models" / "linear" / "seed0"
    proc = subprocess.Popen(["dvc", "repro", "train@linear-0"], cwd=path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpts.glob("ckpt-*.pt")) and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (model_dir / "model.pt").exists(), "training finished before the kill"
    first = max(int(p.stem.split("-")[1]) for p in ckpts.glob("ckpt-*.pt"))
    assert 0 < first < 500
    run(["dvc", "repro", "train@linear-0"], path, env)
    info = json.loads((model_dir / "train.json").read_text())
    assert info["steps"] == 500 and "resumed_from" not in info and "mlflow_run_id" not in info  # pure outputs
    resumed = torch.load(model_dir / "model.pt", weights_only=True)
    resumed_loss = (model_dir / "loss.csv").read_bytes()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'train'")
    assert len(runs) == 1  # the resumed run continued its MLflow run, tagged with where it resumed
    assert first <= int(runs[0].data.tags["resumed_from"]) < 500
    assert runs[0].data.tags["model_sha256"] == hashlib.sha256((model_dir / "model.pt").read_bytes()).hexdigest()
    assert runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert sorted(steps) == list(range(1, 501))  # steps logged after the last checkpoint may appear twice
    assert not ckpts.parent.exists()  # a finished run removes its checkpoints: the next run starts from scratch
    # issue 13 point 2: other params' checkpoints above this run's last step survive the run and its cleanup
    ckpts.mkdir(parents=True)
    for step in (600, 700):
        torch.save({"format": "ddpm-checkpoint/1", "step": step, "run_key": "other-params"}, ckpts / f"ckpt-{step:08d}.pt")
    run(["dvc", "repro", "--force", "train@linear-0"], path, env)
    assert sorted(f.name for f in ckpts.iterdir()) == ["ckpt-00000600.pt", "ckpt-00000700.pt"]
    fresh = torch.load(model_dir / "model.pt", weights_only=True)
    assert client.search_runs([exp.experiment_id], "tags.kind = 'train'", order_by=["attributes.start_time DESC"]
                              )[0].data.tags["resumed_from"] == "none"
    assert fresh["format"] == "ddpm-model/1" and not {"optimizer", "rng", "data_state", "model"} & set(fresh)
    for name, tensor in fresh["ema"].items():  # the exported model holds the EMA weights only
        assert torch.equal(tensor, resumed["ema"][name]), name
    assert (model_dir / "loss.csv").read_bytes() == resumed_loss


def test_npz_outputs_are_byte_reproducible(tmp_path):
    import time

    from ddpm.io import atomic_save_npz

    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    atomic_save_npz(tmp_path / "a.npz", images=a)
    time.sleep(2.1)  # zip timestamps have a 2-second resolution
    atomic_save_npz(tmp_path / "b.npz", images=a)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], a)


def test_hostile_names_in_params_never_reach_a_shell(tmp_path):
    """A schedule or sampler name with shell syntax fails validation in Python; nothing runs in the shell.

    Valid params first (prepare, featurizer and train@linear-0), then hostile names: prepare, featurizer
    and train@linear-0 stay up to date, so DVC goes straight to the new stages' commands."""
    import copy

    params = copy.deepcopy(TINY)
    params["diffusion"]["schedules"] = ["linear"]
    params["train"].update(steps=2, fid_every=0, checkpoint_every=2, log_every=2)
    params["tracking"]["enabled"] = False
    path, env = make_repo(tmp_path, params)
    run(["dvc", "repro", "train@linear-0"], path, env)
    params["diffusion"]["schedules"] = ["linear", "cosine;touch marker1;true"]
    params["sample"]["samplers"] = ["ddpm-eta0.0-3", "ddim$(touch marker2)-eta0.0-3"]
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run(["dvc", "repro", "--keep-going"], cwd=path, env=env, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert ran_stages(out) >= {"train@cosine;touch marker1;true-0", "sample@linear-0-ddim$(touch marker2)-eta0.0-3"}, \
        out[-3000:]
    assert "diffusion.schedules[1]: got 'cosine;touch marker1;true'" in out
    assert not list(path.rglob("marker*")), out[-3000:]
