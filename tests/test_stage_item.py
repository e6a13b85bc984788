"""stages/item.py spells every foreach/matrix stage name exactly as DVC does, and maps it to validated values."""
import pytest

from ci_tools import need
from ddpm.app.config import ConfigError, load_params
from stages.item import GRIDS, items, resolve


def test_item_names_match_dvc_stage_names(repo_root):
    need("dvc")
    from dvc.repo import Repo

    repo = Repo(str(repo_root))
    try:
        names = {s.addressing for s in repo.index.stages}
    finally:
        repo.close()
    p = load_params(repo_root / "params.yaml")
    for stage in GRIDS:
        assert set(items(stage, p)) == {n for n in names if n.startswith(stage + "@")}, stage


def test_resolve_gives_the_stage_module_and_its_validated_arguments(repo_root):
    p = load_params(repo_root / "params.yaml")
    s = p.sample.samplers[1]
    assert resolve(f"sample@cosine-0-{s.key}", p) == ("stages.sample", ["cosine", "0", s.key])
    assert resolve("dvc.yaml:train@linear-0", p) == ("stages.train", ["linear", "0"])
    for bad in ("train@cosine;touch x", "train@linear", "sample@cosine-0-sampler9-10", "prepare", "train@"):
        with pytest.raises(ConfigError, match="stage: got"):
            resolve(bad, p)
