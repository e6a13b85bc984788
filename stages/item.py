"""Runs one item of a `foreach`/`matrix` stage, chosen by the stage's name, not by the shell.

DVC runs a stage's `cmd` through a shell, and `${item.x}` puts a params.yaml string into that command
line as it is: a schedule named `cosine;touch x;true` ran `touch x` before any Python could reject it.
(DVC shell-quotes the values, but not the keys, of a whole mapping `${item}`: a sampler written
`{name: ddpm, "eta 0;touch x;echo": 0.0}` still reaches the shell.) So these stages interpolate
nothing into `cmd`: it is `python -m stages.item`. DVC passes the stage's name in $DVC_STAGE, e.g.
`sample@cosine-0-ddim-eta0.0-10`; this module validates params.yaml, spells every stage name the way DVC
3 does from the validated values (a scalar as written, a list or mapping as `<key><index>`, joined by
`-`), finds $DVC_STAGE among them, and calls the stage with those values.

Adding a dimension to a stage's grid (say `seed: ${seeds}`) means one line in GRIDS, in the order of
dvc.yaml's matrix keys, and the stage's arguments in ARGS. By hand: `python -m stages.item train@linear`.
"""
from __future__ import annotations

import itertools
import os
import runpy
import sys
from typing import Any, Callable

from ddpm.app.config import ConfigError, Params, load_params

# stage -> its grid, [(matrix key, values)] in dvc.yaml's order
GRIDS: dict[str, Callable[[Params], list[tuple[str, tuple]]]] = {
    "train": lambda p: [("schedule", p.diffusion.schedules), ("seed", p.seeds)],
    "sample": lambda p: [("schedule", p.diffusion.schedules), ("seed", p.seeds),
                         ("sampler", tuple(s.key for s in p.sample.samplers))],
    "nll": lambda p: [("schedule", p.diffusion.schedules), ("seed", p.seeds)],
}
# stage -> its module's command-line arguments for one item
ARGS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "train": lambda it: [it["schedule"], str(it["seed"])],
    "sample": lambda it: [it["schedule"], str(it["seed"]), it["sampler"]],
    "nll": lambda it: [it["schedule"], str(it["seed"])],
}


def _fragment(key: str, index: int, value: Any) -> str:
    """How DVC 3 names one coordinate (dvc/parsing/__init__.py, MatrixDefinition.normalized_iterable)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)) or value is None:
        return str(value)
    return f"{key}{index}"  # lists and mappings (a sampler) are named by their index


def items(stage: str, p: Params) -> dict[str, dict[str, Any]]:
    """``{"sample@cosine-0-ddim-eta0.0-10": {"schedule": "cosine", "sampler": ..., "steps": 10}, ...}``."""
    grid = GRIDS[stage](p)
    out = {}
    for combo in itertools.product(*[list(enumerate(values)) for _, values in grid]):
        name = "-".join(_fragment(key, i, v) for (key, _), (i, v) in zip(grid, combo))
        out[f"{stage}@{name}"] = {key: v for (key, _), (_, v) in zip(grid, combo)}
    return out


def resolve(name: str, p: Params) -> tuple[str, list[str]]:
    """``"sample@cosine-0-ddim-eta0.0-10"`` -> (``"stages.sample"``, its validated arguments)."""
    name = name.rsplit("dvc.yaml:", 1)[-1]  # `sub/dvc.yaml:train@x` when run from elsewhere
    stage = name.split("@", 1)[0]
    if stage not in GRIDS:
        raise ConfigError([f"stage: got {name!r}; allowed: an item of {', '.join(GRIDS)}"], "dvc.yaml")
    found = items(stage, p)
    if name not in found:
        raise ConfigError([f"stage: got {name!r}; allowed: {', '.join(found)} (from params.yaml)"], "dvc.yaml")
    return f"stages.{stage}", ARGS[stage](found[name])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else os.environ.get("DVC_STAGE")
    if not name:
        raise SystemExit("usage: python -m stages.item STAGE@ITEM (DVC sets $DVC_STAGE)")
    module, args = resolve(name, load_params())
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
