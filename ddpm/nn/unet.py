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

from ddpm.nn import ops

__all__ = ["Unet"]


def _groups(channels: int, groups: int) -> int:
    """Largest group count <= ``groups`` that divides ``channels`` (GroupNorm needs divisibility)."""
    return math.gcd(channels, groups)


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


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv3x3, + (1x1) skip."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(dim_in, groups), dim_in)
        self.conv1 = ops.Conv2d(dim_in, dim_out, 3, padding=1)
        self.time_proj = nn.Sequential(nn.SiLU(), ops.Linear(time_dim, 2 * dim_out))
        self.norm2 = nn.GroupNorm(_groups(dim_out, groups), dim_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = ops.Conv2d(dim_out, dim_out, 3, padding=1)
        self.res_conv = ops.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale_shift = self.time_proj(temb)  # [B or 1, 2 * dim_out]
        h = self.conv1(ops.norm_act(self.norm1, x))
        h = ops.norm_act(self.norm2, h, scale_shift)  # a name rebound at each step frees the map before it (sampling)
        h = self.conv2(ops.dropout(h, self.dropout.p, self.training))
        # with grads autograd keeps each op's input, so nothing in place; sampling adds the residual in place
        return h + self.res_conv(x) if torch.is_grad_enabled() else h.add_(self.res_conv(x))


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, GroupNorm pre-norm, residual.

    Works on [B, HW, C] tokens, which is a free view of a channels_last feature map; the products run in
    :func:`ddpm.nn.ops.attention` (the CPU dispatch).
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, groups: int = 8):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm = nn.GroupNorm(_groups(dim, groups), dim)
        self.to_qkv = ops.Linear(dim, 3 * inner, bias=False)
        self.to_out = ops.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = ops.norm_act(self.norm, x, silu=False).flatten(2).transpose(1, 2)  # [B, HW, C]
        out = self.to_out(ops.attention(tokens, self.to_qkv.weight, self.heads, self.dim_head))  # [B, HW, C]
        return x + out.transpose(1, 2).unflatten(2, (h, w))  # channels_last-strided view


class Downsample(nn.Module):
    """Halve H and W: conv3x3 with stride 2 (Ho et al. 2020 / improved-diffusion).

    Chosen over lucidrains v2's pixel-unshuffle + conv1x1: same speed here, and pixel_unshuffle's
    backward hits an inductor stride-sorting bug under dynamic shapes (pytorch#185510).
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = ops.Conv2d(dim_in, dim_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour then conv3x3."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.conv = ops.Conv2d(dim_in, dim_out, 3, padding=1)

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
        learned_variance: output 2 * channels (default ``out_dim``) for a learned Sigma.
        flash_attn: accepted for denoising-diffusion-pytorch compatibility and ignored: the attention kernel is
            chosen per device by ``ddpm.nn.ops.attention``.
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
        learned_variance: bool = False,
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
        # learned variance (denoising-diffusion-pytorch's argument): 2C outputs, the prediction then v of
        # Nichol & Dhariwal eq. 15; recorded as out_dim in ``config``
        out_dim = int(out_dim) if out_dim is not None else channels * (2 if learned_variance else 1)

        self.channels, self.out_dim, self.dim_mults = channels, out_dim, dim_mults
        self.full_attn = full_attn
        # JSON-serialisable: Unet(**model.config) rebuilds the same architecture.
        self.config: dict[str, Any] = dict(
            dim=int(dim), init_dim=init_dim, out_dim=out_dim, dim_mults=list(dim_mults), channels=int(channels),
            dropout=float(dropout), resnet_block_groups=int(resnet_block_groups), attn_heads=int(attn_heads),
            attn_dim_head=int(attn_dim_head), full_attn=list(full_attn),
        )

        g, time_dim = resnet_block_groups, dim * 4
        self.init_conv = ops.Conv2d(channels, init_dim, 3, padding=1)  # 3x3, not 7x7: images may be 8x8
        self.time_pos_emb = SinusoidalPosEmb(dim)
        self.time_mlp = nn.Sequential(
            ops.Linear(self.time_pos_emb.out_dim, time_dim), nn.GELU(), ops.Linear(time_dim, time_dim)
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
                ops.Conv2d(d_in, d_out, 3, padding=1) if last else Downsample(d_in, d_out),
            ]))
        mid = dims[-1]
        self.mid_block1, self.mid_attn, self.mid_block2 = res(mid, mid), attn(mid, True), res(mid, mid)
        for i, ((d_in, d_out), a) in enumerate(zip(reversed(in_out), reversed(full_attn))):
            last = i == levels - 1
            self.ups.append(nn.ModuleList([
                res(d_out + d_in, d_out), res(d_out + d_in, d_out), attn(d_out, a),
                ops.Conv2d(d_out, d_in, 3, padding=1) if last else Upsample(d_out, d_in),
            ]))
        self.final_res_block = res(2 * init_dim, init_dim)
        self.final_conv = ops.Conv2d(init_dim, out_dim, 1)

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
