"""Model files from others are data, not code (issue 13, points 1, 2 and 8).

Every public loader (``load_model``, ``load_checkpoint``, a Trainer's resume, the sample stage) refuses a
file whose pickle would run code and a file naming a model class outside the registry, with an error
naming the file, before running anything (a marker file proves nothing ran). A run prunes and removes only
its own checkpoints; the Trainer resumes only its own run.
"""
import builtins
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ddpm import GaussianDiffusion, Trainer, Unet
from ddpm.training.checkpoint import (CHECKPOINT_FORMAT, MODEL_FORMAT, UnsafeFileError, checkpoint_path, latest_valid_checkpoint,
                                      list_checkpoints, load_checkpoint, load_model, remove_run_checkpoints, save_model)
from ddpm.data.datasets import load_dataset
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.training.checkpoint import model_metadata
from ddpm.training.loop import TrainSettings, train

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def pickle_file(path, marker, fmt=CHECKPOINT_FORMAT):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": fmt, "step": 1, "run_key": None, "payload": Payload(marker)}, path)
    return path


def hostile_class_file(path, marker, fmt=CHECKPOINT_FORMAT):
    """Loads with weights_only=True; its model_class would call os.system("touch marker") if imported."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": fmt, "step": 1, "run_key": None, "model_class": "os.system",
                "model_config": {"command": f"touch {marker}"}, "ema": {}, "model": {},
                "diffusion": {"schedule": "linear", "timesteps": 10, "objective": "pred_noise"},
                "image_shape": [1, 8, 8], "params": {}}, path)
    return path


def test_the_payload_would_run_code_if_unpickled(tmp_path):
    """The test's own premise: a plain unpickle of the file creates the marker."""
    marker = tmp_path / "marker"
    path = pickle_file(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("make", [pickle_file, hostile_class_file])
@pytest.mark.parametrize("fmt", [CHECKPOINT_FORMAT, MODEL_FORMAT])
def test_load_model_and_load_checkpoint_refuse(tmp_path, make, fmt):
    marker = tmp_path / "marker"
    path = make(checkpoint_path(tmp_path, 1), marker, fmt)
    with pytest.raises(UnsafeFileError, match="ckpt-00000001.pt"):
        load_model(path)
    if fmt == CHECKPOINT_FORMAT:
        with pytest.raises(UnsafeFileError, match="ckpt-00000001.pt"):
            load_checkpoint(path)
        with pytest.raises(UnsafeFileError, match="ckpt-00000001.pt"):  # resume stops instead of skipping it
            latest_valid_checkpoint(tmp_path)
    assert not marker.exists()


@pytest.fixture
def image_folder(png_folder):
    return png_folder(4, (8, 8))


def tiny_diffusion():
    torch.manual_seed(0)
    return GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8),
                             image_size=8, timesteps=10)


def trainer(folder, results, **kw):
    return Trainer(tiny_diffusion(), str(folder), train_batch_size=2, calculate_fid=False, results_folder=str(results),
                   save_and_sample_every=2, num_samples=1, progress=False, **kw)


@pytest.mark.parametrize("make", [pickle_file, hostile_class_file])
def test_trainer_resume_refuses(tmp_path, image_folder, make):
    marker, results = tmp_path / "marker", tmp_path / "results"
    make(checkpoint_path(results, 1), marker)
    t = trainer(image_folder, results, train_num_steps=2)
    with pytest.raises(UnsafeFileError, match="ckpt-00000001.pt"):
        t.train()
    assert not marker.exists()


@pytest.mark.parametrize("make", [pickle_file, hostile_class_file])
def test_sample_stage_refuses(tmp_path, monkeypatch, make):
    import stages.sample

    marker = tmp_path / "marker"
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    make(tmp_path / "models" / "linear" / "seed0" / "model.pt", marker, MODEL_FORMAT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages.sample", "linear", "0", "ddim-eta0.0-10"])
    with pytest.raises(UnsafeFileError, match="models/linear/seed0/model.pt"):
        stages.sample.main()
    assert not marker.exists() and not (tmp_path / "samples").exists()


def test_exported_model_is_an_inference_artifact(tmp_path):
    model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8)
    process = GaussianProcess(get_beta_schedule("cosine", 10))
    meta = model_metadata(model, process, "cosine", (1, 8, 8), params={"seed": 0})
    save_model(tmp_path / "model.pt", {**meta, "mlflow_run_id": "abc"}, model, 7)
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert raw["format"] == MODEL_FORMAT and raw["step"] == 7
    assert set(raw) == {"format", "model_class", "model_config", "diffusion", "image_shape", "params", "ema", "step"}
    rebuilt, p2, _ = load_model(tmp_path / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    assert torch.equal(p2.alpha_bar64, process.alpha_bar64)
    with pytest.raises(ValueError, match="holds no 'model' weights"):
        load_model(tmp_path / "model.pt", use_ema=False)


# --- checkpoints of other runs ----------------------------------------------------------------------------
def test_other_runs_checkpoints_are_kept(tmp_path, caplog):
    """Issue 13 point 2: stale checkpoints at steps 500 and 600 from other params, keep_checkpoints=2: a
    3-step run succeeds, keeps its own newest two, and leaves (then, once done, still leaves) the stale ones."""
    images = torch.from_numpy(load_dataset("digits").images[:64])
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (500, 600):
        torch.save({"format": CHECKPOINT_FORMAT, "step": step, "run_key": "other-params"}, checkpoint_path(folder, step))
    torch.manual_seed(0)
    model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8)
    s = TrainSettings(steps=3, batch_size=8, log_every=1, checkpoint_every=1, keep_checkpoints=2)
    with caplog.at_level(logging.INFO):
        r = train(model, GaussianProcess(get_beta_schedule("linear", 10)), images, s, seed=0, checkpoint_dir=folder,
                  run_key="mine", progress=False)
    assert r.step == 3 and r.resumed_from is None
    assert [st for st, _ in list_checkpoints(folder)] == [600, 500, 3, 2]
    assert "2 checkpoint(s)" in caplog.text and "ckpt-00000600.pt" in caplog.text
    assert load_checkpoint(checkpoint_path(folder, 3))["run_key"] == "mine"
    remove_run_checkpoints(folder, "mine")
    assert [st for st, _ in list_checkpoints(folder)] == [600, 500]
    remove_run_checkpoints(folder, "other-params")
    assert not folder.exists()


# --- the Trainer API --------------------------------------------------------------------------------------
def test_trainer_resumes_only_its_own_run(tmp_path, image_folder):
    results = tmp_path / "results"
    first = trainer(image_folder, results, train_num_steps=2, seed=0)
    first.train()
    assert first.step == 2
    other = trainer(image_folder, results, train_num_steps=4, seed=1)  # another seed: another run
    assert other.step == 0
    other.train()
    assert other.result.resumed_from is None
    assert len(list(results.glob("ckpt-00000002-*.pt"))) == 1  # the first run's step 2, moved aside, not overwritten
    same = trainer(image_folder, results, train_num_steps=4, seed=0)
    same.train()
    assert same.result.resumed_from == 2
    pinned = trainer(image_folder, results, train_num_steps=4, seed=0, run_key="explicit")
    pinned.train()
    assert pinned.result.resumed_from is None


def test_save_best_and_latest_only_is_rejected(image_folder, tmp_path):
    with pytest.raises(ValueError, match="save_best_and_latest_only=True is not supported"):
        trainer(image_folder, tmp_path / "r", save_best_and_latest_only=True)


def test_model_files_keep_the_class_name_they_had_before_the_folder_move(tmp_path):
    """The UNet moved from ddpm/unet.py to ddpm/nn/unet.py; files still name it ddpm.unet.Unet, so files exported
    before the move load, and a rerun exports the same bytes."""
    model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8)
    meta = model_metadata(model, GaussianProcess(get_beta_schedule("linear", 10)), "linear", (1, 8, 8), params={})
    assert meta["model_class"] == "ddpm.unet.Unet"
    save_model(tmp_path / "model.pt", meta, model, 1)
    assert type(load_model(tmp_path / "model.pt")[0]) is Unet
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.save({**raw, "model_class": "ddpm.nn.unet.Unet"}, tmp_path / "new_name.pt")  # the import path loads too
    assert type(load_model(tmp_path / "new_name.pt")[0]) is Unet
