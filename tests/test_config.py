import copy
from pathlib import Path

import pytest
import yaml

from ddpm.app.config import ConfigError, Params, load_params, params_from_dict


@pytest.fixture
def raw(repo_root):
    return yaml.safe_load((repo_root / "params.yaml").read_text())


def problems(raw):
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    return err.value.problems


def test_shipped_params_load_and_match_the_defaults(repo_root):
    assert load_params(repo_root / "params.yaml") == Params()


def test_every_problem_is_reported_with_key_value_and_allowed(raw):
    bad = copy.deepcopy(raw)
    bad["timestep"] = 500  # typo of a top-level key
    bad["timesteps"] = 0
    bad["diffusion"]["schedules"] = ["linear", "cosinus"]
    bad["diffusion"]["objective"] = "pred_eps"
    bad["sample"]["samplers"] += ["euler-eta0.0-10", "dpmpp_2m-eta0.5-10", "ddim-eta1.5-10", "ddpm-eta0.0-0"]
    bad["sample"]["spacing"] = "uniform"
    bad["data"]["name"] = "imagenet"
    bad["train"]["batch_size"] = 0
    bad["train"]["lr"] = -1e-3
    del bad["train"]["ema_decay"]
    found = "\n".join(problems(bad))
    n = len(raw["sample"]["samplers"])
    for expected in (
        "timestep: unknown key; did you mean 'timesteps'?",
        "timesteps: got 0; allowed: an integer >= 1",
        "diffusion.schedules[1]: got 'cosinus'; allowed: linear, cosine, sigmoid, quadratic",
        "diffusion.objective: got 'pred_eps'; allowed: pred_noise, pred_x0, pred_v",
        f"sample.samplers[{n}].name: got 'euler'; allowed: ddpm, ddpm_large, ddim, dpmpp_2m, dpmpp_2m_sde",
        f"sample.samplers[{n + 1}].eta: got 0.5; allowed: 0.0 (dpmpp_2m takes no eta)",
        f"sample.samplers[{n + 2}].eta: got 1.5; allowed: a number in [0, 1]",
        f"sample.samplers[{n + 3}].steps: got 0; allowed: an integer in [1, timesteps=",
        "sample.spacing: got 'uniform'; allowed: linspace, trailing, leading",
        "data.name: got 'imagenet'; allowed: digits, mnist, fashion_mnist, cifar10, folder",
        "train.batch_size: got 0; allowed: an integer >= 1",
        "train.lr: got -0.001; allowed: a number > 0",
        "train.ema_decay: missing key",
    ):
        assert expected in found, (expected, found)


def test_steps_above_timesteps_and_image_sizes(raw):
    bad = copy.deepcopy(raw)
    bad["timesteps"] = 50
    bad["sample"]["samplers"] = ["ddim-eta0.0-10", "ddpm-eta0.0-100"]
    assert any("sample.samplers[1].steps: got 100; allowed: an integer in [1, timesteps=50]" in p for p in problems(bad))
    bad = copy.deepcopy(raw)
    bad["sample"]["samplers"].append("dpmpp_2m-eta0.0-1000")  # the solvers' linspace: S + 1 points repeat one
    assert any(p.startswith("sample.samplers[") and "steps=1000 with spacing 'linspace' gives repeated" in p
               for p in problems(bad))
    bad = copy.deepcopy(raw)
    bad["model"]["dim_mults"] = [1, 2, 4, 8, 16]
    assert any(p.startswith("data.image_size: got 'null (digits images are 8x8)'") and "multiple of 16" in p
               for p in problems(bad))
    bad = copy.deepcopy(raw)
    bad["data"].update(name="mnist", image_size=30)
    bad["model"]["dim_mults"] = [1, 2, 4]
    assert any("data.image_size: got 30; allowed: a multiple of 4" in p for p in problems(bad))


def test_types_and_yaml_errors(raw, tmp_path):
    bad = copy.deepcopy(raw)
    bad["train"]["steps"] = "many"
    bad["sample"]["samplers"] = ["ddim-eta0-10", {"name": "ddim", "eta": 0.0, "steps": 10}, "ddim-10", "ddim-eta0.0-10"]
    found = "\n".join(problems(bad))
    assert "train.steps: expected int, got 'many'" in found
    for i, given in ((0, "ddim-eta0-10"), (2, "ddim-10")):  # an int eta would name files differently from dvc.yaml
        assert f"sample.samplers[{i}]: got {given!r}; allowed: <rule>-eta<eta as a float>-<steps>, e.g. " in found
    assert "sample.samplers: got ['ddim-eta0.0-10', 'ddim-eta0.0-10']; allowed: distinct sample sets" in found
    f = tmp_path / "params.yaml"
    f.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_params(tmp_path / "nowhere.yaml")


def test_name_tuples_match_the_registries():
    """ddpm/app/names.py lets config validate without importing the maths modules; each tuple must be its registry's."""
    import ast

    from ddpm.data import datasets as data
    from ddpm.diffusion import process as diffusion
    from ddpm.app import names
    from ddpm.diffusion import samplers
    from ddpm.diffusion import schedules

    assert names.DATASETS == data.DATASETS
    assert names.OBJECTIVES == diffusion.OBJECTIVES
    assert names.STEP_RULES == samplers.STEP_RULES
    assert names.SCHEDULES == tuple(schedules.SCHEDULES)
    tree = ast.parse((Path(__file__).resolve().parents[1] / "ddpm" / "app" / "config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    maths = ("ddpm.data", "ddpm.diffusion.process", "ddpm.diffusion.samplers", "ddpm.diffusion.schedules")
    assert not {m for m in imported if m.startswith(maths)}, imported


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r.update(seed=-1), "seed: got -1; allowed: an integer in [0, 4294967295]"),
    (lambda r: r.update(seed=2**70), f"seed: got {2**70}; allowed: an integer of at most"),
    (lambda r: r.update(seed=2**40), f"seed: got {2**40}; allowed: an integer in [0, 4294967295]"),
    (lambda r: r["train"].update(weight_decay=float("inf")), "train.weight_decay: got inf; allowed: a finite number"),
    (lambda r: r["train"].update(lr=float("nan")), "train.lr: got nan; allowed: a finite number"),
    (lambda r: r["diffusion"].update(min_snr_gamma=float("inf")),
     "diffusion.min_snr_gamma: got inf; allowed: a finite number"),
    (lambda r: r.update(device="cudafoo"), "device: got 'cudafoo'; allowed: auto, cpu, cuda or cuda:N"),
    (lambda r: r.update(device="cuda:0;rm"), "device: got 'cuda:0;rm'; allowed: auto, cpu, cuda or cuda:N"),
    (lambda r: r.update(timesteps=10**12), "timesteps: got 1000000000000; allowed: an integer in [1, 100000]"),
    (lambda r: r["report"].update(grid_scale=10**6), "report.grid_scale: got 1000000; allowed: an integer in [1, 32]"),
    (lambda r: r["data"].update(image_size=10**6), "data.image_size: got 1000000; allowed: null or an integer in"),
    (lambda r: r["train"].update(fid_samples=10**9), "train.fid_samples: got 1000000000; allowed: an integer <="),
    (lambda r: r["model"].update(dim_mults=[1, 2, 1000]), "model.dim_mults: got [1, 2, 1000]; allowed: at most 8"),
    (lambda r: r["tracking"].update(experiment=""), "tracking.experiment: got ''; allowed: 1 to 256 printable"),
    (lambda r: r["sample"].update(n_samples=1), "sample.n_samples: got 1; allowed: an integer >= 2"),
])
def test_out_of_range_values_are_rejected_in_one_line(raw, edit, expected):
    bad = copy.deepcopy(raw)
    edit(bad)
    found = problems(bad)
    assert any(expected in p for p in found), (expected, found)
    assert all("\n" not in p for p in found)


def test_n_samples_may_exceed_the_holdout_set(raw):
    ok = copy.deepcopy(raw)
    ok["sample"]["n_samples"] = 2000  # > 449, the held-out set of digits: the floor is carried to n (stages/fid.py)
    assert params_from_dict(ok).sample.n_samples == 2000
    from ddpm.data.datasets import split_holdout
    from ddpm.app.config import DATASET_SIZES, DataConfig, holdout_size
    for frac in (0.25, 0.5, 0.001):
        assert holdout_size(DataConfig(holdout_fraction=frac)) == len(split_holdout(DATASET_SIZES["digits"], frac, 0)[1])
    assert holdout_size(DataConfig(name="folder")) is None
