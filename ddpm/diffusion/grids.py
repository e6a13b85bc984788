"""Timestep grids of the sampling loop: pure arithmetic on (T, S, spacing), no torch.

Its own small module so that ``ddpm/app/config.py`` can check that a sample set's grid can be built without
importing the sampling maths (which would tie every stage's dvc.yaml deps to ``ddpm/diffusion/samplers.py``).
"""
from __future__ import annotations

import numpy as np

from ddpm.app.names import SPACINGS


def timestep_grid(num_timesteps: int, steps: int, spacing: str = "linspace", solver: bool = False) -> list[int]:
    """Descending timesteps [S] of diffusers' ``timestep_spacing`` (Lin et al. 2024, Table 2).

    ``solver=False``: DDIMScheduler's grids (``linspace`` ends at t = 0). ``solver=True``:
    DPMSolverMultistepScheduler's, whose ``linspace`` and ``leading`` take S + 1 points and drop t = 0
    (the solver's last step goes to alpha_bar = 1). ``trailing`` is the same in both. S = 1 gives [T-1].
    """
    T, S = num_timesteps, steps
    if not isinstance(S, int) or isinstance(S, bool) or not 1 <= S <= T:
        raise ValueError(f"sampling steps must be an integer in [1, timesteps={T}], got {S!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; allowed: {', '.join(SPACINGS)}")
    n = S + 1 if solver else S
    if spacing == "trailing":
        grid = np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1
    elif S == 1 and not solver:
        grid = np.array([T - 1])  # one step starts from pure noise (diffusers' linspace would give t = 0)
    elif spacing == "linspace":
        grid = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    else:  # leading, steps_offset = 0
        grid = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64)
    grid = [int(t) for t in grid[:S]]
    if len(grid) != S or any(a <= b for a, b in zip(grid, grid[1:])) or grid[-1] < 0:
        raise ValueError(f"sampling steps={S} with spacing {spacing!r} gives repeated timesteps at "
                         f"timesteps={T}; allowed: fewer steps, or spacing 'trailing'")
    return grid
