"""ddpm.nn.kernels: the fused CPU kernels (sampling, and GroupNorm + SiLU with its backward for training) against
PyTorch's maths, where they decline, and the fallback."""
import logging
import os
import platform
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ci_tools import need
from ddpm.nn import kernels
from ddpm.nn.unet import Unet


@pytest.fixture
def library():
    """The built kernels: skipped on a machine without a C compiler, a failure under CI=true (ci_tools)."""
    need("cc")
    lib = kernels.library()
    assert lib is not None, "a C compiler is on PATH but ddpm.nn.kernels could not build (see its warning)"
    return lib


needs_library = pytest.mark.usefixtures("library")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Forget the loaded library and build into an empty cache, restored afterwards."""
    saved = dict(kernels._state)
    kernels._state.clear()
    monkeypatch.setenv("DDPM_KERNEL_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    kernels._state.clear()
    kernels._state.update(saved)


def _cl(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).contiguous(memory_format=torch.channels_last)


def _reference(norm, x, ss, silu):
    """PyTorch's ops: act(norm(x) * (1 + scale) + shift), ss = [rows, 2C] (scale, then shift) or None."""
    y = norm(x)
    if ss is not None:
        scale, shift = ss[:, :, None, None].chunk(2, dim=1)
        y = y * (1 + scale) + shift
    return F.silu(y) if silu else y


def _norm(c, groups):
    norm = torch.nn.GroupNorm(groups, c)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


@needs_library
@pytest.mark.parametrize("c, groups, size", [(16, 8, 8), (32, 8, 8), (64, 8, 4), (96, 8, 4), (128, 8, 4),
                                             (24, 8, 3), (48, 4, 9), (32, 8, 16)])
@pytest.mark.parametrize("rows", [None, 1, "batch"])
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_act_matches_pytorch(c, groups, size, rows, silu):
    """Vector paths (c a multiple of 16, up to 128), the scalar one (24), a sum over several 64-position
    blocks (16x16), an odd map (3x3, 9x9), scale-shift shared by the batch or per image."""
    torch.manual_seed(0)
    b, norm = 5, _norm(c, groups)
    x = _cl(b, c, size, size, scale=3.0) + 2.0  # a mean far from 0: E[x^2] - E[x]^2 must not cancel badly
    ss = None if rows is None else torch.randn(1 if rows == 1 else b, 2 * c) * 0.5
    with torch.no_grad():
        ref, got = _reference(norm, x, ss, silu), kernels.group_norm_act(x, norm, ss, silu)
    assert got is not None and got.shape == x.shape and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


@needs_library
@pytest.mark.parametrize("c, groups, size, rows, silu", [(32, 8, 8, "batch", True), (24, 8, 3, 1, True),
                                                         (64, 8, 4, None, False), (32, 8, 16, "batch", True),
                                                         (128, 8, 4, 1, True)])
def test_group_norm_act_backward_matches_autograd(c, groups, size, rows, silu):
    """The training kernel's forward and every gradient (x, weight, bias, scale-shift) against autograd through
    PyTorch's GroupNorm, scale-shift and SiLU."""
    torch.manual_seed(0)
    b, norm = 4, _norm(c, groups)
    x = (_cl(b, c, size, size, scale=2.0) + 1.0).requires_grad_()
    ss = None if rows is None else (torch.randn(1 if rows == 1 else b, 2 * c) * 0.5).requires_grad_()
    dy = _cl(b, c, size, size)
    inputs = [x, norm.weight, norm.bias] + ([ss] if ss is not None else [])
    ref, got = _reference(norm, x, ss, silu), kernels.group_norm_act_train(x, norm, ss, silu)
    assert got.requires_grad and got.grad_fn is not None
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
    for want, have in zip(torch.autograd.grad(ref, inputs, dy), torch.autograd.grad(got, inputs, dy)):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)


@needs_library
def test_training_step_with_and_without_kernels(monkeypatch):
    """A Unet's loss and every parameter's gradient: the kernels' path against PyTorch's (DDPM_CPU_KERNELS=0)."""
    torch.manual_seed(0)
    m = Unet(dim=16, dim_mults=(1, 2), channels=1).train().to(memory_format=torch.channels_last)
    x, t = _cl(6, 1, 8, 8), torch.randint(0, 1000, (6,))
    calls, fused_attention = [], []
    real, real_attention = kernels.group_norm_act_train, kernels.attention16_train
    monkeypatch.setattr(kernels, "group_norm_act_train", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(kernels, "attention16_train",
                        lambda *a: fused_attention.append(real_attention(*a)) or fused_attention[-1])
    grads = []
    for lib in (kernels.library(), None):
        monkeypatch.setitem(kernels._state, "lib", lib)
        m.zero_grad()
        loss = m(x, t).square().mean()
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in m.parameters()])
    assert len(calls) == 2 * 25  # per forward: 11 residual blocks x 2 norms, 3 attention norms
    assert [a is not None for a in fused_attention] == [True] * 3 + [False] * 3  # 3 attention blocks at 4x4
    for fused, plain in zip(*grads):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


@needs_library
def test_silu_at_extremes_and_nan():
    """The inline e^x is clamped at +-88: SiLU of large inputs stays finite and right; NaN stays NaN."""
    norm = torch.nn.GroupNorm(1, 16)  # weight 1, bias 0: the output is SiLU of the normalised input
    x = torch.zeros(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    x[0, :, 0, 0] = 1e4  # normalised to about +3.9
    x[0, 0, 1, 1] = -1e6  # about -3.9 after normalising; now scale it further with a huge scale-shift:
    ss = torch.cat([torch.full((1, 16), 99.0), torch.zeros(1, 16)], dim=1)  # (1 + scale) = 100
    with torch.no_grad():
        got = kernels.group_norm_act(x, norm, ss)
        ref = F.silu(norm(x) * 100)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    x[0, 3, 2, 2] = float("nan")
    with torch.no_grad():
        assert torch.isnan(kernels.group_norm_act(x, norm)).all()  # NaN poisons its group's statistics


@needs_library
@pytest.mark.parametrize("heads, d", [(1, 16), (4, 32), (2, 64)])
def test_attention16_matches_softmax(heads, d):
    torch.manual_seed(0)
    b, inner = 6, heads * d
    qkv = torch.randn(b, 16, 3 * inner) * 3  # large scores: the softmax must subtract its row's maximum
    q, k, v = (u.unflatten(-1, (heads, d)).transpose(1, 2) for u in qkv.chunk(3, dim=-1))
    ref = (torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v).transpose(1, 2).flatten(2)
    with torch.no_grad():
        got = kernels.attention16(qkv, heads, d)
    assert got.shape == (b, 16, inner)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _attention_reference(qkv, heads, d):
    q, k, v = (u.unflatten(-1, (heads, d)).transpose(1, 2) for u in qkv.chunk(3, dim=-1))
    return (torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5, dim=-1) @ v).transpose(1, 2).flatten(2)


@needs_library
@pytest.mark.parametrize("heads, d", [(1, 16), (4, 32), (2, 64)])
def test_attention16_train_matches_autograd(heads, d):
    """Training's fused attention (the scores scaled by 1/sqrt(d) inside): its output and the gradient of
    q, k and v from its own backward, against PyTorch's ops and autograd."""
    torch.manual_seed(0)
    qkv = (torch.randn(6, 16, 3 * heads * d) * 3).requires_grad_()  # large scores: a peaked softmax
    dout = torch.randn(6, 16, heads * d)
    ref = _attention_reference(qkv, heads, d)
    got = kernels.attention16_train(qkv, heads, d)
    assert got is not None and got.shape == ref.shape == (6, 16, heads * d)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    want, = torch.autograd.grad(ref, qkv, dout)
    have, = torch.autograd.grad(got, qkv, dout)
    torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4)
    assert have[..., 2 * heads * d:].abs().sum() > 0 and have[..., :heads * d].abs().sum() > 0  # dv and dq written


def _conv_reference(x, w, b, dy):
    """The gradients of conv2d(x, w, b, padding=1) for dy, computed in float64."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    return torch.autograd.grad(F.conv2d(x64, w64, b64, padding=1), (x64, w64, b64), dy.double())


@needs_library
@pytest.mark.parametrize("n, c, h, w, o", [(5, 16, 8, 8, 16), (3, 32, 4, 4, 64), (20, 48, 4, 4, 20),
                                           (2, 16, 5, 7, 7), (1, 32, 1, 1, 3), (9, 64, 8, 8, 32)])
def test_conv3x3_weight_grad_matches_float64(n, c, h, w, o):
    """Training's 3x3 convolution: the output, and the input's, weight's and bias's gradients (the last two from
    the C kernel: output-channel tiles of 6 with a remainder, images in blocks of >= 128 pixels with a partial
    last block, odd and 1x1 maps) against float64 autograd."""
    torch.manual_seed(0)
    x, dy = _cl(n, c, h, w).requires_grad_(), _cl(n, o, h, w)
    weight = torch.randn(o, c, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randn(o, requires_grad=True)
    y = kernels.conv3x3_train(x, weight, bias)
    assert y is not None
    torch.testing.assert_close(y, F.conv2d(x, weight, bias, padding=1), rtol=0, atol=0)  # PyTorch's forward
    have, want = torch.autograd.grad(y, (x, weight, bias), dy), _conv_reference(x, weight, bias, dy)
    for got, ref in zip(have, want):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert have[1].is_contiguous(memory_format=torch.channels_last)


@needs_library
def test_conv3x3_weight_grad_without_bias_and_for_an_nchw_weight():
    torch.manual_seed(0)
    x, dy = _cl(4, 32, 8, 8), _cl(4, 8, 8, 8)
    weight = torch.randn(8, 32, 3, 3, requires_grad=True)  # NCHW: the gradient comes back in its layout
    dw, = torch.autograd.grad(kernels.conv3x3_train(x, weight, None), weight, dy)
    assert dw.is_contiguous()
    ref = _conv_reference(x, weight, torch.zeros(8), dy)[1]
    assert (dw.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@needs_library
@pytest.mark.parametrize("n, c, h, w, o", [(5, 32, 8, 8, 48), (3, 16, 7, 5, 16), (2, 64, 4, 4, 64), (1, 16, 1, 1, 16),
                                           (13, 96, 4, 4, 32), (4, 48, 16, 16, 16), (2, 16, 32, 31, 32)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv3x3_winograd_matches_float64(n, c, h, w, o, with_bias):
    """Sampling's 3x3 convolution by Winograd's F(2x2, 3x3): odd and 1x1 maps (tiles cut at the edge), blocks of
    images with a partial last one, 16x16 and 32x31 maps; against float64 within 1e-6 of the output's largest value
    (oneDNN's own error is 5-9e-7)."""
    torch.manual_seed(0)
    x, weight = _cl(n, c, h, w), torch.randn(o, c, 3, 3) / (3 * c ** 0.5)
    bias = torch.randn(o) if with_bias else None
    with torch.no_grad():
        y = kernels.conv3x3(x, weight, bias)
    assert y is not None and y.shape == (n, o, h, w) and y.is_contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    assert (y.double() - ref).abs().max() <= 1e-6 * ref.abs().max()


@needs_library
def test_conv3x3_winograd_follows_the_weights():
    """The transformed weights are kept on the weight tensor and recomputed when it changes in place (an EMA
    update) or is replaced."""
    torch.manual_seed(0)
    x, weight = _cl(2, 16, 4, 4), torch.randn(16, 16, 3, 3)
    with torch.no_grad():
        first = kernels.conv3x3(x, weight, None)
        weight.mul_(-2)
        torch.testing.assert_close(kernels.conv3x3(x, weight, None), -2 * first, rtol=1e-5, atol=1e-5)
        other = torch.randn(16, 16, 3, 3)
        torch.testing.assert_close(kernels.conv3x3(x, other, None), F.conv2d(x, other, padding=1), rtol=1e-5,
                                   atol=1e-5)
    with torch.inference_mode():  # weights made here have no version counter: transformed at each call
        made = torch.randn(16, 16, 3, 3)
        first = kernels.conv3x3(x, made, None)
        made.mul_(-2)
        torch.testing.assert_close(kernels.conv3x3(x, made, None), -2 * first, rtol=1e-5, atol=1e-5)


@needs_library
def test_the_thread_count_does_not_change_a_bit():
    torch.manual_seed(0)
    x, norm, qkv = _cl(9, 32, 8, 8), _norm(32, 8), torch.randn(9, 16, 3 * 128)
    w, b, dy = torch.randn(20, 32, 3, 3, requires_grad=True), torch.randn(20, requires_grad=True), _cl(9, 20, 8, 8)
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                out = [kernels.group_norm_act(x, norm), kernels.attention16(qkv, 4, 32)]
            xg, qg = x.clone().requires_grad_(), qkv.clone().requires_grad_()
            out += torch.autograd.grad(kernels.group_norm_act_train(xg, norm).sum(), [xg, norm.weight, norm.bias])
            att = kernels.attention16_train(qg, 4, 32)
            out += [att.detach(), *torch.autograd.grad(att.square().sum(), [qg])]
            out += torch.autograd.grad(kernels.conv3x3_train(x, w, b), [w, b], dy)  # the C kernel's sums
            with torch.no_grad():
                out.append(kernels.conv3x3(x, w[:16], b[:16]))  # sampling's Winograd convolution: O = 16
            outs.append(out)
    finally:
        torch.set_num_threads(n)
    assert all(o is not None for o in outs[0]) and all(torch.equal(a, b) for a, b in zip(*outs))


@needs_library
def test_kernels_decline_what_they_do_not_compute():
    """None (the caller's PyTorch path) for grads, another layout or dtype, a GroupNorm without affine, other
    shapes; never an error."""
    x, norm, qkv = _cl(2, 32, 8, 8), _norm(32, 8), torch.randn(2, 16, 3 * 128)
    assert kernels.group_norm_act(x.requires_grad_(), norm) is None  # grad mode is on here
    with torch.no_grad():
        assert kernels.group_norm_act(x.contiguous(), norm) is None  # NCHW
        assert kernels.group_norm_act(x.double(), norm.double()) is None
        assert kernels.group_norm_act(x, torch.nn.GroupNorm(8, 32, affine=False)) is None
        assert kernels.group_norm_act(x, norm, torch.randn(3, 64)) is None  # neither 1 nor B rows
        assert kernels.attention16(torch.randn(2, 64, 3 * 128), 4, 32) is None  # 64 positions
        assert kernels.attention16(torch.randn(2, 16, 3 * 32), 4, 8) is None  # dim_head 8
        assert kernels.attention16(torch.randn(2, 16, 3 * 128), 4, 16) is None  # width != 3 heads d
    assert kernels.attention16_train(torch.randn(2, 64, 3 * 128), 4, 32) is None  # 64 positions
    assert kernels.attention16_train(torch.randn(2, 16, 3 * 32), 4, 8) is None  # dim_head 8
    assert kernels.attention16_train(torch.randn(2, 16, 3 * 128, dtype=torch.float64), 4, 32) is None
    assert kernels.attention16(qkv, 4, 32) is None  # grads
    assert kernels.group_norm_act_train(x.bfloat16(), norm) is None  # autocast's dtype
    assert kernels.group_norm_act_train(x.contiguous(), norm) is None
    w = torch.randn(8, 32, 3, 3)
    assert kernels.conv3x3_train(x, w, None) is not None
    assert kernels.conv3x3_train(x.contiguous(), w, None) is None  # NCHW
    assert kernels.conv3x3_train(_cl(2, 24, 8, 8), torch.randn(8, 24, 3, 3), None) is None  # C not a multiple of 16
    assert kernels.conv3x3_train(x, torch.randn(8, 32, 5, 5), None) is None  # 5x5
    assert kernels.conv3x3_train(_cl(1, 32, 33, 33), w, None) is None  # over 32x32
    assert kernels.conv3x3_train(x.double(), w.double(), None) is None
    assert kernels.conv3x3(x, w, None) is None  # grads: conv3x3_train
    with torch.no_grad():
        assert kernels.conv3x3_train(x, w, None) is None  # sampling: conv3x3
        assert kernels.conv3x3(x, torch.randn(16, 32, 3, 3), None) is not None
        assert kernels.conv3x3(x, w, None) is None  # 8 output channels: not a multiple of 16
        assert kernels.conv3x3(_cl(2, 24, 8, 8), torch.randn(16, 24, 3, 3), None) is None
        assert kernels.conv3x3(_cl(1, 16, 33, 33), torch.randn(16, 16, 3, 3), None) is None  # over 32x32
        assert kernels.conv3x3(x.contiguous(), torch.randn(16, 32, 3, 3), None) is None  # NCHW


@needs_library
def test_torch_compile_never_reaches_the_library(monkeypatch):
    """While dynamo traces (CUDA's default path, a CPU on request) every kernel declines before the library."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(kernels, "library", lambda: pytest.fail("the library was reached while compiling"))
    x, norm = _cl(2, 32, 8, 8), _norm(32, 8)
    assert kernels.group_norm_act_train(x, norm) is None
    with torch.no_grad():
        assert kernels.group_norm_act(x, norm) is None and kernels.attention16(torch.randn(2, 16, 384), 4, 32) is None


@needs_library
def test_sampling_forward_with_and_without_kernels(monkeypatch):
    """The Unet's sampling forward uses both kernels at the default attention shape and agrees with its
    PyTorch path (DDPM_CPU_KERNELS=0) to float rounding."""
    torch.manual_seed(0)
    m = Unet(dim=16, dim_mults=(1, 2), channels=1).eval().to(memory_format=torch.channels_last)
    x, t = _cl(4, 1, 8, 8), torch.tensor(500).expand(4)
    calls = []
    for name in ("group_norm_act", "attention16"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))
    with torch.inference_mode():
        fused = m(x, t)
        assert calls.count("group_norm_act") == 25 and calls.count("attention16") == 3
        monkeypatch.setitem(kernels._state, "lib", None)
        plain = m(x, t)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_switched_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("DDPM_CPU_KERNELS", "0")
    with torch.no_grad():
        assert kernels.library() is None and kernels.group_norm_act(_cl(2, 16, 4, 4), _norm(16, 8)) is None
    assert not fresh.exists()


def test_a_failing_compiler_means_the_pytorch_path_and_one_warning(fresh, monkeypatch, tmp_path, caplog):
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    cc.chmod(cc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(cc))
    with caplog.at_level(logging.WARNING, logger="ddpm.nn.kernels"), torch.no_grad():
        assert kernels.library() is None and kernels.library() is None
        m = Unet(dim=16, dim_mults=(1, 2), channels=1).eval().to(memory_format=torch.channels_last)
        assert m(_cl(2, 1, 8, 8), 3).shape == (2, 1, 8, 8)
    warnings = [r.getMessage() for r in caplog.records if r.name == "ddpm.nn.kernels"]
    assert len(warnings) == 1 and "broken-cc: cannot compile" in warnings[0]
    assert not any(fresh.glob("*.so")) and not any(p.is_dir() for p in fresh.iterdir())  # no partial files


def test_built_once_into_the_cache_under_a_hashed_name(fresh):
    need("cc")
    assert kernels.library() is not None
    built = list(fresh.iterdir())
    assert len(built) == 1 and built[0].name.startswith("kernels-") and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    kernels._state.clear()
    assert kernels.library() is not None and os.stat(built[0]).st_mtime_ns == mtime  # loaded, not rebuilt


def test_kernel_record_says_whether_they_ran_and_for_which_isa(fresh):
    """Issue 25 item 4: the record names the instruction set once a kernel has run, and why not otherwise."""
    need("cc")
    before = kernels.kernel_record("cpu")
    assert before["fused_kernels"] is False and "reason" in before  # nothing ran yet in this (fresh) state
    assert before["aten_isa"] == torch.backends.cpu.get_cpu_capability()
    with torch.no_grad():
        assert kernels.group_norm_act(_cl(2, 16, 4, 4), _norm(16, 8)) is not None
    rec = kernels.kernel_record("cpu")
    assert rec["fused_kernels"] is True and "reason" not in rec
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    expected = "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else None
    assert rec["isa"] in {"avx512", "avx2", "avx", "sse4.2", "sve", "neon", "generic"}
    if expected:  # -march=native targets what this CPU has
        assert rec["isa"] == expected
    assert kernels.kernel_record("cuda") == {"fused_kernels": False, "isa": rec["isa"], "aten_isa": rec["aten_isa"],
                                             "flush_denormals": False, "reason": "cuda device: PyTorch's ops"}


def test_kernel_record_when_switched_off(fresh, monkeypatch):
    monkeypatch.setenv("DDPM_CPU_KERNELS", "0")
    assert kernels.library() is None
    assert kernels.kernel_record()["reason"] == "DDPM_CPU_KERNELS=0"
    monkeypatch.delenv("DDPM_CPU_KERNELS")
    kernels._state.clear()
    kernels.disable("fast: false")  # what the train and sample stages do with fast: false
    with torch.no_grad():
        assert kernels.group_norm_act(_cl(2, 16, 4, 4), _norm(16, 8)) is None  # PyTorch's ops
    rec = kernels.kernel_record()
    assert rec["fused_kernels"] is False and rec["reason"] == "fast: false" and rec["isa"] is None


def _outputs() -> list[torch.Tensor]:
    """Every kernel's outputs on fixed inputs: GroupNorm + SiLU forward (vector and scalar channel counts, a
    scale-shift per image), its backward's gradients, attention at each head width."""
    torch.manual_seed(0)
    outs = []
    for c in (16, 48, 128, 24):
        x, norm, ss = _cl(3, c, 8, 8, scale=3.0) + 1.0, _norm(c, 8), torch.randn(3, 2 * c) * 0.5
        with torch.no_grad():
            outs.append(kernels.group_norm_act(x, norm, ss))
        x.requires_grad_()
        outs += torch.autograd.grad(kernels.group_norm_act_train(x, norm, ss).square().sum(), [x, norm.weight])
    with torch.no_grad():
        outs += [kernels.attention16(torch.randn(5, 16, 3 * h * d) * 2, h, d) for h, d in ((1, 16), (4, 32), (2, 64))]
    for h, d in ((1, 16), (4, 32), (2, 64)):  # training's attention, forward and backward
        qkv = (torch.randn(5, 16, 3 * h * d) * 2).requires_grad_()
        att = kernels.attention16_train(qkv, h, d)
        outs += [att.detach(), *torch.autograd.grad(att.square().sum(), [qkv])]
    for c, o in ((16, 16), (48, 20)):  # training's 3x3 weight and bias gradients
        x, w, b = _cl(11, c, 8, 8), torch.randn(o, c, 3, 3, requires_grad=True), torch.randn(o, requires_grad=True)
        outs += torch.autograd.grad(kernels.conv3x3_train(x, w, b).square().sum(), [w, b])
        if o % 16 == 0:
            with torch.no_grad():
                outs.append(kernels.conv3x3(x, w, b))  # sampling's Winograd convolution
    assert all(o is not None for o in outs)
    return outs


def test_every_build_computes_the_same_bits(fresh, monkeypatch):
    """Issue 29 item 3: the library does not depend on the machine that built it: the build for the other
    vector width (8 floats is the AVX2 build's, 16 the AVX-512 one's: -DVW) computes bit-identical outputs."""
    need("cc")
    base = _outputs()
    kernels._state.clear()
    monkeypatch.setattr(kernels, "FLAGS", [*kernels.FLAGS, "-DVW=8" if kernels.target()[0] == "avx512" else "-DVW=16"])
    got = _outputs()
    assert all(torch.equal(a, b) for a, b in zip(base, got))
    assert len(list(fresh.glob("kernels-*.so"))) == 2


def test_a_bad_or_missing_isa_keeps_pytorch_ops(fresh, monkeypatch, caplog):
    monkeypatch.setenv("DDPM_KERNEL_ISA", "avx9")
    with pytest.raises(ValueError, match="DDPM_KERNEL_ISA='avx9': allowed are native, avx512, avx2, sse"):
        kernels.target()
    with caplog.at_level(logging.WARNING, logger="ddpm.nn.kernels"):
        assert kernels.library() is None
    assert "DDPM_KERNEL_ISA" in kernels.kernel_record()["reason"]
    if kernels._is_x86() and "avx512f" not in kernels._cpu_id().split():
        monkeypatch.setenv("DDPM_KERNEL_ISA", "avx512")
        with pytest.raises(ValueError, match="this CPU runs only"):
            kernels.target()


FLUSH_PROBE = """
import sys, torch
from ddpm.nn import kernels
torch.set_num_threads(2)
tiny = torch.full((1 << 20,), 1e-39)  # subnormal in float32; a parallel region of both threads multiplies it
before = int((tiny * 1.0 != 0).sum())
ok = kernels.flush_denormals()
after = int((tiny * 1.0 != 0).sum())
print(before, ok, after, kernels.kernel_record()["flush_denormals"])
"""


def test_flush_denormals_reaches_every_thread_of_the_pool():
    """In a fresh process (the flag is process state): 1e-39 * 1 stays subnormal in every element before, and is 0 in
    every element after, so each thread of PyTorch's parallel region took the flag, not only the calling one."""
    need("cc")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FLUSH_PROBE], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    before, ok, after, recorded = out.stdout.split()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("FTZ/DAZ is set on x86 only")
    assert (int(before), ok, int(after), recorded) == (1 << 20, "True", 0, "True")
