"""What the optimizer steps: flat parameters, fused AdamW with linear warm-up, EMA of the weights, AMP.

Split out of the training loop (``ddpm.training.loop``) so the loop holds only the order of operations.
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn


def amp_settings(device: torch.device, enabled: bool) -> tuple[Optional[torch.dtype], bool]:
    """(autocast dtype, use GradScaler): bf16 where supported, else fp16 with a scaler on CUDA."""
    if not enabled:
        return None, False
    if device.type == "cuda":
        return (torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (torch.float16, True)
    return torch.bfloat16, False


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """Linear learning-rate warm-up: lr * min(1, (step + 1) / warmup_steps); ``warmup_steps=0``: none."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def make_optimizer(params: Sequence[torch.Tensor], lr: float, betas: Sequence[float],
                   weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused: one kernel for every parameter (CPU and CUDA) instead of about ten per parameter tensor."""
    return torch.optim.AdamW(list(params), lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)


class FlatParams:
    """Trainable parameters, and their gradients, as views into one buffer each.

    The optimizer, the gradient clipping and the EMA then run one kernel on one tensor instead of one
    per parameter tensor (151 at dim 32): on a CPU, where ``foreach`` ops loop over tensors, that took
    2.7 ms of a ~100 ms training step, against 0.9 ms flat (``benchmarks/peers.py`` measures the step).
    The parameters keep their shapes, strides (channels_last too), names and values; ``param`` is what
    the optimizer steps and ``param.grad`` is the flat gradient, which backward accumulates into in place.
    """

    def __init__(self, params: list[nn.Parameter], grads: bool = True) -> None:
        self.params = params
        first = params[0]
        self.param = nn.Parameter(torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device))
        self._offsets = []
        offset = 0
        for p in params:
            self._offsets.append(offset)
            offset += p.numel()
        with torch.no_grad():
            for p, view in zip(params, self.views(self.param.data)):
                view.copy_(p)
                p.data = view
        if grads:
            self.param.grad = torch.zeros_like(self.param)
            for p, view in zip(params, self.views(self.param.grad)):
                p.grad = view

    @staticmethod
    def possible(params: list[nn.Parameter]) -> bool:
        """One buffer needs one dtype and device, and parameters that each fill their storage densely."""
        return bool(params) and all(
            p.dtype == params[0].dtype and p.device == params[0].device
            and (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)) for p in params)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` seen as one tensor per parameter, with that parameter's shape and strides."""
        return [flat.as_strided(p.shape, p.stride(), flat.storage_offset() + o) for p, o in zip(self.params, self._offsets)]

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Per-parameter tensors (e.g. a per-tensor optimizer's moments) laid out as one flat tensor."""
        flat = torch.empty_like(self.param.data)
        for view, t in zip(self.views(flat), tensors):
            view.copy_(t)
        return flat

    def zero_grad(self) -> None:
        self.param.grad.zero_()


def flat_optimizer_state(state: dict[str, Any], flat: FlatParams) -> dict[str, Any]:
    """An optimizer state_dict saved per parameter tensor (before ``FlatParams``) for the flat optimizer."""
    groups = state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(flat.params):
        return state  # not the per-tensor layout of this model: load_state_dict says what does not match
    per = [state["state"].get(i, {}) for i in groups[0]["params"]]
    if not all(per):
        return {**state, "state": {}, "param_groups": [{**groups[0], "params": [0]}]}
    moments = {k: flat.flatten([s[k] for s in per]) for k, v in per[0].items() if torch.is_tensor(v) and v.ndim > 0}
    scalars = {k: v for k, v in per[0].items() if k not in moments}
    return {"state": {0: {**scalars, **moments}}, "param_groups": [{**groups[0], "params": [0]}]}


class EMA:
    """Exponential moving average of weights with warm-up: decay_t = min(decay, (1 + t) / (warmup + t)).

    Given the model's :class:`FlatParams`, the average is kept flat too and updated in one ``lerp``.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int, flat: Optional[FlatParams] = None) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self._dst = [p for p in self.model.parameters()]
        self._dst_buf = [b for b in self.model.buffers()]
        self._src_flat, self._dst_flat = None, None
        if flat is not None:
            trainable = {id(p) for p in flat.params}
            mine = [q for p, q in zip(model.parameters(), self.model.parameters()) if id(p) in trainable]
            self._src_flat, self._dst_flat = flat.param.data, FlatParams(mine, grads=False).param.data

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (self.warmup + step))
        if self._dst_flat is not None:
            self._dst_flat.lerp_(self._src_flat, 1 - d)  # ema <- d ema + (1 - d) w
        else:
            src = [p.detach() for p in model.parameters()]
            torch._foreach_lerp_(self._dst, src, 1 - d)
        for b_dst, b_src in zip(self._dst_buf, model.buffers()):
            b_dst.copy_(b_src)
