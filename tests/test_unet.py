"""Unet: shapes, image-size validation, config round trip, conditioning on t, gradients, dropout."""
import json

import pytest
import torch

import torch.nn.functional as F

from ddpm.nn import ops
from ddpm.nn.ops import ONEDNN_LINEAR_MIN_MACS, Linear, dropout, linear
from ddpm.nn.unet import Unet


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and 2 OpenMP threads on a busy 2-core
    # machine can be ~100x slower (barrier spinning); restore the setting afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _t(b, T=1000):
    return torch.randint(0, T, (b,))


@pytest.mark.parametrize(
    "kwargs, size",
    [
        (dict(dim=16, dim_mults=(1, 2), channels=1), 8),
        (dict(dim=16, dim_mults=(1, 2), channels=1), 28),  # 28 = 14 * 2
        (dict(dim=16, dim_mults=(1, 2, 4), channels=3), 32),
        (dict(dim=8, dim_mults=(1, 2, 4, 8), channels=3, attn_heads=2, attn_dim_head=8), 128),
    ],
)
def test_output_shape(kwargs, size):
    m = Unet(**kwargs).eval()
    x = torch.randn(2, kwargs["channels"], size, size)
    with torch.no_grad():
        y = m(x, _t(2))
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


def test_non_square_and_out_dim():
    m = Unet(dim=8, dim_mults=(1, 2), channels=1, out_dim=2).eval()
    assert m.out_dim == 2 and m.channels == 1 and m.dim_mults == (1, 2)
    with torch.no_grad():
        assert m(torch.randn(3, 1, 8, 12), _t(3)).shape == (3, 2, 8, 12)


def test_bad_image_size_raises():
    m = Unet(dim=8, dim_mults=(1, 2, 4, 8))
    assert m.downsample_factor == 8
    m.check_image_size(16)
    m.check_image_size((8, 24))
    for call in (lambda: m.check_image_size(12), lambda: m(torch.randn(1, 3, 12, 12), _t(1))):
        with pytest.raises(ValueError, match=r"12") as e:
            call()
        msg = str(e.value)
        assert "multiples of 8" in msg and "(1, 2, 4, 8)" in msg
    with pytest.raises(ValueError, match="16, 12"):
        m.check_image_size((16, 12))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.randn(1, 1, 16, 16), _t(1))


def test_config_round_trip():
    torch.manual_seed(0)
    m = Unet(dim=8, dim_mults=(1, 2), channels=1, init_dim=12, full_attn=(True, True)).eval()
    cfg = json.loads(json.dumps(m.config))  # what a checkpoint stores
    assert cfg == m.config and isinstance(cfg["dim_mults"], list)
    m2 = Unet(**cfg).eval()
    m2.load_state_dict(m.state_dict())
    x, t = torch.randn(2, 1, 8, 8), _t(2)
    with torch.no_grad():
        torch.testing.assert_close(m(x, t), m2(x, t), rtol=0, atol=0)


def test_depends_on_t_and_accepts_int_and_float_t():
    torch.manual_seed(0)
    m = Unet(dim=8, dim_mults=(1, 2), channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        y_int = m(x, torch.tensor([3, 500]))
        y_float = m(x, torch.tensor([3.0, 500.0]))
        y_other = m(x, torch.tensor([4, 900]))
        y_scalar = m(x, 3)
    torch.testing.assert_close(y_int, y_float)
    torch.testing.assert_close(y_scalar[0], y_int[0])
    assert (y_int - y_other).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = Unet(dim=8, dim_mults=(1, 2), channels=1, full_attn=(True, True), dropout=0.1)
    m(torch.randn(2, 1, 8, 8), _t(2)).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    m = Unet(dim=8, dim_mults=(1, 2), channels=1, dropout=0.5)
    x, t = torch.randn(2, 1, 8, 8), _t(2)
    with torch.no_grad():
        assert not torch.equal(m.train()(x, t), m(x, t))
        m.eval()
        torch.testing.assert_close(m(x, t), m(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_no_grad_path_computes_the_same_bits(channels_last):
    """Without grads the residual blocks work in place (sampling): the autograd path's result (bit for bit
    in NCHW; in channels_last the norms of few channels per group take per-channel sums), and the input is
    left alone."""
    torch.manual_seed(0)
    m = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=8).eval()
    x, t = torch.randn(3, 1, 8, 8), _t(3)
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    with_grad = m(x, t)
    with torch.no_grad():
        without = m(x, t)
    with torch.inference_mode():
        inference = m(x, t)
    assert with_grad.requires_grad and torch.equal(without, inference) and torch.equal(x, x_before)
    # the residual blocks give the same bits; attention at <= 64 positions is written out on a CPU (its
    # rounding differs from SDPA's flash kernel)
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-5, atol=1e-6)
    block, temb = m.downs[0][0], torch.randn(3, m.time_mlp[-1].out_features)
    h = m.init_conv(x).detach()
    with torch.no_grad():
        in_place = block(h, temb)
    if channels_last:
        torch.testing.assert_close(in_place, block(h, temb).detach(), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(in_place, block(h, temb).detach())


@pytest.mark.parametrize("channels, size", [(16, 8), (32, 4), (64, 8)])  # 2, 4, 8 channels per group
@pytest.mark.parametrize("channels_last", [True, False])
def test_norm_scale_shift_matches_group_norm(channels, size, channels_last):
    from ddpm.nn.ops import norm_scale_shift

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(8, channels)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(5, channels, size, size) * 3 + 1
    scale, shift = torch.randn(5, channels, 1, 1), torch.randn(5, channels, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want_plain = norm(x)
        want = want_plain * (1 + scale) + shift
        got_plain, got = norm_scale_shift(norm, x), norm_scale_shift(norm, x, scale, shift)
    torch.testing.assert_close(got_plain, want_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_dropout_zeroes_a_fraction_p_and_keeps_the_mean():
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.1, training=True)
    zero = (y == 0).float().mean().item()
    assert abs(zero - 0.1) < 0.005  # binomial sd 0.0007
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask)/dx = mask
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1, training=True), y)  # the global generator decides the mask
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))


def test_channels_last():
    torch.manual_seed(0)
    m = Unet(dim=8, dim_mults=(1, 2, 4), channels=3).eval()
    x, t = torch.randn(2, 3, 16, 16), _t(2)
    with torch.no_grad():
        ref = m(x, t)
        m_cl = m.to(memory_format=torch.channels_last)
        y = m_cl(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_constructor_validation():
    with pytest.raises(ValueError, match="full_attn"):
        Unet(dim=8, dim_mults=(1, 2), full_attn=(True,))
    assert Unet(dim=8, dim_mults=(1, 2), full_attn=False).config["full_attn"] == [False, False]
    assert Unet(dim=8, dim_mults=(1, 2, 4)).config["full_attn"] == [False, False, True]


@pytest.mark.parametrize("rows", [3, 2 * ONEDNN_LINEAR_MIN_MACS // (64 * 96)])  # below and above the switch
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("onednn", [True, False])  # the AVX-512 choice and the AVX2 one, on any CPU
def test_linear_matches_f_linear_values_and_gradients(rows, bias, onednn, monkeypatch):
    monkeypatch.setattr(ops, "onednn_linear", lambda: onednn)
    torch.manual_seed(0)
    x = torch.randn(2, rows // 2, 64, requires_grad=True)  # leading dims are kept, as in F.linear
    w = torch.randn(96, 64, requires_grad=True)
    b = torch.randn(96, requires_grad=True) if bias else None
    g = torch.randn(2, rows // 2, 96)
    ref = F.linear(x, w, b)
    grads_ref = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), g)
    out = linear(x, w, b)
    grads = torch.autograd.grad(out, [x, w] + ([b] if bias else []), g)
    assert out.shape == ref.shape == (2, rows // 2, 96) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    with torch.no_grad():  # a non-contiguous input (a transposed view) is read correctly too
        xt = torch.randn(64, rows).t()
        torch.testing.assert_close(linear(xt, w, b), F.linear(xt, w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("capability, onednn", [("AVX512", True), ("AVX512_BF16", True), ("AVX2", False),
                                                ("DEFAULT", False)])
def test_large_cpu_products_run_on_onednn_only_at_avx512(capability, onednn, monkeypatch):
    """MKL runs AVX2 code on AMD's AVX-512 CPUs (half oneDNN's rate there); at AVX2 its backward of the
    attention projections is twice oneDNN's 1x1 convolution's. The choice follows PyTorch's CPU capability."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    ops.onednn_linear.cache_clear()
    try:
        assert ops.onednn_linear() is onednn
        calls = []
        real = ops.F.conv2d
        monkeypatch.setattr(ops.F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
        ops.linear(torch.randn(ONEDNN_LINEAR_MIN_MACS // (64 * 96) + 1, 64), torch.randn(96, 64))
        assert len(calls) == int(onednn)
    finally:
        ops.onednn_linear.cache_clear()


def test_linear_module_keeps_nn_linear_parameters_and_state_dict():
    m = Unet(dim=16, dim_mults=(1, 2), channels=1)
    linears = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert linears and all(isinstance(m.get_submodule(n), Linear) for n in linears)
    plain = torch.nn.Linear(32, 384, bias=False)
    assert set(Linear(32, 384, bias=False).state_dict()) == set(plain.state_dict()) == {"weight"}
    assert "mid_attn.to_qkv.weight" in m.state_dict() and "time_mlp.0.bias" in m.state_dict()


@pytest.mark.parametrize("size, stride, padding, c", [(1, 1, 0, 64), (3, 1, 1, 32), (3, 1, 1, 24), (3, 2, 1, 32)])
@pytest.mark.parametrize("onednn", [True, False])  # the AVX-512 choice and the AVX2 one, on any CPU
def test_conv2d_matches_f_conv2d_values_and_gradients(size, stride, padding, c, onednn, monkeypatch):
    """ops.conv2d in training: 1x1 as a product over channels, 3x3 (C a multiple of 16) with the C kernel's
    weight gradient at AVX2; values and every gradient agree with F.conv2d's, and the weight's gradient keeps
    the weight's layout."""
    monkeypatch.setattr(ops, "onednn_linear", lambda: onednn)
    torch.manual_seed(0)
    x = torch.randn(5, c, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(20, c, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(20, requires_grad=True)
    g = torch.randn(5, 20, 8 // stride, 8 // stride)
    got = ops.conv2d(x, w, b, stride, padding)
    want = F.conv2d(x, w, b, stride, padding)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    have, ref = torch.autograd.grad(got, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g)
    for h, r in zip(have, ref):
        torch.testing.assert_close(h, r, rtol=1e-4, atol=1e-4)
    assert have[1].stride() == w.stride() or size == 1  # (a 1x1 weight's strides differ only in its unit dims)


def test_conv2d_module_keeps_nn_conv2d_parameters_and_runs_the_kernel_at_avx2(monkeypatch):
    """Every Unet convolution is an ops.Conv2d (nn.Conv2d's parameters and state_dict); a training step at
    AVX2 computes its 3x3 weight gradients with the C kernel (where the library builds), at AVX-512 with oneDNN."""
    from ddpm.nn import kernels

    m = Unet(dim=16, dim_mults=(1, 2), channels=1).to(memory_format=torch.channels_last)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    assert convs and all(isinstance(m.get_submodule(n), ops.Conv2d) for n in convs)
    assert set(ops.Conv2d(16, 32, 3).state_dict()) == set(torch.nn.Conv2d(16, 32, 3).state_dict()) == {"weight", "bias"}
    calls = []
    real = kernels.conv3x3_train
    monkeypatch.setattr(kernels, "conv3x3_train", lambda *a: calls.append(real(*a)) or calls[-1])
    x = torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    mods = [m.get_submodule(n) for n in convs]
    three = [c.in_channels for c in mods if c.kernel_size == (3, 3) and c.stride == (1, 1)]
    assert len(three) == 26 and three.count(1) == 1  # the first convolution reads the image: C = 1
    for onednn in (False, True):
        monkeypatch.setattr(ops, "onednn_linear", lambda: onednn)
        m(x, torch.randint(0, 1000, (4,))).square().mean().backward()
        if not onednn:  # every 3x3 with stride 1 reaches the kernel, which takes all but C = 1
            assert len(calls) == 26
            assert kernels.library() is None or [c is not None for c in calls] == [c % 16 == 0 for c in three]
    assert len(calls) == 26  # none at AVX-512


@pytest.mark.parametrize("onednn", [True, False])
def test_sampling_convolutions_run_winograd_at_avx2(onednn, monkeypatch):
    """Without grads every 3x3 stride-1 convolution whose channels are multiples of 16 runs kernels.conv3x3 at
    AVX2 (oneDNN at AVX-512); the forward agrees with PyTorch's convolutions."""
    from ddpm.nn import kernels

    monkeypatch.setattr(ops, "onednn_linear", lambda: onednn)
    torch.manual_seed(0)
    m = Unet(dim=16, dim_mults=(1, 2), channels=1).eval().to(memory_format=torch.channels_last)
    x, t = torch.randn(3, 1, 8, 8).contiguous(memory_format=torch.channels_last), torch.tensor([10, 500, 990])
    calls = []
    real = kernels.conv3x3
    monkeypatch.setattr(kernels, "conv3x3", lambda *a: calls.append(real(*a)) or calls[-1])
    with torch.inference_mode():
        got = m(x, t)
        monkeypatch.setattr(ops, "conv2d", lambda x, w, b=None, s=1, p=0, d=1, g=1: F.conv2d(x, w, b, s, p, d, g))
        want = m(x, t)
    assert len(calls) == (0 if onednn else 26)
    if not onednn and kernels.library() is not None:
        assert sum(c is not None for c in calls) == 25  # all but the first convolution (C = 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [True, False])
def test_attention_at_few_positions_matches_sdpa(grad):
    """On a CPU at <= 64 positions the attention is written out (without grads one head at a time, the scale
    folded into q's weights); it must give SDPA's values and gradients."""
    from ddpm.nn.unet import Attention

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8)
    x = torch.randn(3, 16, 4, 4, requires_grad=grad)

    def reference(x):
        tokens = attn.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (u.unflatten(-1, (2, 8)).transpose(1, 2) for u in F.linear(tokens, attn.to_qkv.weight).chunk(3, -1))
        out = F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2), attn.to_out.weight, attn.to_out.bias)
        return x + out.transpose(1, 2).unflatten(2, (4, 4))

    with torch.set_grad_enabled(grad):
        got, want = attn(x), reference(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if grad:
        g = torch.randn_like(got)
        params = [x, *attn.parameters()]
        for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_one_t_for_the_batch_is_embedded_once_with_the_same_result():
    torch.manual_seed(0)
    m = Unet(dim=16, dim_mults=(1, 2), channels=1).eval()
    x = torch.randn(5, 1, 8, 8)
    rows = []
    m.time_mlp.register_forward_hook(lambda mod, inp, out: rows.append(out.shape[0]))
    with torch.no_grad():
        per_image = m(x, torch.full((5,), 321))
        shared = m(x, torch.full((), 321).expand(5))  # what the samplers pass
        scalar = m(x, 321)
    assert rows == [5, 1, 1]
    torch.testing.assert_close(shared, per_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scalar, shared, rtol=0, atol=0)
    xg = x.clone().requires_grad_()
    m(xg, torch.full((), 321).expand(5)).sum().backward()  # broadcasting's backward sums over the batch
    assert xg.grad.shape == x.shape and all(p.grad is not None for p in m.time_mlp.parameters())


def test_norm_scale_shift_without_affine_falls_back_to_the_module():
    from ddpm.nn.ops import norm_scale_shift

    norm = torch.nn.GroupNorm(8, 16, affine=False)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(norm_scale_shift(norm, x), norm(x))
