"""Typed experiment configuration: the ONE place ``params.yaml`` is read and validated.

``load_params(path)`` returns a :class:`Params` tree of frozen dataclasses, one per section of
``params.yaml``. Every problem (unknown or misspelt key, missing key, wrong type, value out of
range, combinations that cannot work) is collected and raised together in one :class:`ConfigError`,
one line per problem naming the key, the value given and what is allowed, before any work starts.
Every key must be present in the file; the dataclass defaults (kept equal to the shipped
``params.yaml``) serve code that builds a configuration by hand.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import reprlib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ddpm import limits
from ddpm.diffusion.grids import timestep_grid
from ddpm.app.names import DATASETS, MULTISTEP_RULES, OBJECTIVES, SCHEDULES, SPACINGS, STEP_RULES, VARIANCES

FEATURIZERS = ("classifier", "inception")
NATIVE_SIZES = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32}  # `folder`: known only once read
DATASET_SIZES = {"digits": 1797, "mnist": 60000, "fashion_mnist": 60000, "cifar10": 50000}  # train splits
MAX_INT = 2**63 - 1  # int64: beyond it numpy and torch overflow deep inside
MAX_SEED = 2**32 - 1  # numpy's legacy seeding and torch.manual_seed both accept [0, 2**32)
MAX_TIMESTEPS = 100_000  # also bounds a model file's description (ddpm.training.checkpoint)
DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]{1,2})?")
# Bounds on the file itself, checked on its YAML events before anything is built: a few KB of anchors and
# aliases (a "billion laughs") would otherwise expand to gigabytes, and deep nesting overflows the stack.
MAX_YAML_BYTES = 1 << 20  # the shipped params.yaml is about 6 KB
MAX_YAML_NODES = 10_000  # after expanding aliases; the shipped file has about 100
MAX_YAML_DEPTH = 16  # the shipped file nests 3 deep
# The experiment grid: each (schedule, training seed, sample set) is a DVC stage, and `dvc status` slows with
# their number (36,900 stages had not finished in 180 s); 18 ship.
MAX_SEEDS, MAX_SAMPLERS, MAX_SAMPLE_SETS = 64, 64, 512
_SHOW = reprlib.Repr()
_SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 80, 80, 60
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = 10


def show(value: Any) -> str:
    """A bounded repr for error messages: a value never prints in full (an expanded YAML bomb, a 10^6 list)."""
    r = _SHOW.repr(value)
    return r if len(r) <= 200 else r[:197] + "..."


Need = Callable[[bool, str, Any, str], None]  # need(cond, key, value, allowed): records a problem


class ConfigError(ValueError):
    """Invalid parameters; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "params.yaml") -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in {source}:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # one of DATASETS
    root: str = "data/raw"  # torchvision download folder, or the image folder for `folder`
    image_size: Optional[int] = None  # resize to this size; None keeps the native size
    channels: Optional[int] = None  # 1 or 3; None keeps the native channels
    holdout_fraction: float = 0.25  # real images kept out of training: featurizer validation, FID floor


@dataclass(frozen=True)
class FeaturizerConfig:
    kind: str = "classifier"  # classifier (trained on the labelled train split) | inception (pytorch-fid)
    feature_dim: int = 32
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-2
    inception_weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth; None: torch hub cache


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 16
    dim_mults: tuple[int, ...] = (1, 2)
    dropout: float = 0.1
    attn_heads: int = 4
    attn_dim_head: int = 32


@dataclass(frozen=True)
class DiffusionConfig:
    schedules: tuple[str, ...] = ("linear", "cosine", "sigmoid")
    objective: str = "pred_noise"
    zero_terminal_snr: bool = False
    min_snr_gamma: Optional[float] = None
    clip_denoised: bool = True
    variance: str = "fixed_small"  # fixed_small | fixed_large | learned_range (L_hybrid, Nichol & Dhariwal)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1200
    batch_size: int = 64  # global batch per optimizer step (split over grad_accum micro-batches)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear learning-rate warm-up
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    ema_decay: float = 0.999
    ema_warmup: int = 10  # decay_t = min(ema_decay, (1 + t) / (ema_warmup + t)); 1 disables the warm-up
    ema_every: int = 1
    amp: bool = False  # bf16 autocast where supported (fp16 + GradScaler on CUDA without bf16)
    horizontal_flip: bool = False
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    fid_every: int = 500  # FID of the EMA model during training; 0 turns it off
    fid_samples: int = 200
    fid_sampling_steps: int = 50  # DDIM (eta = 0) steps for the FID curve
    nproc_per_node: int = 1  # > 1: DistributedDataParallel under torchrun; batch_size stays the global batch


@dataclass(frozen=True)
class SamplerConfig:
    """One sample set, drawn from every schedule x training seed's model: a step rule, its eta (DDIM) and its
    step count, written in params.yaml
    as the sample file's stem ``<name>-eta<eta>-<steps>`` (e.g. ``ddim-eta0.0-50``): DVC then names each
    sample stage by its set, so adding or removing a set never reruns another."""

    name: str = "ddpm"
    eta: float = 0.0
    steps: int = 100

    @property
    def key(self) -> str:
        return f"{self.name}-eta{float(self.eta)!r}-{self.steps}"


SAMPLER_SPELLING = re.compile(r"(?P<name>[a-z_0-9]+)-eta(?P<eta>[0-9.]+)-(?P<steps>[0-9]+)")


def _parse_sampler(value: Any, key: str, problems: list[str]) -> Optional[SamplerConfig]:
    """``ddim-eta0.0-50`` -> SamplerConfig("ddim", 0.0, 50); the spelling must round-trip exactly."""
    if isinstance(value, dict):  # a Params.to_dict() read back
        return _build(SamplerConfig, value, key, problems)
    m = SAMPLER_SPELLING.fullmatch(value) if isinstance(value, str) else None
    sc = None
    if m:
        try:
            sc = SamplerConfig(m["name"], float(m["eta"]), int(m["steps"]))
        except ValueError:
            sc = None
    if sc is None or sc.key != value:
        problems.append(f"{key}: got {show(value)}; allowed: <rule>-eta<eta as a float>-<steps>, e.g. ddim-eta0.0-50 "
                        "or dpmpp_2m-eta0.0-10 (the sample file's name)")
        return None
    return sc


@dataclass(frozen=True)
class SampleConfig:
    samplers: tuple[SamplerConfig, ...] = tuple(SamplerConfig(n, 0.0, k) for n in ("ddpm", "ddim", "dpmpp_2m")
                                                for k in (10, 20))  # a full factorial: sampler x steps
    spacing: str = "linspace"  # timestep grid of every rule: linspace | trailing | leading (diffusers' definitions)
    n_samples: int = 2000  # images per sample set; every FID uses this count (may exceed the held-out set)
    batch_size: int = 400
    nproc_per_node: int = 1  # > 1: chunks split over torchrun processes, merged in order (same images)


@dataclass(frozen=True)
class NllConfig:
    estimator: str = "stratified"  # stratified (prior + decoder exact, n_t strata of t) | exact (all T terms)
    n_t: int = 16  # strata of t = 1..T-1 (stratified); one t per stratum per image
    images: int = 449  # held-out images scored (the first ones); every model scores the same images


@dataclass(frozen=True)
class ReportConfig:
    grid_images: int = 64
    grid_scale: int = 4
    forward_images: int = 6


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    experiment: str = "ddpm"


@dataclass(frozen=True)
class Params:
    seed: int = 0
    seeds: tuple[int, ...] = (0,)  # training seeds: one model per schedule and seed (init, data order, noise)
    timesteps: int = 1000
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    fast: bool = True  # channels_last and the fused CPU kernels; on CUDA torch.compile + bf16 autocast (ddpm/nn/speed.py)
    data: DataConfig = field(default_factory=DataConfig)
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    nll: NllConfig = field(default_factory=NllConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalars (lists as JSON), e.g. for MLflow params: ``{"train.lr": 0.001, ...}``."""
        out: dict[str, Any] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else k, x)
            else:
                out[prefix] = json.dumps(v) if isinstance(v, list) else v

        walk("", self.to_dict())
        return out

    def params_hash(self, keys: tuple[str, ...]) -> str:
        """A stable hash of the values under the given dotted keys (as dvc.yaml lists a stage's params)."""
        flat = self.flat()
        picked = {k: v for k, v in flat.items() if any(k == key or k.startswith(key + ".") for key in keys)}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# --- building dataclasses from plain dicts, collecting every problem ------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _convert(value, inner, key, problems)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list of {_type_name(typing.get_args(tp)[0])}, got {show(value)}")
            return ()
        inner = typing.get_args(tp)[0]
        return tuple(_convert(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if tp is SamplerConfig:
        return _parse_sampler(value, key, problems)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        problems.append(f"{key}: expected {_type_name(tp)}, got {show(value)}")
        return None
    if tp is float and not math.isfinite(value):
        problems.append(f"{key}: got {show(value)}; allowed: a finite number")
        return None
    if tp is int and not -MAX_INT <= value <= MAX_INT:
        problems.append(f"{key}: got {show(value)}; allowed: an integer of at most {MAX_INT} in magnitude")
        return None
    return float(value) if tp is float else value


def _build(cls: Any, raw: Any, prefix: str, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'params'}: expected a mapping, got {show(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {_join(prefix, close[0])!r}?" if close else ""
            problems.append(
                f"{_join(prefix, show(key) if not isinstance(key, str) else key[:80])}: unknown key{hint} (known keys here: {', '.join(fields)})"
            )
    if cls is SamplerConfig and "eta" in raw and not isinstance(raw["eta"], float):
        problems.append(f"{_join(prefix, 'eta')}: got {show(raw['eta'])}; write it as a float (e.g. 0.0 or 0.5): "
                        "dvc.yaml names the sample files from it")
    kwargs = {}
    for name in fields:
        if name not in raw:
            problems.append(f"{_join(prefix, name)}: missing key (expected {_type_name(hints[name])})")
        else:
            v = _convert(raw[name], hints[name], _join(prefix, name), problems)
            if v is not None or raw[name] is None:
                kwargs[name] = v
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - all fields have defaults
        problems.append(f"{prefix}: {err}")
        return cls()


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _check(p: Params, problems: list[str]) -> None:
    """Every range and combination check, one line per problem (key, value given, what is allowed)."""
    def need(cond: bool, key: str, value: Any, allowed: str) -> None:
        if not cond:
            problems.append(f"{key}: got {show(value)}; allowed: {allowed}")

    for check in (_check_top, _check_data_and_model, _check_diffusion, _check_train, _check_sample,
                  _check_nll, _check_report_and_tracking, _check_grid):
        check(p, need, problems)
    if not problems:  # the estimate needs valid sizes
        _check_memory(p, problems)


def _check_grid(p: Params, need: Need, problems: list[str]) -> None:
    """Each list, and the grid they span (one DVC sample stage per cell), is bounded."""
    need(len(p.seeds) <= MAX_SEEDS, "seeds", f"a list of {len(p.seeds)}", f"at most {MAX_SEEDS} training seeds")
    s = p.sample.samplers
    need(len(s) <= MAX_SAMPLERS, "sample.samplers", f"a list of {len(s)}", f"at most {MAX_SAMPLERS} sample sets")
    cells = len(p.seeds) * len(p.diffusion.schedules) * len(s)
    need(cells <= MAX_SAMPLE_SETS, "seeds x diffusion.schedules x sample.samplers",
         f"{len(p.seeds)} x {len(p.diffusion.schedules)} x {len(s)} = {cells} sample stages",
         f"at most {MAX_SAMPLE_SETS} (ddpm.app.config.MAX_SAMPLE_SETS; split the grid over experiments)")


def _check_memory(p: Params, problems: list[str]) -> None:
    """Training and sampling memory, estimated from the UNet's structure (ddpm.limits), against the budget."""
    size = p.data.image_size or NATIVE_SIZES.get(p.data.name)
    if size is None:  # a folder at its native size: known once read (ddpm.data.datasets checks the decoded bytes)
        size = 2 ** (len(p.model.dim_mults) - 1)
    m, t, s = p.model, p.train, p.sample
    config = dict(dim=m.dim, dim_mults=list(m.dim_mults), channels=p.data.channels or 3,
                  attn_heads=m.attn_heads, attn_dim_head=m.attn_dim_head)
    est = limits.unet_size(config, (size, size))
    what = (f"the UNet of model.dim={m.dim}, model.dim_mults={list(m.dim_mults)} ({limits.count(est['params'])} "
            f"parameters) at data.image_size={size}")
    for line in (
        limits.check_budget(limits.training_bytes(est, t.batch_size // t.grad_accum, t.nproc_per_node),
                            f"{what}: training with train.batch_size={t.batch_size} / train.grad_accum={t.grad_accum}"),
        limits.check_budget(limits.sampling_bytes(est, min(s.batch_size, s.n_samples), s.nproc_per_node),
                            f"{what}: sampling with sample.batch_size={s.batch_size}"),
    ):
        if line:
            problems.append(line)


def _check_top(p: Params, need: Need, problems: list[str]) -> None:
    need(0 <= p.seed <= MAX_SEED, "seed", p.seed, f"an integer in [0, {MAX_SEED}]")
    need(p.timesteps >= 1, "timesteps", p.timesteps, "an integer >= 1")
    need(len(p.seeds) >= 1 and len(set(p.seeds)) == len(p.seeds) and all(0 <= k <= MAX_SEED for k in p.seeds),
         "seeds", list(p.seeds), f"a non-empty list of distinct integers in [0, {MAX_SEED}]")
    need(p.timesteps <= MAX_TIMESTEPS, "timesteps", p.timesteps, f"an integer in [1, {MAX_TIMESTEPS}]")
    need(DEVICE_RE.fullmatch(p.device) is not None, "device", p.device, "auto, cpu, cuda or cuda:N")


def _check_data_and_model(p: Params, need: Need, problems: list[str]) -> None:
    d = p.data
    need(d.name in DATASETS, "data.name", d.name, ", ".join(DATASETS))
    need(d.image_size is None or 4 <= d.image_size <= 1024, "data.image_size", d.image_size,
         "null or an integer in [4, 1024]")
    need(d.channels in (None, 1, 3), "data.channels", d.channels, "null, 1 or 3")
    need(0 < d.holdout_fraction < 1, "data.holdout_fraction", d.holdout_fraction, "a number in (0, 1)")
    f = p.featurizer
    need(f.kind in FEATURIZERS, "featurizer.kind", f.kind, ", ".join(FEATURIZERS))
    need(f.feature_dim >= 2, "featurizer.feature_dim", f.feature_dim, "an integer >= 2")
    need(f.epochs >= 1, "featurizer.epochs", f.epochs, "an integer >= 1")
    need(f.batch_size >= 1, "featurizer.batch_size", f.batch_size, "an integer >= 1")
    need(f.lr > 0, "featurizer.lr", f.lr, "a number > 0")
    m = p.model
    need(m.dim >= 1, "model.dim", m.dim, "an integer >= 1")
    need(len(m.dim_mults) >= 1 and all(x >= 1 for x in m.dim_mults), "model.dim_mults", list(m.dim_mults),
         "a non-empty list of integers >= 1")
    need(0 <= m.dropout < 1, "model.dropout", m.dropout, "a number in [0, 1)")
    need(m.attn_heads >= 1, "model.attn_heads", m.attn_heads, "an integer >= 1")
    need(m.attn_dim_head >= 1, "model.attn_dim_head", m.attn_dim_head, "an integer >= 1")
    size = d.image_size if d.image_size is not None else NATIVE_SIZES.get(d.name)
    if size is not None and m.dim_mults:
        div = 2 ** (len(m.dim_mults) - 1)
        given = d.image_size if d.image_size is not None else f"null ({d.name} images are {size}x{size})"
        need(size % div == 0, "data.image_size", given,
             f"a multiple of {div} for model.dim_mults={list(m.dim_mults)} ({len(m.dim_mults) - 1} downsamplings); "
             "set data.image_size or use fewer dim_mults")


def _check_diffusion(p: Params, need: Need, problems: list[str]) -> None:
    df = p.diffusion
    need(len(df.schedules) >= 1, "diffusion.schedules", list(df.schedules), "a non-empty list")
    for i, s in enumerate(df.schedules):
        need(s in SCHEDULES, f"diffusion.schedules[{i}]", s, ", ".join(SCHEDULES))
    need(len(set(df.schedules)) == len(df.schedules), "diffusion.schedules", list(df.schedules), "distinct names")
    need(df.objective in OBJECTIVES, "diffusion.objective", df.objective, ", ".join(OBJECTIVES))
    need(df.variance in VARIANCES, "diffusion.variance", df.variance, ", ".join(VARIANCES))
    need(df.min_snr_gamma is None or df.min_snr_gamma > 0, "diffusion.min_snr_gamma", df.min_snr_gamma,
         "null or a number > 0")
    need(not (df.zero_terminal_snr and df.objective == "pred_noise"), "diffusion.zero_terminal_snr",
         df.zero_terminal_snr, "true only with objective pred_v or pred_x0 (x0 is undefined from noise at SNR 0)")


def _check_train(p: Params, need: Need, problems: list[str]) -> None:
    t = p.train
    need(t.steps >= 1, "train.steps", t.steps, "an integer >= 1")
    need(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    need(t.lr > 0, "train.lr", t.lr, "a number > 0")
    need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a number >= 0")
    need(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "an integer >= 0")
    need(t.grad_accum >= 1 and t.batch_size % max(t.grad_accum, 1) == 0, "train.grad_accum", t.grad_accum,
         f"an integer >= 1 that divides train.batch_size={t.batch_size}")
    need(t.nproc_per_node >= 1, "train.nproc_per_node", t.nproc_per_node, "an integer >= 1 (processes on this machine)")
    per_step = max(t.grad_accum, 1) * max(t.nproc_per_node, 1)
    need(t.nproc_per_node <= 1 or t.batch_size % per_step == 0, "train.batch_size", t.batch_size,
         f"a multiple of train.grad_accum x train.nproc_per_node = {t.grad_accum} x {t.nproc_per_node} "
         "(the global batch is split over processes and micro-batches)")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", t.max_grad_norm,
         "null or a number > 0")
    need(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "a number in [0, 1)")
    need(t.ema_warmup >= 1, "train.ema_warmup", t.ema_warmup, "an integer >= 1")
    need(t.ema_every >= 1, "train.ema_every", t.ema_every, "an integer >= 1")
    need(t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1")
    need(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "an integer >= 1")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "an integer >= 1")
    need(t.fid_every >= 0, "train.fid_every", t.fid_every, "an integer >= 0 (0 turns it off)")
    need(t.fid_samples >= 2, "train.fid_samples", t.fid_samples, "an integer >= 2")
    need(1 <= t.fid_sampling_steps <= p.timesteps, "train.fid_sampling_steps", t.fid_sampling_steps,
         f"an integer in [1, timesteps={p.timesteps}]")


def _check_sample(p: Params, need: Need, problems: list[str]) -> None:
    d = p.data
    s = p.sample
    need(len(s.samplers) >= 1, "sample.samplers", list(s.samplers), "a non-empty list")
    need(s.spacing in SPACINGS, "sample.spacing", s.spacing, ", ".join(SPACINGS))
    for i, sc in enumerate(s.samplers):
        if sc is None:  # misspelt: reported while parsing
            continue
        need(sc.name in STEP_RULES, f"sample.samplers[{i}].name", sc.name, ", ".join(STEP_RULES))
        need(0 <= sc.eta <= 1, f"sample.samplers[{i}].eta", sc.eta, "a number in [0, 1]")
        need(sc.name not in MULTISTEP_RULES or sc.eta == 0, f"sample.samplers[{i}].eta", sc.eta,
             f"0.0 ({sc.name} takes no eta)")
        need(1 <= sc.steps <= p.timesteps, f"sample.samplers[{i}].steps", sc.steps,
             f"an integer in [1, timesteps={p.timesteps}]")
        if 1 <= sc.steps <= p.timesteps and s.spacing in SPACINGS:
            try:
                timestep_grid(p.timesteps, sc.steps, s.spacing, solver=sc.name in MULTISTEP_RULES)
            except ValueError as err:
                problems.append(f"sample.samplers[{i}].steps: {err}")
    labels = [sc.key for sc in s.samplers if sc is not None]
    need(len(set(labels)) == len(labels), "sample.samplers", labels, "distinct sample sets")
    need(s.n_samples >= 2, "sample.n_samples", s.n_samples, "an integer >= 2")
    # n_samples may exceed the held-out set: the floor is then taken at the held-out size and carried to n by
    # its FID-infinity line (stages/fid.py), so a larger n buys precision (issue 26)
    need(s.batch_size >= 1, "sample.batch_size", s.batch_size, "an integer >= 1")
    need(s.nproc_per_node >= 1, "sample.nproc_per_node", s.nproc_per_node,
         "an integer >= 1 (processes on this machine)")


def _check_nll(p: Params, need: Need, problems: list[str]) -> None:
    n = p.nll
    need(n.estimator in ("stratified", "exact"), "nll.estimator", n.estimator, "stratified | exact")
    need(1 <= n.n_t <= p.timesteps - 1, "nll.n_t", n.n_t, f"an integer in [1, timesteps - 1 = {p.timesteps - 1}]")
    held = holdout_size(p.data)
    need(2 <= n.images <= (held or 1_000_000), "nll.images", n.images,
         f"an integer in [2, {held}] (the held-out images)" if held else "an integer >= 2")


def _check_report_and_tracking(p: Params, need: Need, problems: list[str]) -> None:
    r = p.report
    need(r.grid_images >= 1, "report.grid_images", r.grid_images, "an integer >= 1")
    need(1 <= r.grid_scale <= 32, "report.grid_scale", r.grid_scale, "an integer in [1, 32]")
    need(r.forward_images >= 1, "report.forward_images", r.forward_images, "an integer >= 1")
    _check_sizes(p, need)
    e = p.tracking.experiment
    need(0 < len(e) <= 256 and e.isprintable(), "tracking.experiment", e, "1 to 256 printable characters")


# Upper bounds: far above any experiment on one machine, low enough that a typo cannot ask for
# terabytes (a 1e12-step schedule, a million-fold grid) before anything fails.
_CAPS = {"featurizer.feature_dim": 4096, "featurizer.epochs": 100_000, "featurizer.batch_size": 65536,
         "model.dim": 1024, "model.attn_heads": 64, "model.attn_dim_head": 1024,
         "train.steps": 100_000_000, "train.batch_size": 65536, "train.warmup_steps": 100_000_000,
         "train.grad_accum": 65536, "train.nproc_per_node": 1024, "train.ema_warmup": 100_000_000,
         "train.ema_every": 100_000_000, "train.log_every": 100_000_000, "train.checkpoint_every": 100_000_000,
         "train.keep_checkpoints": 1000, "train.fid_every": 100_000_000, "train.fid_samples": 1_000_000,
         "sample.n_samples": 1_000_000, "sample.batch_size": 65536, "sample.nproc_per_node": 1024,
         "report.grid_images": 1024, "report.forward_images": 64}


def _check_sizes(p: Params, need) -> None:
    flat = p.flat()
    for key, cap in _CAPS.items():
        v = flat.get(key)
        need(v is None or v <= cap, key, v, f"an integer <= {cap}")
    need(len(p.model.dim_mults) <= 8 and all(x <= 16 for x in p.model.dim_mults), "model.dim_mults",
         list(p.model.dim_mults), "at most 8 integers in [1, 16]")


def holdout_size(d: DataConfig) -> int | None:
    """Images in the held-out split of ``d`` (as :func:`ddpm.data.datasets.split_holdout` counts them), None
    for ``folder`` (known once prepare has read it; prepare checks it then)."""
    n = DATASET_SIZES.get(d.name)
    if n is None or not 0 < d.holdout_fraction < 1:
        return None
    return min(max(round(d.holdout_fraction * n), 1), n - 1)


def params_from_dict(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a plain dict (as parsed from YAML) into :class:`Params`; raise ConfigError listing every problem."""
    problems: list[str] = []
    params = _build(Params, raw, "", problems)
    _check(params, problems)  # fields that failed to parse keep their defaults, so no double reports
    if problems:
        raise ConfigError(problems, source)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``: its size, nesting and expanded size are bounded first
    (:func:`check_yaml`), so a hostile file fails in milliseconds with one line and builds nothing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameters file {str(path)!r} not found")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError([f"the file holds {size} bytes; allowed: at most {MAX_YAML_BYTES} "
                           "(ddpm.app.config.MAX_YAML_BYTES)"], str(path))
    try:
        text = path.read_text()
        check_yaml(text, str(path))
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as err:  # ValueError: an int of > 4300 digits
        if isinstance(err, ConfigError):
            raise
        raise ConfigError([f"not valid YAML: {' '.join(str(err).split())[:300]}"], str(path)) from err
    return params_from_dict(raw, str(path))


def check_yaml(text: str, source: str = "params.yaml") -> None:
    """Refuse YAML that nests deeper than MAX_YAML_DEPTH or whose aliases expand it past MAX_YAML_NODES, from its
    event stream alone (the parsers keep a state stack, not recursion; nothing is expanded: an alias counts the
    nodes its anchor holds), read lazily so a refusal comes within the first offending events. libyaml's parser
    where present (PyYAML's own scanner takes seconds on a few KB of nested brackets); the pure-Python one, which
    then loads the file, has the last word on what libyaml rejects. ConfigError names the key path and the limit."""
    try:
        _check_events(_events(text, getattr(yaml, "CSafeLoader", yaml.SafeLoader), source), source)
    except yaml.YAMLError:
        _check_events(_events(text, yaml.SafeLoader, source), source)


def _check_events(events: Any, source: str) -> None:
    stack: list[list[Any]] = []  # [path, is_mapping, expecting_key, pending key, size in nodes, anchor, index]
    sizes: dict[str, int] = {}

    def add(n: int, path: list[str]) -> None:
        if stack:
            stack[-1][4] += n
            if stack[-1][4] > MAX_YAML_NODES or n > MAX_YAML_NODES:
                raise ConfigError([f"{_path(path)}: the file holds more than {MAX_YAML_NODES} nodes, each alias (*name) "
                                   f"counted as the nodes of its anchor (&name); allowed: at most {MAX_YAML_NODES} "
                                   "(a 'billion laughs' file is refused, not expanded)"], source)

    def child_path() -> list[str]:
        if not stack:
            return []
        top = stack[-1]
        if top[1]:
            return top[0] + [top[3]] if not top[2] else top[0]
        top[6] += 1
        return top[0] + [f"[{top[6] - 1}]"]

    def done(n: int, anchor: Any, path: list[str], is_key_scalar: Any = None) -> None:
        if anchor is not None:
            sizes[anchor] = n
        if stack and stack[-1][1]:
            if stack[-1][2]:
                stack[-1][3] = is_key_scalar if isinstance(is_key_scalar, str) else "?"
            stack[-1][2] = not stack[-1][2]
        add(n, path)

    for ev in events:
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            path = child_path()
            if len(stack) >= MAX_YAML_DEPTH:
                raise ConfigError([f"{_path(path)}: nested more than {MAX_YAML_DEPTH} levels deep; allowed: at most "
                                   f"{MAX_YAML_DEPTH} (ddpm.app.config.MAX_YAML_DEPTH)"], source)
            stack.append([path, isinstance(ev, yaml.MappingStartEvent), True, None, 1, ev.anchor, 0])
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            path, _, _, _, n, anchor, _ = stack.pop()
            done(n, anchor, path)
        elif isinstance(ev, yaml.ScalarEvent):
            path = child_path()
            done(1, ev.anchor, path, ev.value[:80])
        elif isinstance(ev, yaml.AliasEvent):
            path = child_path()
            done(sizes.get(ev.anchor, 1), None, path)


def _events(text: str, loader: Any, source: str):
    """YAML events; more than 2 x MAX_YAML_NODES + 4 of them (a start and an end per collection) hold too many nodes."""
    for i, ev in enumerate(yaml.parse(text, Loader=loader)):
        if i > 2 * MAX_YAML_NODES + 4:
            raise ConfigError([f"the file holds more than {MAX_YAML_NODES} nodes; allowed: at most {MAX_YAML_NODES}"],
                              source)
        yield ev


def _path(parts: list[str]) -> str:
    return ".".join(parts).replace(".[", "[") or "(the top level)"


def resolve_device(device: str = "auto"):
    """``auto`` picks CUDA when available, else the CPU; an unavailable CUDA request fails clearly."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"device: got {device!r} but CUDA is not available; allowed here: auto, cpu"])
    return torch.device(device)
