"""The `fast` switch: what it turns on per device, torch.compile's clean fallback, and that the compiled
training loss and the compiled sampler compute what the eager ones do."""
import logging

import numpy as np
import pytest
import torch

from ci_tools import need
from ddpm.diffusion.process import GaussianProcess
from ddpm.diffusion.samplers import StepRule, sample_images
from ddpm.diffusion.schedules import get_beta_schedule
from ddpm.nn.speed import CompiledOrEager, Speed, sampling_model, use_project_compile_cache
from ddpm.training.loop import TrainSettings, train
from ddpm.nn.unet import Unet


def test_switch_per_device():
    assert Speed.resolve(False, "cpu") == Speed(False, False, False, None)
    assert Speed.resolve(False, "cuda") == Speed(False, False, False, None)
    assert Speed.resolve(True, "cpu") == Speed(True, True, False, None)  # eager: it beats inductor on a CPU
    if torch.cuda.is_available():
        assert Speed.resolve(True, "cuda").compile
        assert Speed.resolve(True, "cuda").autocast_dtype in (torch.bfloat16, torch.float16)


def test_sampling_model_compiles_only_when_asked():
    model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8)
    net = sampling_model(model, Speed.resolve(True, "cpu"))
    assert net is model and model.init_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert sampling_model(model, Speed()) is model


def test_compile_failure_falls_back_to_eager_with_one_warning(caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    calls = []

    def fn(x):
        calls.append(1)
        return x * 2 + 1

    f = CompiledOrEager(fn, "the test function", backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="ddpm.nn.speed"):
        y1 = f(torch.ones(3))
        y2 = f(torch.ones(3))
    assert torch.equal(y1, torch.full((3,), 3.0)) and torch.equal(y2, y1)
    assert f.failed
    warnings = [r for r in caplog.records if "torch.compile of the test function failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()


def test_genuine_errors_are_not_swallowed():
    f = CompiledOrEager(lambda x: x @ x, "matmul", backend="eager")
    with pytest.raises(RuntimeError):
        f(torch.ones(2, 3))


def test_no_compile_env_runs_eagerly(monkeypatch):
    monkeypatch.setenv("DDPM_NO_COMPILE", "1")
    f = CompiledOrEager(lambda x: x + 1, "f")
    assert f.compiled is None and torch.equal(f(torch.zeros(2)), torch.ones(2))


def test_compile_cache_in_the_project_under_dvc(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert use_project_compile_cache() is None  # outside DVC: inductor's own default
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    assert use_project_compile_cache() == tmp_path / "mine"  # an explicit folder wins
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert use_project_compile_cache() == tmp_path / "project" / ".cache" / "torchinductor"
    torch._dynamo.reset()
    f = CompiledOrEager(lambda x: torch.sin(x) * 3 + 1, "a cached function")
    x = torch.arange(5.0)
    assert torch.allclose(f(x), torch.sin(x) * 3 + 1) and not f.failed
    assert any(p.is_file() for p in (tmp_path / "project" / ".cache" / "torchinductor").rglob("*"))


def _digits(n=256):
    from sklearn.datasets import load_digits

    return torch.from_numpy((load_digits().images[:n] * (255 / 16)).round().astype(np.uint8))[:, None]


def test_compiled_channels_last_training_matches_eager():
    """The default path (fast: true on a CPU) with inductor: the per-step losses of the compiled,
    channels_last loop equal the eager loop's up to float rounding (dropout off: its RNG differs)."""
    need("g++")  # inductor compiles C++: without a compiler this would only test the eager fallback
    images, process = _digits(), GaussianProcess(get_beta_schedule("linear", 50), "pred_noise")
    losses = {}
    for fast in (False, True):
        torch.manual_seed(0)
        model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8)
        settings = TrainSettings(steps=6, batch_size=16, log_every=3, channels_last=fast, compile=fast)
        r = train(model, process, images, settings, seed=0, progress=False)
        losses[fast] = np.array([h["loss"] for h in r.history])
        if fast:
            assert r.model.init_conv.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    assert losses[True][-1] < losses[True][0]


def test_compiled_sampling_matches_eager():
    need("g++")
    torch.manual_seed(0)
    model = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=1, attn_dim_head=8).eval()
    process = GaussianProcess(get_beta_schedule("linear", 50), "pred_noise")
    rule = StepRule("ddim", 0.0)
    eager = sample_images(model, process, 8, (1, 8, 8), 5, rule, seed=3, batch_size=8)
    net = sampling_model(model, Speed(False, True, True, None))
    assert isinstance(net, CompiledOrEager)
    fast = sample_images(net, process, 8, (1, 8, 8), 5, rule, seed=3, batch_size=8)
    assert not net.failed
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)


def test_tuned_allocator_reuses_freed_tensor_memory():
    """After tune_allocator, allocating and freeing the same 8 MB tensor again and again faults no new pages
    (glibc's default may unmap it on every free, so each new tensor faults in about 2,000 zeroed pages)."""
    import platform
    import resource

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's: other C libraries keep their allocator (tune_allocator returns False)")
    from ddpm.nn.speed import tune_allocator

    assert tune_allocator() and tune_allocator()  # applies, then stays applied
    # this thread's faults only (other threads, e.g. compile workers left by earlier tests, fault pages too),
    # with the fills done by this thread
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):  # the heap grows once
            torch.ones(2 << 20)
        before = resource.getrusage(who).ru_minflt
        for _ in range(50):
            torch.ones(2 << 20)  # 8 MB, written: every page touched
        faults = resource.getrusage(who).ru_minflt - before
    finally:
        torch.set_num_threads(threads)
    assert faults < 500, f"{faults} page faults for 50 reused 8 MB tensors (untuned glibc here: about 4,000)"


def test_set_up_process_follows_the_fast_switch(monkeypatch):
    """fast: true keeps freed memory and flushes subnormals (both stubbed here: they are process-wide);
    fast: false turns the fused kernels off, and the record says why."""
    from ddpm.nn import kernels, speed

    calls = []
    monkeypatch.setattr(speed, "tune_allocator", lambda: calls.append("allocator"))
    monkeypatch.setattr(kernels, "flush_denormals", lambda: calls.append("denormals"))
    saved = dict(kernels._state)
    kernels._state.pop("calls", None)  # earlier tests in this process may have run the kernels
    try:
        speed.set_up_process(True)
        assert calls == ["allocator", "denormals"]
        speed.set_up_process(False)
        assert calls == ["allocator", "denormals"]
        assert kernels.library() is None and kernels.kernel_record()["reason"] == "fast: false"
    finally:
        kernels._state.clear()
        kernels._state.update(saved)
