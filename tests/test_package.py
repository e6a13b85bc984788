"""The wheel: built from this checkout, installed into a fresh virtual environment outside it, and used there.

`pip wheel --no-deps --no-build-isolation` (setuptools from [dev]: offline) on a copy of the package's files;
`python3 -m venv --system-site-packages` (torch and the other dependencies come from this interpreter, not
downloaded again) with the wheel installed `--no-deps --force-reinstall --no-index`. In the venv, from a folder
outside the checkout: `ddpm` is the installed copy, the kernels' C source and the shipped ruler travelled as
package data, the README's two snippets of the Python API run (tiny sizes), and the `ddpm` console script
answers `--help`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent('''
    import sys
    from pathlib import Path

    import ddpm
    from ddpm.metrics import features
    from ddpm.nn import kernels

    here = Path(ddpm.__file__).resolve()
    print("ddpm from", here)
    assert here.is_relative_to(Path(sys.prefix).resolve()), (here, sys.prefix)
    assert kernels.SOURCE.is_file(), kernels.SOURCE  # ddpm/nn/kernels.c, package data
    import shutil
    if any(shutil.which(c) for c in ("cc", "gcc", "clang")):  # built from the installed source
        assert kernels.library() is not None
        print("kernels built from", kernels.SOURCE)
    entry = features.SHIPPED_RULERS["digits"]
    ruler = features.load_ruler(features.RULERS_DIR / entry["file"], entry["sha256"])  # sha256-checked on load
    print("ruler", entry["file"], "loads:", type(ruler).__name__)

    # the README's first snippet, tiny sizes
    import torch
    from ddpm import Unet, GaussianDiffusion, Trainer

    model = Unet(dim=8, dim_mults=(1, 2, 4, 8))
    diffusion = GaussianDiffusion(model, image_size=16, timesteps=1000, sampling_timesteps=5)
    loss = diffusion(torch.rand(2, 3, 16, 16))
    loss.backward()
    images = diffusion.sample(batch_size=2)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    print("snippet 1: loss %.4f, samples %s" % (loss.item(), tuple(images.shape)))

    # the README's second snippet, tiny sizes (a random InceptionV3 state dict in $TORCH_HOME stands in)
    trainer = Trainer(diffusion, sys.argv[1], train_batch_size=4, train_lr=8e-5, train_num_steps=2,
                      gradient_accumulate_every=2, ema_decay=0.995, amp=True, calculate_fid=True,
                      results_folder=sys.argv[2], save_and_sample_every=2, num_samples=4, num_fid_samples=6,
                      progress=False)
    trainer.train()
    assert sorted(p.name for p in Path(sys.argv[2]).glob("ckpt-*.pt")) == ["ckpt-00000002.pt"]
    print("snippet 2: trained %d steps, FID %.3f" % (trainer.result.step, trainer.fid_history[-1]["fid"]))
''')


def _run(cmd, cwd, env=None, timeout=600) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(python, bin folder, work folder) of a fresh venv holding the wheel built from this checkout."""
    pytest.importorskip("setuptools")  # [dev]: the build backend, without downloading it
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    shutil.copytree(ROOT / "ddpm", src / "ddpm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          str(src)], tmp)
    wheel, = (tmp / "dist").glob("ddpm-*.whl")
    env_dir = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], tmp)
    python = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--force-reinstall",
          "--no-index", str(wheel)], tmp)
    return python, env_dir / "bin", tmp


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "TORCH_HOME": str(tmp / "torch_home"), "OMP_NUM_THREADS": "1", "DDPM_KERNEL_CACHE":
            str(tmp / "kernels")}


def test_wheel_installs_and_the_readme_snippets_run_outside_the_checkout(venv, png_folder):
    import torch

    from ddpm.metrics.features import FID_WEIGHTS_FILENAME, fid_inception_v3_architecture

    python, _, tmp = venv
    weights = tmp / "torch_home" / "hub" / "checkpoints"
    weights.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(fid_inception_v3_architecture().state_dict(), weights / FID_WEIGHTS_FILENAME)
    outside = tmp / "elsewhere"
    outside.mkdir()
    out = _run([str(python), "-c", CHECK, str(png_folder(6, (16, 16, 3))), str(tmp / "results")], outside,
               _env(tmp))
    print(out)
    assert f"ddpm from {tmp / 'venv'}" in out and "snippet 2: trained 2 steps" in out


def test_console_script(venv):
    _, bin_dir, tmp = venv
    out = _run([str(bin_dir / "ddpm"), "--help"], tmp, _env(tmp))
    assert all(cmd in out for cmd in ("table", "import-pending", "serve"))
    assert "usage: ddpm table" in _run([str(bin_dir / "ddpm"), "table", "--help"], tmp, _env(tmp))
