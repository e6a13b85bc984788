import copy

import pytest
import yaml

from ddpm.config import ConfigError, Params, load_params, params_from_dict


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
