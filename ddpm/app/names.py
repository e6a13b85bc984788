"""The names the configuration accepts, and the one spelling of a sampler's label.

A tiny module without imports, so that ``ddpm/app/config.py`` can validate ``params.yaml`` without importing
the maths modules (data, diffusion, samplers, schedules): an edit to those then reruns only the stages
that compute with them. Each registry in those modules is checked against its tuple here by
``tests/test_config.py``.
"""
from __future__ import annotations

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "folder")  # ddpm.data.datasets.DATASETS
OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")  # ddpm.diffusion.process
VARIANCES = ("fixed_small", "fixed_large", "learned_range")  # ddpm.diffusion.process (Nichol & Dhariwal Sec. 3.1)
STEP_RULES = ("ddpm", "ddpm_large", "ddim", "dpmpp_2m", "dpmpp_2m_sde")  # ddpm.diffusion.samplers.StepRule
MULTISTEP_RULES = ("dpmpp_2m", "dpmpp_2m_sde")  # rules that keep history (DPM-Solver++ multistep)
SPACINGS = ("linspace", "trailing", "leading")  # diffusers' timestep_spacing (ddpm.diffusion.grids)
SCHEDULES = ("linear", "cosine", "sigmoid", "quadratic")  # keys of ddpm.diffusion.schedules.SCHEDULES


def sampler_label(name: str, eta: float) -> str:
    """The label of a step rule everywhere (logs, MLflow run names, report, metric keys, figure names):
    ``ddpm``, ``ddpm_large``, ``ddim-eta0``, ``ddim-eta0.5``; eta shows only where the rule uses it."""
    return f"{name}-eta{float(eta):g}" if name == "ddim" else str(name)


def set_label(label: str, steps: int) -> str:
    """The name of a sample set in comparisons (``reports/comparisons.csv``, ``reports/features.npz``):
    ``<sampler label>-<steps>``, e.g. ``ddim-eta0-10``."""
    return f"{label}-{int(steps)}"
