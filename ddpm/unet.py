"""The denoising network eps_theta(x_t, t): a time-conditioned U-Net.

Shapes: ``Unet(...)(x, t)`` with ``x`` float ``[B, channels, H, W]`` and ``t`` integer (or float)
timesteps ``[B]`` (a 0-d tensor or a Python number is broadcast) -> ``[B, out_dim, H, W]``.
H and W must be multiples of ``2 ** (len(dim_mults) - 1)`` (see ``Unet.check_image_size``).
The network knows nothing of beta schedules: ``t`` only enters through a sinusoidal embedding.

Architecture after Ho et al. 2020, appendix B (PixelCNN++-style U-Net: 2 residual blocks per
resolution, GroupNorm, self-attention at low resolution, sinusoidal time embedding), with the
API of lucidrains' denoising-diffusion-pytorch ``Unet`` (v2: ``full_attn``) and the residual
block of improved-diffusion (Nichol & Dhariwal 2021: pre-activation, scale-shift norm, dropout
before the second conv).

Layout, with dims = [init_dim, dim * m for m in dim_mults] and level i mapping dims[i] -> dims[i+1]:

    x -> conv3x3 -> r (init_dim)
    down, level i: res(dims[i]) x2 [+ attn] -> downsample to dims[i+1] (conv3x3 at the last level)
    mid:           res -> attn -> res                                         (dims[-1])
    up, level i:   cat skip -> res -> dims[i+1], twice [+ attn] -> upsample to dims[i] (conv3x3 last)
    cat r -> res(2 * init_dim -> init_dim) -> conv1x1 -> out_dim
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

__all__ = ["Unet"]


def _groups(channels: int, groups: int) -> int:
    """Largest group count <= ``groups`` that divides ``channels`` (GroupNorm needs divisibility)."""
    return math.gcd(channels, groups)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p, scale the rest by
    1 / (1 - p). The mask comes from one uniform draw compared in place, which on a CPU costs less than
    ``F.dropout``'s Bernoulli sampling (measured: see README "Performance")."""
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (y = x W^T + b); on a CPU in float32, for products of ``ONEDNN_LINEAR_MIN_MACS`` or
    more, computed as a 1x1 convolution over the rows, which runs on oneDNN's kernels: MKL's sgemm,
    which F.linear calls, runs at about half their rate on AMD CPUs (2 threads, rows x 64 -> 384 at
    6,400 rows: 0.66 vs 1.52 ms forward, 3.2 vs 5.9 ms with the backward; a 2048^2 product 433 vs 212
    GFLOP/s). The same sums; the rounding may differ in the last bits."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or rows * weight.shape[0] * weight.shape[1] < ONEDNN_LINEAR_MIN_MACS):
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    cols = x.reshape(1, rows, 1, k).permute(0, 3, 1, 2)  # [1, k, rows, 1], channels_last: the same memory
    y = F.conv2d(cols, weight[:, :, None, None], bias)  # [1, out, rows, 1], channels_last
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict) whose product goes through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class SinusoidalPosEmb(nn.Module):
    """t [B] -> [B, 2 * (dim // 2)]: cat(sin(t f), cos(t f)), f_k = 10000^(-k / half) (improved-diffusion)."""

    def __init__(self, dim: int):
        super().__init__()
        half = max(dim // 2, 1)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)  # rebuilt from the config, not stored
        self.out_dim = 2 * half

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs.float()[None, :]  # float32: t * f needs it for t ~ 1000
        return torch.cat((args.sin(), args.cos()), dim=-1)


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
    (``ddpm.kernels``: channels_last float32 on a CPU; with grads its backward is one pass too); else, with
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


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv3x3, + (1x1) skip."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(dim_in, groups), dim_in)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.time_proj = nn.Sequential(nn.SiLU(), Linear(time_dim, 2 * dim_out))
        self.norm2 = nn.GroupNorm(_groups(dim_out, groups), dim_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.res_conv = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale_shift = self.time_proj(temb)  # [B or 1, 2 * dim_out]
        h = self.conv1(norm_act(self.norm1, x))
        h = norm_act(self.norm2, h, scale_shift)  # a name rebound at each step frees the map before it (sampling)
        h = self.conv2(dropout(h, self.dropout.p, self.training))
        # with grads autograd keeps each op's input, so nothing in place; sampling adds the residual in place
        return h + self.res_conv(x) if torch.is_grad_enabled() else h.add_(self.res_conv(x))


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, GroupNorm pre-norm, residual.

    Works on [B, HW, C] tokens, which is a free view of a channels_last feature map.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, groups: int = 8):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm = nn.GroupNorm(_groups(dim, groups), dim)
        self.to_qkv = Linear(dim, 3 * inner, bias=False)
        self.to_out = Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = norm_act(self.norm, x, silu=False).flatten(2).transpose(1, 2)  # [B, HW, C]
        written_out = x.device.type == "cpu" and h * w <= 64  # a CPU at a few positions: no SDPA (below)
        if written_out and not torch.is_grad_enabled():  # sampling
            out = self.to_out(self._heads_in_turn(tokens))
            return x + out.transpose(1, 2).unflatten(2, (h, w))
        # chunk, not unflatten + permute + select: the backward is then one concatenation instead of a
        # scatter into a zero tensor (that scatter kernel was 1.4 ms of a ~100 ms compiled CPU step;
        # end to end, eager training ran about 1% faster, compiled within noise)
        q, k, v = (u.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)
                   for u in self.to_qkv(tokens).chunk(3, dim=-1))
        if not written_out:
            out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, dim_head]
        else:  # a CPU at a few positions: softmax(q k^T / sqrt(d)) v (Vaswani et al. eq. 1) written out beats
            # SDPA's flash kernel, which slows down with a second thread (2 threads, 16 positions: training
            # batch 128 0.99 vs 2.81 ms forward and backward, sampling batch 400 2.0 vs 3.2 ms; 1 thread: even)
            out = torch.softmax((q @ k.transpose(-2, -1)).mul_(self.dim_head ** -0.5), dim=-1) @ v
        out = self.to_out(out.transpose(1, 2).flatten(2))  # [B, HW, C]
        return x + out.transpose(1, 2).unflatten(2, (h, w))  # channels_last-strided view

    def _heads_in_turn(self, tokens: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v (Vaswani et al. eq. 1) one head at a time, no grads: [B, HW, C] ->
        [B, HW, heads * dim_head]. Each head's q, k and v are strided column blocks of one projection, which
        ``bmm`` reads as they are, where the 4-D product first copies q, k and v into head-major order; the
        1 / sqrt(d) is folded into q's weights. Sampling batch 400 at 4x4, 2 threads: 1.1-1.4x per call, a
        forward 1.01-1.03x (README "Performance"); in training the copies' backward is cheaper than four
        heads' (1.43 vs 2.60 ms), so training keeps the 4-D form. At 16 positions (a 4x4 map) with d 16, 32
        or 64 the products run as one fused CPU kernel instead (``ddpm.kernels.attention16``: 1.7x per call)."""
        inner, d = self.heads * self.dim_head, self.dim_head
        weight = self.to_qkv.weight
        qkv = linear(tokens, torch.cat((weight[:inner] * d ** -0.5, weight[inner:])))  # [B, HW, 3 inner]
        fused = kernels.attention16(qkv, self.heads, d)  # 16 positions: all heads in one pass of C
        if fused is not None:
            return fused
        outs = []
        for i in range(self.heads):
            q, k, v = (qkv[..., j * inner + i * d: j * inner + (i + 1) * d] for j in range(3))
            outs.append(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1).bmm(v))
        return torch.cat(outs, dim=-1)


class Downsample(nn.Module):
    """Halve H and W: conv3x3 with stride 2 (Ho et al. 2020 / improved-diffusion).

    Chosen over lucidrains v2's pixel-unshuffle + conv1x1: same speed here, and pixel_unshuffle's
    backward hits an inductor stride-sorting bug under dynamic shapes (pytorch#185510).
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour then conv3x3."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Unet(nn.Module):
    """Time-conditioned U-Net, API-compatible with denoising-diffusion-pytorch's ``Unet``.

    Args:
        dim: base width; level i has ``dim * dim_mults[i]`` channels.
        init_dim: width of the first conv (default ``dim``).
        out_dim: output channels (default ``channels``).
        dim_mults: per-level width multipliers; ``len(dim_mults) - 1`` downsamplings.
        channels: input image channels.
        dropout: dropout rate inside every residual block (train mode only).
        resnet_block_groups: GroupNorm groups (reduced to gcd(groups, channels) where needed).
        attn_heads, attn_dim_head: multi-head self-attention shape (inner width = product).
        full_attn: one bool per level, self-attention at that level; default only the deepest.
            A single bool applies to all levels. The middle block always has self-attention.
        flash_attn: accepted for denoising-diffusion-pytorch compatibility; attention always goes through
            ``F.scaled_dot_product_attention``, which picks the flash kernel where the device has one.
    """

    def __init__(
        self,
        dim: int,
        init_dim: int | None = None,
        out_dim: int | None = None,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        channels: int = 3,
        dropout: float = 0.0,
        resnet_block_groups: int = 8,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
        full_attn: bool | Sequence[bool] | None = None,
        flash_attn: bool = True,
    ):
        super().__init__()
        dim_mults = tuple(int(m) for m in dim_mults)
        if not dim_mults or min(dim_mults) < 1 or dim < 1:
            raise ValueError(f"need dim >= 1 and a non-empty dim_mults of positive ints, got dim={dim}, dim_mults={dim_mults}")
        levels = len(dim_mults)
        if full_attn is None:
            full_attn = (False,) * (levels - 1) + (True,)
        elif isinstance(full_attn, bool):
            full_attn = (full_attn,) * levels
        full_attn = tuple(bool(a) for a in full_attn)
        if len(full_attn) != levels:
            raise ValueError(f"full_attn={full_attn} needs one bool per level of dim_mults={dim_mults}")
        init_dim = int(init_dim) if init_dim is not None else dim
        out_dim = int(out_dim) if out_dim is not None else channels

        self.channels, self.out_dim, self.dim_mults = channels, out_dim, dim_mults
        self.full_attn = full_attn
        # JSON-serialisable: Unet(**model.config) rebuilds the same architecture.
        self.config: dict[str, Any] = dict(
            dim=int(dim), init_dim=init_dim, out_dim=out_dim, dim_mults=list(dim_mults), channels=int(channels),
            dropout=float(dropout), resnet_block_groups=int(resnet_block_groups), attn_heads=int(attn_heads),
            attn_dim_head=int(attn_dim_head), full_attn=list(full_attn),
        )

        g, time_dim = resnet_block_groups, dim * 4
        self.init_conv = nn.Conv2d(channels, init_dim, 3, padding=1)  # 3x3, not 7x7: images may be 8x8
        self.time_pos_emb = SinusoidalPosEmb(dim)
        self.time_mlp = nn.Sequential(
            Linear(self.time_pos_emb.out_dim, time_dim), nn.GELU(), Linear(time_dim, time_dim)
        )

        def res(a: int, b: int) -> ResnetBlock:
            return ResnetBlock(a, b, time_dim, groups=g, dropout=dropout)

        def attn(c: int, on: bool) -> nn.Module:
            return Attention(c, attn_heads, attn_dim_head, groups=g) if on else nn.Identity()

        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for i, ((d_in, d_out), a) in enumerate(zip(in_out, full_attn)):
            last = i == levels - 1
            self.downs.append(nn.ModuleList([
                res(d_in, d_in), res(d_in, d_in), attn(d_in, a),
                nn.Conv2d(d_in, d_out, 3, padding=1) if last else Downsample(d_in, d_out),
            ]))
        mid = dims[-1]
        self.mid_block1, self.mid_attn, self.mid_block2 = res(mid, mid), attn(mid, True), res(mid, mid)
        for i, ((d_in, d_out), a) in enumerate(zip(reversed(in_out), reversed(full_attn))):
            last = i == levels - 1
            self.ups.append(nn.ModuleList([
                res(d_out + d_in, d_out), res(d_out + d_in, d_out), attn(d_out, a),
                nn.Conv2d(d_out, d_in, 3, padding=1) if last else Upsample(d_out, d_in),
            ]))
        self.final_res_block = res(2 * init_dim, init_dim)
        self.final_conv = nn.Conv2d(init_dim, out_dim, 1)

    # ---- image-size validation (pure Python on shapes: no host-device sync) ----
    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this: 2 ** (number of downsamplings)."""
        return 2 ** (len(self.dim_mults) - 1)

    def check_image_size(self, image_size: int | Sequence[int]) -> None:
        """Raise ValueError unless an ``image_size`` (int or (h, w)) fits this network."""
        square = isinstance(image_size, numbers.Integral)
        hw = (image_size, image_size) if square else tuple(image_size)
        f, n = self.downsample_factor, len(self.dim_mults) - 1
        if len(hw) != 2 or any(s < 1 or s % f for s in hw):
            given = int(image_size) if square else hw
            raise ValueError(
                f"image_size {given} is not allowed by dim_mults={self.dim_mults}: height and width must be "
                f"multiples of {f} ({n} downsampling{'' if n == 1 else 's'}), e.g. {f}, {2 * f}, {3 * f}, {4 * f}"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor | int | float) -> torch.Tensor:
        """x [B, channels, H, W], t [B] timesteps (int or float; one number for all) -> [B, out_dim, H, W]."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected x of shape [B, {self.channels}, H, W], got {tuple(x.shape)}")
        self.check_image_size((x.shape[-2], x.shape[-1]))
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        elif t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape [{x.shape[0]}], got {tuple(t.shape)}")

        # one t for the whole batch (a 0-d t, or a stride-0 view of one, as the samplers pass it): embed it once
        # and let the blocks' scale-shift broadcast it (at batch 400 the time projections cost 2 ms a forward)
        if t.shape[0] > 1 and t.stride(0) == 0:
            t = t[:1]
        temb = self.time_mlp(self.time_pos_emb(t).to(self.time_mlp[0].weight.dtype))
        x = self.init_conv(x)
        r = x
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, temb)
            skips.append(x)
            x = attn(block2(x, temb))
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, temb)), temb)
        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), temb)
            x = attn(block2(torch.cat((x, skips.pop()), dim=1), temb))
            x = up(x)
        x = self.final_res_block(torch.cat((x, r), dim=1), temb)
        return self.final_conv(x)
