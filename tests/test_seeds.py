"""Training seeds (contract 1): the `seeds` key, the per-seed paths, and one model per seed."""
from pathlib import Path

import pytest
import torch
import yaml

from ddpm.training.checkpoint import build, spec_from_params
from ddpm.app.config import ConfigError, Params, params_from_dict
from ddpm.app.paths import checkpoint_dir, model_dir, sample_path

ROOT = Path(__file__).resolve().parents[1]


def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_seeds_key_defaults_to_one_seed_and_is_validated():
    assert params_from_dict(raw()).seeds == (0,) == Params().seeds
    for bad, allowed in (([], "non-empty"), ([0, 0], "distinct"), ([-1], "[0, 4294967295]"), ("0", "list of int")):
        r = raw()
        r["seeds"] = bad
        with pytest.raises(ConfigError, match="seeds") as err:
            params_from_dict(r)
        assert allowed in str(err.value)


def test_paths_name_schedule_and_seed():
    assert model_dir("cosine", 3) == Path("models/cosine/seed3")
    assert checkpoint_dir("cosine", 3) == Path("checkpoints/cosine/seed3")
    assert sample_path("cosine", 3, "ddim", 0.0, 50) == Path("samples/cosine/seed3/ddim-eta0.0-50.npz")


def test_each_seed_builds_its_own_initial_model():
    p = params_from_dict(raw())

    def init(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _ = build(spec_from_params(p, "linear", (1, 8, 8), seed))
        return torch.cat([t.flatten() for t in model.state_dict().values()])

    assert torch.equal(init(0), init(0)) and not torch.equal(init(0), init(1))
