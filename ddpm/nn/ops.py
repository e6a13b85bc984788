"""The network's CPU ops: where each of the UNet's costly operations runs, behind one switch.

Each function computes what its docstring's formula says on any device; on a CPU it picks the fastest of
PyTorch's kernels, oneDNN through a 1x1 convolution, and the fused C kernels of :mod:`ddpm.nn.kernels`
(``kernels.disable()``, or ``fast: false`` in params.yaml, turns the C kernels off; the choice is recorded by
``kernels.kernel_record()``). The measurements behind each choice are in docs/performance.md.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.nn import kernels


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p, scale the rest by
    1 / (1 - p). The mask comes from one uniform draw compared in place, which on a CPU costs less than
    ``F.dropout``'s Bernoulli sampling (measured: see docs/performance.md)."""
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0
    keep = torch.rand_like(x).ge_(p).div_(1 - p)  # U >= p with probability 1 - p
    return x * keep


# Below this many multiply-adds (rows x in x out) a CPU matrix product stays with F.linear (MKL's sgemm):
# oneDNN's convolution costs a few microseconds more to set up (measured, 2 threads: 128 x 128 x 128
# 29.5 vs 23.3 us, 400 x 128 x 256 89.5 vs 126.1 us).
ONEDNN_LINEAR_MIN_MACS = 8 << 20


@functools.cache
def onednn_linear() -> bool:
    """Whether large float32 CPU products run on oneDNN (a 1x1 convolution) rather than MKL's sgemm: where
    PyTorch's own kernels run AVX-512. MKL runs AVX2 code on AMD's AVX-512 CPUs, half oneDNN's rate there
    (AMD Zen 5, 2 threads: a 2048^2 product 212 vs 433 GFLOP/s; rows x 64 -> 384 at 6,400 rows 3.2 vs 5.9 ms
    forward and backward). At AVX2 both run the same width, and MKL's backward of these shapes is twice
    oneDNN's 1x1 convolution's (AVX2 AMD EPYC, 2 threads, forward and backward: 2,048 x 64 -> 384 2.06 vs
    3.78 ms, 6,400 rows 6.5 vs 12.6 ms; forward alone 0.59 vs 0.67 ms). Follows ``ATEN_CPU_CAPABILITY``,
    so ``kernel_record()["aten_isa"]`` names the choice."""
    return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (y = x W^T + b); on an AVX-512 CPU (:func:`onednn_linear`) in float32, for products of
    ``ONEDNN_LINEAR_MIN_MACS`` or more, computed as a 1x1 convolution over the rows, which runs on oneDNN's
    kernels. The same sums; the rounding may differ in the last bits."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or rows * weight.shape[0] * weight.shape[1] < ONEDNN_LINEAR_MIN_MACS or not onednn_linear()):
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    cols = x.reshape(1, rows, 1, k).permute(0, 3, 1, 2)  # [1, k, rows, 1], channels_last: the same memory
    y = F.conv2d(cols, weight[:, :, None, None], bias)  # [1, out, rows, 1], channels_last
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def conv_kernels() -> bool:
    """Whether :func:`conv2d` runs the C convolution kernels (``kernels.conv3x3`` and ``kernels.conv3x3_train``):
    where PyTorch's own kernels run AVX2, not AVX-512 (not :func:`onednn_linear`: oneDNN keeps them there), and
    the library is built."""
    return not onednn_linear() and kernels.library() is not None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d``. In training (grads on) of a channels_last float32 map on a CPU, two cases run elsewhere, the
    same sums (rounded alike: tests/test_unet.py):

    - a 1x1 convolution (stride 1, no padding) as a product over the channels, :func:`linear`: MKL's backward
      beats oneDNN's there (AVX2 AMD EPYC, 2 threads, batch 128, forward and backward: 64 -> 32 at 8x8 1.08 vs
      1.30 ms, 96 -> 64 at 4x4 0.69 vs 0.92, 32 -> 1 at 8x8 0.31 vs 0.50); sampling is even (0.67 vs 0.70 ms);
    - a 3x3 convolution (stride 1, padding 1, C a multiple of 16, maps up to 32x32) where PyTorch's kernels run
      AVX2 rather than AVX-512 (:func:`conv_kernels`): the weight's gradient from ``kernels.conv3x3_train``,
      1.3-2.2x oneDNN's backward of the weights at batch 128 (at the dim-32 model's shapes 153-183 against
      81-114 GFLOP/s; 1.08-1.24x at 16x16 and 32x32), which oneDNN runs at AVX-512.

    Without grads (sampling), the same 3x3 convolutions at AVX2 (O a multiple of 16 too, maps up to 32x32) run
    by Winograd's F(2x2, 3x3) in C, ``kernels.conv3x3``: 16 products per output tile where the direct form has 36,
    1.45-1.73x oneDNN's direct convolution at batch 400 (which runs near this CPU's peak, 190-220 GFLOP/s;
    1.31-1.65x at 16x16 and 32x32), with a smaller error against float64 (2-3e-7 relative, oneDNN's 4-11e-7)."""
    pair = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))
    if (x.ndim == 4 and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and groups == 1 and pair(dilation) == (1, 1) and pair(stride) == (1, 1)
            and x.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_compiling()):
        size, pad, grad = tuple(weight.shape[2:]), pair(padding), torch.is_grad_enabled()
        if size == (1, 1) and pad == (0, 0) and grad:
            return linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
        if size == (3, 3) and pad == (1, 1) and conv_kernels():
            y = kernels.conv3x3_train(x, weight, bias) if grad else kernels.conv3x3(x, weight, bias)
            if y is not None:
                return y
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state_dict) whose zero-padded convolution goes through :func:`conv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict) whose product goes through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def norm_scale_shift(norm: nn.GroupNorm, x: torch.Tensor, scale: torch.Tensor | None = None,
                     shift: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` (the scale-shift optional), for sampling: no grads, a new tensor.

    For a channels_last CPU map with <= 4 channels per group, PyTorch's NHWC GroupNorm kernel runs at a
    third to half the speed of its NCHW one (batch 400 at 8x8: 294 vs 82 us at 16 channels); there the
    statistics come from per-channel sums and the normalisation, affine and scale-shift are one addcmul
    (136 us at 16 channels, 187 vs 294 at 32). The variance is E[x^2] - E[x]^2, as the NHWC kernel
    computes it too. Elsewhere the module itself, then the scale-shift in place."""
    b, c = x.shape[:2]
    if x.device.type != "cpu" or x.ndim != 4 or c // norm.num_groups > 4 or norm.weight is None \
            or not x.is_contiguous(memory_format=torch.channels_last):
        h = norm(x)
        return h if scale is None else h.mul_(1 + scale).add_(shift)
    g, n = norm.num_groups, x[0].numel() // norm.num_groups  # elements per group
    mean = x.sum(dim=(2, 3)).view(b, g, -1).sum(-1).div_(n)  # [B, G]
    var = (x * x).sum(dim=(2, 3)).view(b, g, -1).sum(-1).div_(n).sub_(mean * mean).clamp_min_(0)
    rstd = var.add_(norm.eps).rsqrt_()
    a = rstd.repeat_interleave(c // g, dim=1) * norm.weight  # [B, C]: y = a x + (bias - mean a)
    bias = norm.bias - mean.repeat_interleave(c // g, dim=1) * a
    a, bias = a[:, :, None, None], bias[:, :, None, None]
    if scale is not None:  # (a x + bias) (1 + scale) + shift
        a, bias = a * (1 + scale), torch.addcmul(shift, bias, 1 + scale)
    return torch.addcmul(bias, x, a)


def norm_act(norm: nn.GroupNorm, x: torch.Tensor, scale_shift: torch.Tensor | None = None,
             silu: bool = True) -> torch.Tensor:
    """``act(norm(x) * (1 + scale) + shift)`` with ``scale_shift`` None or the time projection's [1 or B, 2C]
    (scale, then shift) and act SiLU or none. One pass of the fused CPU kernel where it applies
    (``ddpm.nn.kernels``: channels_last float32 on a CPU; with grads its backward is one pass too); else, with
    grads, PyTorch's ops each writing a new tensor, and without, :func:`norm_scale_shift` and SiLU in place."""
    if torch.is_grad_enabled():
        y = kernels.group_norm_act_train(x, norm, scale_shift, silu)
        if y is None:
            y = norm(x)
            if scale_shift is not None:
                scale, shift = scale_shift[:, :, None, None].chunk(2, dim=1)
                y = y * (1 + scale) + shift
            y = F.silu(y) if silu else y
        return y
    y = kernels.group_norm_act(x, norm, scale_shift, silu)
    if y is None:
        scale, shift = (None, None) if scale_shift is None else scale_shift[:, :, None, None].chunk(2, dim=1)
        y = norm_scale_shift(norm, x, scale, shift)
        y = F.silu(y, inplace=True) if silu else y
    return y


def attention(tokens: torch.Tensor, qkv_weight: torch.Tensor, heads: int, dim_head: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. eq. 1) of [B, HW, C] tokens with q, k, v = tokens W^T
    (``qkv_weight`` [3 * heads * dim_head, C], no bias) -> [B, HW, heads * dim_head], heads concatenated.
    A CPU at <= 64 positions writes the products out (sampling: :func:`heads_in_turn`; training at 16 positions:
    one fused C kernel forward and backward, ``kernels.attention16_train``, 2.7x PyTorch's ops at batch 128, 4
    heads of 32: 0.94 vs 2.55 ms); elsewhere ``F.scaled_dot_product_attention``."""
    written_out = tokens.device.type == "cpu" and tokens.shape[1] <= 64  # a CPU at a few positions: no SDPA
    if written_out and not torch.is_grad_enabled():  # sampling
        return heads_in_turn(tokens, qkv_weight, heads, dim_head)
    qkv = linear(tokens, qkv_weight)
    if written_out:  # training at 16 positions: forward and backward one pass of C per head
        fused = kernels.attention16_train(qkv, heads, dim_head)
        if fused is not None:
            return fused
    # chunk, not unflatten + permute + select: the backward is then one concatenation instead of a
    # scatter into a zero tensor (that scatter kernel was 1.4 ms of a ~100 ms compiled CPU step;
    # end to end, eager training ran about 1% faster, compiled within noise)
    q, k, v = (u.unflatten(-1, (heads, dim_head)).transpose(1, 2) for u in qkv.chunk(3, dim=-1))
    if not written_out:
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, dim_head]
    else:  # a CPU at a few positions: the products written out beat SDPA's CPU kernel, which slows down
        # with a second thread (2 threads, 16 positions: training batch 128 0.99 vs 2.81 ms forward and
        # backward, sampling batch 400 2.0 vs 3.2 ms; 1 thread: even)
        out = torch.softmax((q @ k.transpose(-2, -1)).mul_(dim_head ** -0.5), dim=-1) @ v
    return out.transpose(1, 2).flatten(2)


def heads_in_turn(tokens: torch.Tensor, qkv_weight: torch.Tensor, heads: int, dim_head: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. eq. 1) one head at a time, no grads: [B, HW, C] ->
    [B, HW, heads * dim_head]. Each head's q, k and v are strided column blocks of one projection, which
    ``bmm`` reads as they are, where the 4-D product first copies q, k and v into head-major order; the
    1 / sqrt(d) is folded into q's weights. Sampling batch 400 at 4x4, 2 threads: 1.1-1.4x per call, a
    forward 1.01-1.03x (docs/performance.md); in training the copies' backward is cheaper than four
    heads' (1.43 vs 2.60 ms), so training keeps the 4-D form (at 16 positions: the fused kernel). At 16
    positions (a 4x4 map) with d 16, 32 or 64 the products run as one fused CPU kernel instead
    (``ddpm.nn.kernels.attention16``: 1.7x per call)."""
    inner, d = heads * dim_head, dim_head
    qkv = linear(tokens, torch.cat((qkv_weight[:inner] * d ** -0.5, qkv_weight[inner:])))  # [B, HW, 3 inner]
    fused = kernels.attention16(qkv, heads, d)  # 16 positions: all heads in one pass of C
    if fused is not None:
        return fused
    outs = []
    for i in range(heads):
        q, k, v = (qkv[..., j * inner + i * d: j * inner + (i + 1) * d] for j in range(3))
        outs.append(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1).bmm(v))
    return torch.cat(outs, dim=-1)
