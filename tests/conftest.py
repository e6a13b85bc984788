import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # on sys.path through pyproject.toml's [tool.pytest.ini_options]
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def png_folder(tmp_path):
    """``png_folder(n, shape)``: ``tmp_path/images`` with n random uint8 PNGs of ``shape`` (H, W) or (H, W, 3)."""
    def make(n: int, shape: tuple[int, ...]) -> Path:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        folder = tmp_path / "images"
        folder.mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i}.png")
        return folder
    return make
