"""Hostile and broken inputs whose size or content is the problem (issue 28, rows 4, 5, 6, 7, 9 and 10).

Each test performs the attack or fault on a tiny constructed file, then checks the fixed behaviour: one error
line naming the file or key, what it holds and what is allowed, raised before anything large is built (the
builders and the allocating functions are replaced by tripwires that fail the test if reached).
"""
import copy
import logging
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddpm import limits
from ddpm.training.checkpoint import (checkpoint_path, latest_valid_checkpoint, load_checkpoint, load_model, payload_sha256,
                                      save_checkpoint, save_model)
from ddpm.app.config import (MAX_SAMPLE_SETS, MAX_YAML_DEPTH, MAX_YAML_NODES, ConfigError, check_yaml, load_params,
                             params_from_dict)
from ddpm.data.datasets import load_dataset
from ddpm.diffusion.process import GaussianProcess
from ddpm.metrics.features import ClassifierFeaturizer, load_featurizer, save_featurizer
from ddpm.app.paths import SampleSetError, load_arrays, load_sample_set, sample_path
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.training.checkpoint import model_metadata
from ddpm.training.loop import TrainSettings, train
from ddpm.nn.unet import Unet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(autouse=True)
def fixed_budget(monkeypatch):
    """A fixed 8 GB budget and the default decoded cap, whatever this machine has."""
    monkeypatch.setenv(limits.BUDGET_ENV, "8")
    monkeypatch.delenv(limits.DECODED_ENV, raising=False)


def tripwire(*_a, **_k):
    raise AssertionError("reached: the limit should have refused the input before this")


def one_problem(fn, *args):
    with pytest.raises(ConfigError) as err:
        fn(*args)
    assert all("\n" not in p for p in err.value.problems)
    return "\n".join(err.value.problems)


# --- row 4: a YAML bomb and deep nesting in params.yaml ---------------------------------------------------
def billion_laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nseed: *l{levels - 1}\n"  # 9**9 = 387 million strings once expanded


def test_billion_laughs_is_refused_before_expansion(tmp_path, monkeypatch):
    f = tmp_path / "params.yaml"
    f.write_text(billion_laughs())
    assert f.stat().st_size < 5000
    monkeypatch.setattr("ddpm.app.config.yaml.safe_load", tripwire)  # nothing is constructed, so nothing expands
    msg = one_problem(load_params, f)
    assert f"more than {MAX_YAML_NODES} nodes, each alias (*name) counted as the nodes of its anchor" in msg
    assert "lol" not in msg
    assert len(str(msg)) < 400


def test_long_flat_lists_are_refused_by_the_node_count(raw):
    text = (ROOT / "params.yaml").read_text().replace("seeds: [0] ", "seeds: [" + ", ".join(["0"] * 30_000) + "] ")
    with pytest.raises(ConfigError, match=rf"seeds\[{MAX_YAML_NODES - 1}\]: the file holds more than"):
        check_yaml(text)


def test_small_anchors_still_load(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("  lr: 0.01\n", "  lr: &lr 0.01\n", 1)
    text = text.replace("  lr: 0.001 ", "  lr: *lr ", 1)
    f = tmp_path / "params.yaml"
    f.write_text(text)
    p = load_params(f)
    assert p.featurizer.lr == p.train.lr == 0.01


@pytest.mark.parametrize("nest", ["flow", "block"])
def test_deep_nesting_names_the_key_and_the_limit(tmp_path, nest):
    text = (ROOT / "params.yaml").read_text()
    if nest == "flow":  # 100,000 levels: the composer's recursion would overflow
        text = text.replace("seeds: [0] ", "seeds: " + "[" * 100_000 + "]" * 100_000 + " ")
        where = "seeds[0][0]"
    else:
        text = text.replace("  name: digits ", "  name:\n" + "".join(
            "  " * (i + 2) + f"k{i}:\n" for i in range(40)) + "  " * 42 + "v: 1\n  x: digits ")
        where = "data.name.k0.k1"
    f = tmp_path / "params.yaml"
    f.write_text(text)
    msg = one_problem(load_params, f)
    assert msg.startswith(where) and f"nested more than {MAX_YAML_DEPTH} levels deep" in msg


def test_oversized_file_and_huge_integers(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text((ROOT / "params.yaml").read_text() + "#" * (2 << 20) + "\n")
    assert "allowed: at most 1048576" in one_problem(load_params, f)
    f.write_text((ROOT / "params.yaml").read_text().replace("seed: 0 ", "seed: " + "9" * 5000 + " "))
    assert "not valid YAML" in one_problem(load_params, f)  # Python refuses ints of > 4300 digits: one line
    bad = yaml.safe_load((ROOT / "params.yaml").read_text())
    bad["tracking"]["experiment"] = ["x" * 1000] * 100_000  # a huge value is shown bounded
    msg = one_problem(params_from_dict, bad)
    assert "tracking.experiment: expected str" in msg and len(msg) < 400


# --- row 9: limits on lists and the grid -----------------------------------------------------------------
def test_grid_and_list_limits(raw):
    bad = copy.deepcopy(raw)
    bad["seeds"] = list(range(300))
    bad["sample"]["samplers"] = [f"ddim-eta0.0-{k}" for k in range(1, 41)]
    msg = one_problem(params_from_dict, bad)
    assert "seeds: got 'a list of 300'; allowed: at most 64 training seeds" in msg
    assert (f"seeds x diffusion.schedules x sample.samplers: got '300 x 3 x 40 = 36000 sample stages'; allowed: at "
            f"most {MAX_SAMPLE_SETS}") in msg
    bad["seeds"] = list(range(10))  # each list within its cap, the grid not: 10 x 3 x 40 = 1200
    msg = one_problem(params_from_dict, bad)
    assert "= 1200 sample stages" in msg and "seeds:" not in msg.replace("seeds x", "")
    bad["sample"]["samplers"] = [f"ddim-eta0.0-{k}" for k in range(1, 66)]
    assert "sample.samplers: got 'a list of 65'; allowed: at most 64" in one_problem(params_from_dict, bad)


# --- row 6: params whose size is the problem --------------------------------------------------------------
def test_huge_model_params_are_refused_by_the_budget(raw):
    bad = copy.deepcopy(raw)
    bad["model"].update(dim=1024, dim_mults=[1, 2, 4, 8, 16, 16, 16, 16])
    bad["data"]["image_size"] = 128
    msg = one_problem(params_from_dict, bad)
    assert "model.dim=1024, model.dim_mults=[1, 2, 4, 8, 16, 16, 16, 16] (126.3 G parameters)" in msg
    assert "allowed: at most the memory budget of 8 GiB (DDPM_MEMORY_BUDGET_GB=8)" in msg


def test_large_images_at_a_large_batch_are_refused(raw, monkeypatch):
    bad = copy.deepcopy(raw)
    bad["data"]["image_size"] = 1024
    bad["train"]["batch_size"] = 400
    msg = one_problem(params_from_dict, bad)
    assert "data.image_size=1024: training with train.batch_size=400" in msg and "GiB; allowed: at most" in msg
    monkeypatch.setenv(limits.BUDGET_ENV, "0.001")  # the setting decides: a 1 MB budget refuses the default params
    assert f"training with train.batch_size={raw['train']['batch_size']}" in one_problem(params_from_dict, raw)
    monkeypatch.setenv(limits.BUDGET_ENV, "lots")
    with pytest.raises(limits.LimitError, match="DDPM_MEMORY_BUDGET_GB: got 'lots'; allowed: a number of GB"):
        params_from_dict(raw)


def test_budget_defaults_to_a_fraction_of_the_machine(monkeypatch):
    monkeypatch.delenv(limits.BUDGET_ENV)
    total = limits.machine_memory()
    budget, how = limits.memory_budget()
    assert total and budget == int(limits.BUDGET_FRACTION * total) and "DDPM_MEMORY_BUDGET_GB raises it" in how


@pytest.mark.parametrize("config", [
    dict(dim=16, dim_mults=[1, 2], channels=1, attn_heads=4, attn_dim_head=32),
    dict(dim=8, init_dim=12, out_dim=2, dim_mults=[1, 3, 2], channels=3, attn_heads=2, attn_dim_head=16,
         full_attn=[True, False, True]),
])
def test_parameter_count_is_estimated_exactly_from_the_description(config):
    est = limits.unet_size(config, (8, 8))
    assert est["params"] == sum(p.numel() for p in Unet(**config).parameters())
    assert limits.training_bytes(est, 128) > limits.sampling_bytes(est, 128) > 4 * est["params"]


def npz_with_forged_header(path, key="images", claim=(100_000, 100_000)):
    """A valid zip whose .npy header claims a 10 GB uint8 array while the member holds 64 bytes."""
    header = {"descr": "|u1", "fortran_order": False, "shape": claim}
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "a" if path.exists() else "w") as zf:
        zf.writestr(f"{key}.npy", buf.getvalue() + bytes(64))
    return path


def test_npz_is_bounded_from_its_headers_and_only_used_keys_are_read(tmp_path, monkeypatch):
    forged = npz_with_forged_header(tmp_path / "forged.npz")
    monkeypatch.setattr("ddpm.limits.np.load", tripwire)
    with pytest.raises(limits.LimitError, match=r"forged.npz: array 'images' claims shape \[100000, 100000\] of uint8 "
                                                r"\(9.31 GiB\) but its member holds 64 bytes of data"):
        load_arrays(forged)
    monkeypatch.undo()
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, images=np.zeros((2, 1, 8, 8), np.uint8))
    npz_with_forged_header(mixed, key="junk")
    assert load_arrays(mixed, ("images",))["images"].shape == (2, 1, 8, 8)  # the unused key is never read
    with pytest.raises(limits.LimitError, match="'junk' claims shape"):
        load_arrays(mixed)
    with pytest.raises(limits.LimitError, match="mixed.npz: no array 'labels'; found: images, junk"):
        load_arrays(mixed, ("labels",))
    # a deflated file that expands a thousand-fold: refused from the zip directory before inflating
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, images=np.zeros((20, 1, 1024, 1024), np.uint8))
    assert bomb.stat().st_size < 100_000
    monkeypatch.setenv(limits.DECODED_ENV, "0.01")
    with pytest.raises(limits.LimitError, match=r"bomb.npz: arrays images decompress to 20 MiB; allowed: at most "
                                                r"10.2 MiB \(DDPM_MAX_DECODED_GB=0.01\)"):
        load_arrays(bomb)


def test_image_folder_total_is_capped(png_folder, monkeypatch):
    folder = png_folder(4, (64, 64, 3))
    monkeypatch.setenv(limits.DECODED_ENV, "0.00004")  # 42 KB < 4 x 3 x 64 x 64 = 48 KB
    monkeypatch.setattr("ddpm.data.folder._decode_one", tripwire)  # headers only: no image is decoded
    with pytest.raises(limits.LimitError, match=r"dataset 'folder': .*images holds 4 images of 3x64x64 that decode "
                                                r"to 49,152 bytes; allowed: at most 42,949 bytes"):
        load_dataset("folder", root=folder)
    monkeypatch.undo()
    monkeypatch.setenv(limits.BUDGET_ENV, "8")
    assert load_dataset("folder", root=folder).images.shape == (4, 3, 64, 64)


# --- row 5: small files describing huge things ------------------------------------------------------------
@pytest.fixture
def model_file(tmp_path):
    model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8)
    process = GaussianProcess(get_beta_schedule("linear", 10))
    path = tmp_path / "model.pt"
    save_model(path, model_metadata(model, process, "linear", (1, 8, 8)), model, step=1)
    return path


def rewrite(path, edit):
    obj = torch.load(path, weights_only=True)
    edit(obj)
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("edit, expected", [
    (lambda o: o["model_config"].update(dim=4096), "model_config.dim: got 4096; allowed: an integer in [1, 1024]"),
    (lambda o: o["diffusion"].update(timesteps=10**10),
     "diffusion.timesteps: got 10000000000; allowed: an integer in [1, 100000]"),
    (lambda o: o["diffusion"].update(timesteps=1e10), "diffusion.timesteps: got 10000000000.0; allowed: an integer"),
    (lambda o: o["diffusion"].pop("schedule"), "diffusion.schedule: missing key"),
    (lambda o: o.update(diffusion="linear"), "diffusion: got 'linear'; allowed: a mapping"),
    (lambda o: o["model_config"].update(dim_mults=[1, 2] * 50), "model_config.dim_mults: got [1, 2, 1, 2"),
    (lambda o: o.update(image_shape=[1, 10**6, 10**6]), "image_shape: got [1, 1000000, 1000000]; allowed"),
    (lambda o: o["model_config"].update(dim=1024, dim_mults=[1, 2, 4, 8, 16, 16, 16, 16], full_attn=None),
     "126.1 G parameters) at image_shape=[1, 8, 8] needs about 470 GiB; allowed: at most the memory budget"),
])
def test_model_descriptions_are_checked_before_building(model_file, monkeypatch, edit, expected):
    rewrite(model_file, edit)
    monkeypatch.setattr(Unet, "__init__", tripwire)
    monkeypatch.setattr("ddpm.training.checkpoint.get_beta_schedule", tripwire)
    with pytest.raises(ValueError) as err:
        load_model(model_file)
    msg = str(err.value)
    assert msg.startswith(repr(str(model_file))) and expected in msg and "\n" not in msg, msg


def test_api_refuses_a_huge_schedule_before_allocating(monkeypatch):
    from ddpm import GaussianDiffusion

    model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8)
    monkeypatch.setattr("ddpm.training.checkpoint.get_beta_schedule", tripwire)
    with pytest.raises(ValueError, match=r"GaussianDiffusion: diffusion.timesteps: got 10000000000; allowed: an "
                                         r"integer in \[1, 100000\]"):
        GaussianDiffusion(model, image_size=8, timesteps=10**10)


def test_trainer_refuses_a_batch_over_the_budget_before_reading_images(tmp_path, monkeypatch):
    from ddpm import GaussianDiffusion, Trainer

    model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8)
    diffusion = GaussianDiffusion(model, image_size=64, timesteps=10)
    monkeypatch.setattr("ddpm.api.load_dataset", tripwire)
    monkeypatch.setenv(limits.BUDGET_ENV, "0.1")
    with pytest.raises(ValueError, match=r"Trainer: the Unet \(.* parameters\) at image_size=\[64, 64\] training with "
                                         r"train_batch_size=512 needs about .* GiB; allowed: at most the memory budget "
                                         r"of 102 MiB \(DDPM_MEMORY_BUDGET_GB=0.1\)"):
        Trainer(diffusion, tmp_path / "images", train_batch_size=512, calculate_fid=False)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.update(width=30000), "config.width: got 30000; allowed: an integer in [1, 1024]"),
    (lambda c: c.pop("feature_dim"), "config.feature_dim: got '<missing>'; allowed: an integer in [2, 4096]"),
    (lambda c: c.update(width=1024, num_classes=100_000),
     "config (width=1024: 66.59 M parameters) needs about 0.248 GiB; allowed: at most the memory budget of 102 MiB"),
])
def test_featurizer_descriptions_are_checked_before_building(tmp_path, monkeypatch, edit, expected):
    path = tmp_path / "featurizer.pt"
    save_featurizer(path, ClassifierFeaturizer(feature_dim=4, width=4))
    rewrite(path, lambda o: edit(o["config"]))
    assert path.stat().st_size < 20_000
    monkeypatch.setenv(limits.BUDGET_ENV, "0.1")
    monkeypatch.setattr(ClassifierFeaturizer, "__init__", tripwire)
    with pytest.raises(ValueError) as err:
        load_featurizer(path)
    assert str(err.value).startswith(f"featurizer checkpoint '{path}': ") and expected in str(err.value), err.value


# --- row 7: checkpoints are verified ----------------------------------------------------------------------
def run_training(folder, steps):
    images = torch.from_numpy(load_dataset("digits").images[:32])
    torch.manual_seed(0)
    model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8)
    s = TrainSettings(steps=steps, batch_size=8, log_every=1, checkpoint_every=1, keep_checkpoints=2)
    return train(model, GaussianProcess(get_beta_schedule("linear", 10)), images, s, seed=0, checkpoint_dir=folder,
                 run_key="mine", progress=False)


def flip_a_weight_bit(path):
    """Flip one bit in the middle of the largest tensor stored in a torch zip file (stored, not deflated)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    run_training(folder, 2)  # keep_checkpoints=2 keeps steps 1 and 2 (a finished train() leaves them)
    return {step: checkpoint_path(folder, step).read_bytes() for step in (1, 2)}


@pytest.fixture
def ckpts(tmp_path, two_checkpoints):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step, data in two_checkpoints.items():
        checkpoint_path(folder, step).write_bytes(data)
    return folder


def test_a_flipped_bit_is_refused_and_resume_falls_back(ckpts, caplog):
    newest = checkpoint_path(ckpts, 2)
    assert load_checkpoint(newest)["step"] == 2
    flip_a_weight_bit(newest)
    assert torch.load(newest, weights_only=True)["step"] == 2  # torch itself loads it without a word
    with pytest.raises(ValueError, match="ckpt-00000002.pt' fails its sha256 checksum"):
        load_checkpoint(newest)
    with caplog.at_level(logging.WARNING):
        ckpt = latest_valid_checkpoint(ckpts, "mine")
    assert ckpt["step"] == 1 and "ckpt-00000002.pt' fails its sha256 checksum" in caplog.text
    assert "falling back to the previous checkpoint" in caplog.text
    r = run_training(ckpts, 3)  # resume goes on from step 1 and rewrites step 2
    assert r.resumed_from == 1 and r.step == 3 and load_checkpoint(checkpoint_path(ckpts, 2))["step"] == 2


def test_a_missing_field_is_refused_and_resume_falls_back(ckpts, caplog):
    newest = checkpoint_path(ckpts, 2)
    obj = torch.load(newest, weights_only=True)
    del obj["optimizer"], obj["sha256"]
    save_checkpoint(newest, obj)  # sealed: the checksum passes, the field is still missing
    with caplog.at_level(logging.WARNING):
        ckpt = latest_valid_checkpoint(ckpts, "mine")
    assert ckpt["step"] == 1
    assert "ckpt-00000002.pt' lacks the field 'optimizer'; allowed: a checkpoint with step, run_key" in caplog.text
    assert run_training(ckpts, 2).resumed_from == 1


def test_old_checkpoints_without_a_checksum_load_with_a_warning(ckpts, caplog):
    newest = checkpoint_path(ckpts, 2)
    obj = torch.load(newest, weights_only=True)
    stored = obj.pop("sha256")
    assert stored == payload_sha256(obj)  # the checksum is of the content: a re-save keeps it
    torch.save(obj, newest)
    with caplog.at_level(logging.WARNING):
        assert latest_valid_checkpoint(ckpts, "mine")["step"] == 2
    assert "ckpt-00000002.pt has no checksum" in caplog.text and "loading it unverified" in caplog.text


# --- row 10: sample sets of the wrong shape or type -------------------------------------------------------
@pytest.mark.parametrize("images, found", [
    (np.zeros((4, 1, 16, 16), np.uint8), "images are uint8 of shape [4, 1, 16, 16]"),
    (np.full((4, 1, 8, 8), np.nan, np.float32), "images are float32 of shape [4, 1, 8, 8]"),
    (np.zeros((4, 8, 8), np.uint8), "images are uint8 of shape [4, 8, 8]"),
])
def test_sample_sets_are_checked_at_load(tmp_path, monkeypatch, images, found):
    path = tmp_path / "set.npz"
    np.savez(path, images=images)
    monkeypatch.setattr("ddpm.limits.np.load", tripwire)  # refused from the header: no pixel read
    with pytest.raises(SampleSetError) as err:
        load_sample_set(path, (1, 8, 8))
    assert str(err.value) == f"{path}: {found}; allowed: uint8 (0..255) of shape [n, 1, 8, 8] (the prepared data's shape)"


def test_fid_stage_refuses_samples_of_another_shape(tmp_path, monkeypatch):
    """The fid stage checked only the count: 16x16 samples against 8x8 data gave an FID (86.3)."""
    import json

    from ddpm.app.config import SamplerConfig
    from stages import fid

    monkeypatch.chdir(tmp_path)
    Path("data/prepared").mkdir(parents=True)
    Path("data/prepared/meta.json").write_text(json.dumps({"image_shape": [1, 8, 8]}))
    s = SamplerConfig("ddim", 0.0, 10)
    path = sample_path("linear", 0, s.name, s.eta, s.steps)
    path.parent.mkdir(parents=True)
    np.savez(path, images=np.zeros((4, 1, 16, 16), np.uint8))
    with pytest.raises(SampleSetError, match=r"images are uint8 of shape \[4, 1, 16, 16\]; allowed: uint8 \(0..255\) "
                                             r"of shape \[n, 1, 8, 8\]"):
        fid._images("linear", 0, s, 4)
    np.savez(path, images=np.zeros((4, 1, 8, 8), np.uint8))
    assert fid._images("linear", 0, s, 4).shape == (4, 1, 8, 8)
