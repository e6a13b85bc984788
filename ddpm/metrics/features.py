"""Feature networks ("rulers") for FID, KID and the comparisons: the in-domain classifier and pytorch-fid's
InceptionV3, their checkpoints, and the shipped rulers.

* :class:`ClassifierFeaturizer` (the default): a small CNN trained on the data set itself (usual
  practice for small in-domain data such as the 8x8 scikit-learn digits, where ImageNet features are
  meaningless and the sample count, 1,797, is below Inception's 2,048 feature dimensions). Its
  ``feature_dim``-wide penultimate layer gives the features. Train it with :func:`train_classifier`.
* :class:`InceptionFeaturizer`: the real pytorch-fid InceptionV3 (pool3, 2048-d), built offline from a
  local copy of ``pt_inception-2015-12-05-6726825d.pth``; it never downloads anything.

Conventions: images are uint8 arrays or tensors ``[N, C, H, W]`` (numpy or torch), labels int64.
Featurizers scale uint8 images themselves, so callers never pass floats (a ``TypeError`` guards the
usual [0, 1] versus [-1, 1] mix-up).

Public API::

    ClassifierFeaturizer(in_channels=1, num_classes=10, feature_dim=32, width=32)
    train_classifier(train_images, train_labels, val_images, val_labels, *, feature_dim=32,
                     epochs=15, batch_size=64, lr=1e-2, seed=0, device="cpu", progress=True)
        -> (model, metrics)
    InceptionFeaturizer(weights_path=None)
    make_featurizer(kind="classifier", **kwargs)
    extract_features(featurizer, images, batch_size=256, device="cpu", progress=False) -> [N, D] float64
    save_featurizer(path, featurizer, metrics=None) / load_featurizer(path, device="cpu")
    feature_space_id(kind, dim, sha256) -> "classifier-32d-1a2b3c4d"
    shipped_ruler(dataset) -> (path, sha256) | None; load_ruler(path, sha256, device="cpu")
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Union
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm.io import atomic_torch_save, file_sha256



ImageBatch = Union[np.ndarray, torch.Tensor]
PathLike = Union[str, "os.PathLike[str]"]

FEATURIZER_KINDS = ("classifier", "inception")
# Basename of pytorch_fid.inception.FID_WEIGHTS_URL: torch.hub caches the download under this name.
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
_FID_WEIGHTS_URL_FALLBACK = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)


# --------------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------------
def _as_uint8_images(images: ImageBatch, name: str = "images") -> torch.Tensor:
    """Return ``images`` as a uint8 torch tensor [N, C, H, W] (no copy when possible)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"{name} must be uint8 (values 0..255), got numpy dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"{name} must be uint8 (values 0..255), got torch dtype {images.dtype}")
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W], got shape {tuple(images.shape)}")
    return images


def _as_labels(labels: Any, n: int, name: str = "labels") -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be integers, got {labels.dtype}")
    labels = labels.to(torch.int64)
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} must be >= 0")
    return labels


# --------------------------------------------------------------------------------------------------
# In-domain classifier featurizer
# --------------------------------------------------------------------------------------------------
def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    # BatchNorm: measured on digits it reaches ~97% held-out accuracy in 4-6 epochs where GroupNorm
    # needs 10-20. Features are taken in eval mode (running statistics), so they do not depend on
    # batch composition.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ClassifierFeaturizer(nn.Module):
    """Small CNN classifier whose ``feature_dim``-wide penultimate layer gives FID features.

    conv blocks (width, width, stride-2 2*width, 2*width) -> global average pooling ->
    Linear(2*width, feature_dim) + SiLU (the features) -> Linear(feature_dim, num_classes) (logits).
    Works for any image size >= 8x8. Inputs are uint8 images, scaled inside by ``x / 127.5 - 1``.
    SiLU rather than ReLU on the feature layer avoids dead units (zero-variance FID dimensions).
    """

    kind = "classifier"

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 32,
                 width: int = 32) -> None:
        super().__init__()
        for key, value in (("in_channels", in_channels), ("num_classes", num_classes),
                           ("feature_dim", feature_dim), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.config: dict[str, int] = {"in_channels": in_channels, "num_classes": num_classes,
                                       "feature_dim": feature_dim, "width": width}
        self.metrics: dict[str, Any] = {}
        self.body = nn.Sequential(
            _conv_block(in_channels, width),
            _conv_block(width, width),
            _conv_block(width, 2 * width, stride=2),
            _conv_block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_layer = nn.Sequential(nn.Linear(2 * width, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    def _prepare(self, images: ImageBatch) -> torch.Tensor:
        x = _as_uint8_images(images)
        c, h, w = x.shape[1:]
        if c != self.config["in_channels"]:
            raise ValueError(f"expected {self.config['in_channels']} channel(s), got {c}")
        if h < 8 or w < 8:
            raise ValueError(f"images must be at least 8x8, got {h}x{w}")
        device = next(self.parameters()).device
        return x.to(device).float() / 127.5 - 1.0

    def features(self, images: ImageBatch) -> torch.Tensor:
        """FID features: float [N, feature_dim]."""
        return self.feature_layer(self.body(self._prepare(images)))

    def forward(self, images: ImageBatch) -> torch.Tensor:
        """Class logits: float [N, num_classes]."""
        return self.head(self.features(images))


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each uint8 image by a random (dy, dx) in [-max_shift, max_shift]^2, zero fill."""
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for oy in range(2 * p + 1):
        for ox in range(2 * p + 1):
            sel = (offsets[:, 0] == oy) & (offsets[:, 1] == ox)
            if sel.any():
                out[sel] = padded[sel, :, oy:oy + h, ox:ox + w]
    return out


@torch.no_grad()
def _accuracy(model: ClassifierFeaturizer, images: torch.Tensor, labels: torch.Tensor,
              batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i:i + batch_size])
        correct += int((logits.argmax(1).cpu() == labels[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, images.shape[0])


def train_classifier(train_images: ImageBatch, train_labels: Any, val_images: ImageBatch,
                     val_labels: Any, *, feature_dim: int = 32, epochs: int = 15,
                     batch_size: int = 64, lr: float = 1e-2, seed: int = 0, device: str = "cpu",
                     progress: bool = True, width: int = 32, weight_decay: float = 1e-4,
                     augment: bool = True, num_threads: int | None = 1,
                     ) -> tuple[ClassifierFeaturizer, dict[str, Any]]:
    """Train a :class:`ClassifierFeaturizer`; return ``(model in eval mode, metrics)``.

    AdamW with a per-step cosine learning-rate decay, cross-entropy, random 1-px shifts as the only
    augmentation. Deterministic for a seed: the initial weights come from ``torch.manual_seed(seed)``
    inside ``torch.random.fork_rng`` (the caller's global RNG is untouched) and the data order and
    shifts from an explicit ``torch.Generator``.

    ``num_threads`` (default 1) sets torch's intra-op threads while training, restored afterwards:
    the model is so small that threading only adds overhead (measured on the 2-core machine while
    other jobs ran: 6.8 ms per batch of 64 with 1 thread, 35-370 ms with 2). None leaves it alone.

    ``metrics``: val_accuracy, train_accuracy (un-augmented, eval mode), epochs, final_loss,
    loss_history (mean loss per epoch) and the hyper-parameters; no timings (the metrics are saved
    inside the featurizer file, a DVC output that must be a pure function of its inputs).
    """
    x_tr = _as_uint8_images(train_images, "train_images")
    x_va = _as_uint8_images(val_images, "val_images")
    y_tr = _as_labels(train_labels, x_tr.shape[0], "train_labels")
    y_va = _as_labels(val_labels, x_va.shape[0], "val_labels")
    if x_tr.shape[0] == 0:
        raise ValueError("train_images is empty")
    if x_tr.shape[1:] != x_va.shape[1:]:
        raise ValueError(f"train and val images differ in shape: {tuple(x_tr.shape[1:])} "
                         f"vs {tuple(x_va.shape[1:])}")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    num_classes = max(2, int(y_tr.max()) + 1, int(y_va.max()) + 1 if y_va.numel() else 0)

    with torch.random.fork_rng(devices=[]):  # init from `seed` without touching the global RNG
        torch.manual_seed(seed)
        model = ClassifierFeaturizer(in_channels=int(x_tr.shape[1]), num_classes=num_classes,
                                     feature_dim=feature_dim, width=width)
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)  # data order and augmentation
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_tr.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps)))

    from tqdm.auto import tqdm

    bar = tqdm(range(epochs), desc="train classifier", disable=not progress)
    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        history = _train_epochs(model, opt, sched, x_tr, y_tr, gen, bar, batch_size, augment, device)
        model.eval()
        val_accuracy = _accuracy(model, x_va, y_va)
        train_accuracy = _accuracy(model, x_tr, y_tr)
    finally:
        torch.set_num_threads(prev_threads)
    metrics: dict[str, Any] = {
        "val_accuracy": val_accuracy,
        "train_accuracy": train_accuracy,
        "epochs": epochs,
        "final_loss": history[-1],
        "loss_history": history,
        "n_train": int(x_tr.shape[0]),
        "n_val": int(x_va.shape[0]),
        "feature_dim": feature_dim,
        "width": width,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }
    model.metrics = metrics
    return model, metrics


def _train_epochs(model: ClassifierFeaturizer, opt: torch.optim.Optimizer,
                  sched: torch.optim.lr_scheduler.LRScheduler, x_tr: torch.Tensor,
                  y_tr: torch.Tensor, gen: torch.Generator, bar: Any, batch_size: int,
                  augment: bool, device: str) -> list[float]:
    """Run the epochs of :func:`train_classifier`; return the mean training loss of each epoch."""
    n = x_tr.shape[0]
    history: list[float] = []
    for _ in bar:
        order = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            xb = x_tr[idx]
            if augment:
                xb = _random_shift(xb, gen)
            yb = y_tr[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        history.append(total / count)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    return history


# --------------------------------------------------------------------------------------------------
# pytorch-fid InceptionV3 (pool3, 2048-d), offline
# --------------------------------------------------------------------------------------------------
def _fid_weights_url() -> str:
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL
        return FID_WEIGHTS_URL
    except ImportError:  # pragma: no cover
        return _FID_WEIGHTS_URL_FALLBACK


def fid_inception_hub_path() -> Path:
    """Where pytorch-fid (torch.hub) caches the FID Inception weights:
    ``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth`` (``torch.hub.get_dir()``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME


def _missing_weights_message(explicit: Path | None, hub: Path) -> str:
    head = (f"FID Inception weights not found at weights_path={str(explicit)!r}."
            if explicit is not None else
            f"FID Inception weights '{FID_WEIGHTS_FILENAME}' not found.")
    return (f"{head} Looked for (1) an explicit weights_path="
            f"{str(explicit) if explicit is not None else '<not given>'} and (2) pytorch-fid's torch "
            f"hub cache {hub} ($TORCH_HOME/hub/checkpoints/, see torch.hub.get_dir()). This machine "
            f"has no network, so nothing was downloaded: on a machine with network download "
            f"{_fid_weights_url()} and copy it to {hub} or pass its path as weights_path.")


def resolve_inception_weights(weights_path: PathLike | None = None) -> Path:
    """Return the local FID Inception weights file, or raise ``FileNotFoundError`` (no network)."""
    hub = fid_inception_hub_path()
    if weights_path is not None:
        explicit = Path(weights_path).expanduser()
        if not explicit.is_file():
            raise FileNotFoundError(_missing_weights_message(explicit, hub))
        return explicit
    if not hub.is_file():
        raise FileNotFoundError(_missing_weights_message(None, hub))
    return hub


def fid_inception_v3_architecture() -> nn.Module:
    """pytorch-fid's ``fid_inception_v3`` network with random init and no weight loading.

    Mirrors ``pytorch_fid.inception.fid_inception_v3`` (same blocks, same state-dict keys) without its
    download; useful to test the Inception path offline. :class:`InceptionFeaturizer` itself runs
    pytorch-fid's own builder, so the loaded network is the real one.
    """
    from pytorch_fid import inception as pfi

    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


class InceptionFeaturizer(nn.Module):
    """pytorch-fid's InceptionV3 pool3 features (2048-d), loaded from a local weights file only.

    Weights come from ``weights_path`` if given, else from pytorch-fid's hub cache
    (:func:`fid_inception_hub_path`). Neither present -> ``FileNotFoundError`` before any network
    access. The network is ``pytorch_fid.inception.InceptionV3([3])`` built by pytorch-fid's own code,
    with its ``load_state_dict_from_url`` pointed at the local file while building.
    Input: uint8 [N, 1 or 3, H, W]; grayscale is repeated to 3 channels and scaled to [0, 1]
    (InceptionV3 resizes to 299x299 and maps to [-1, 1] itself).
    """

    kind = "inception"
    feature_dim = 2048

    def __init__(self, weights_path: PathLike | None = None) -> None:
        super().__init__()
        resolved = resolve_inception_weights(weights_path)  # raises before any network access
        from pytorch_fid import inception as pfi

        def _load_local(url: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            try:
                return torch.load(resolved, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise RuntimeError(f"cannot read FID Inception weights '{resolved}': {exc}") from exc

        with mock.patch.object(pfi, "load_state_dict_from_url", _load_local):
            self.model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        self.model.eval()
        self.weights_path = None if weights_path is None else str(Path(weights_path).expanduser().resolve())
        self.resolved_weights_path = str(resolved)
        self.config: dict[str, Any] = {"weights_path": self.weights_path}
        self.metrics: dict[str, Any] = {}

    def features(self, images: ImageBatch) -> torch.Tensor:
        """pool3 features: float [N, 2048]."""
        x = _as_uint8_images(images)
        if x.shape[1] not in (1, 3):
            raise ValueError(f"Inception needs 1 or 3 channels, got {x.shape[1]}")
        device = next(self.parameters()).device
        x = x.to(device).float() / 255.0
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.model(x)[0].flatten(1)

    def forward(self, images: ImageBatch) -> torch.Tensor:
        return self.features(images)


def make_featurizer(kind: str = "classifier", **kwargs: Any) -> nn.Module:
    """Build a featurizer: ``"classifier"`` -> untrained :class:`ClassifierFeaturizer(**kwargs)`
    (use :func:`train_classifier` or :func:`load_featurizer` for a trained one);
    ``"inception"`` -> :class:`InceptionFeaturizer(**kwargs)`."""
    if kind == "classifier":
        return ClassifierFeaturizer(**kwargs)
    if kind == "inception":
        return InceptionFeaturizer(**kwargs)
    raise ValueError(f"unknown featurizer kind {kind!r}; allowed kinds: {', '.join(FEATURIZER_KINDS)}")


def extract_features(featurizer: nn.Module, images: ImageBatch, batch_size: int = 256,
                     device: str = "cpu", progress: bool = False) -> np.ndarray:
    """Features of uint8 ``images`` [N, C, H, W] -> float64 [N, D], in eval mode, no autograd.

    Moves ``featurizer`` to ``device``; its train/eval mode is restored afterwards.
    """
    x = _as_uint8_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = featurizer.training
    featurizer.to(device).eval()
    starts = range(0, x.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="features", total=math.ceil(x.shape[0] / batch_size))
    out: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for i in starts:
                feats = featurizer.features(x[i:i + batch_size])
                out.append(feats.to("cpu", torch.float64).numpy())
    finally:
        featurizer.train(was_training)
    if not out:
        dim = getattr(featurizer, "feature_dim", 0)
        return np.zeros((0, int(dim)), dtype=np.float64)
    return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """Plain-Python copy of ``obj`` (numpy/torch scalars and arrays converted), JSON-serialisable."""
    def default(o: Any) -> Any:
        if isinstance(o, (np.generic, torch.Tensor)) and getattr(o, "ndim", 0) == 0:
            return o.item()
        if isinstance(o, (np.ndarray, torch.Tensor)):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"metrics value of type {type(o).__name__} is not JSON-serialisable")
    return json.loads(json.dumps(obj, default=default))


def save_featurizer(path: PathLike, featurizer: nn.Module, metrics: dict[str, Any] | None = None) -> None:
    """Write a self-describing featurizer checkpoint atomically (``ddpm.io.atomic_torch_save``).

    classifier: ``{"kind": "classifier", "config", "state_dict", "metrics"}``;
    inception: ``{"kind": "inception", "weights_path", "metrics"}`` (the 100 MB weights stay where
    they are; ``weights_path`` None means pytorch-fid's hub cache on the loading machine).
    ``metrics`` defaults to ``featurizer.metrics`` (set by :func:`train_classifier`).
    """
    if metrics is None:
        metrics = getattr(featurizer, "metrics", None) or {}
    metrics = _jsonable(metrics)
    if isinstance(featurizer, ClassifierFeaturizer):
        payload: dict[str, Any] = {
            "kind": "classifier",
            "config": dict(featurizer.config),
            "state_dict": {k: v.detach().cpu().clone() for k, v in featurizer.state_dict().items()},
            "metrics": metrics,
        }
    elif isinstance(featurizer, InceptionFeaturizer):
        payload = {"kind": "inception", "weights_path": featurizer.weights_path, "metrics": metrics}
    else:
        raise TypeError(f"cannot save featurizer of type {type(featurizer).__name__}; expected "
                        "ClassifierFeaturizer or InceptionFeaturizer")
    atomic_torch_save(payload, path)


# the bounds of a classifier's description (featurizer.feature_dim's bound is params.yaml's)
CLASSIFIER_BOUNDS = {"in_channels": (1, 64), "num_classes": (2, 100_000), "feature_dim": (2, 4096), "width": (1, 1024)}


def classifier_params(c: dict[str, int]) -> int:
    """Parameters of ClassifierFeaturizer(**c) (conv blocks without bias + BatchNorm, two linear layers)."""
    w, f = c["width"], c["feature_dim"]
    convs = 9 * (c["in_channels"] * w + w * w + w * 2 * w + 4 * w * w) + 2 * (w + w + 2 * w + 2 * w)
    return convs + 2 * w * f + f + f * c["num_classes"] + c["num_classes"]


def check_classifier_config(c: Any, source: str) -> None:
    """Refuse a classifier description that is malformed, out of bounds or too large for the memory budget, before
    building it: one ValueError line naming ``source`` and the key."""
    from ddpm.app.config import show
    from ddpm.limits import FLOAT_BYTES, check_budget, count

    if not isinstance(c, dict):
        raise ValueError(f"{source}: config: got {show(c)}; allowed: a mapping of {', '.join(CLASSIFIER_BOUNDS)}")
    for key, (lo, hi) in CLASSIFIER_BOUNDS.items():
        v = c.get(key, "<missing>")
        if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            raise ValueError(f"{source}: config.{key}: got {show(v)}; allowed: an integer in [{lo}, {hi}]")
    n = classifier_params(c)
    line = check_budget(FLOAT_BYTES * n, f"config (width={c['width']}: {count(n)} parameters)")
    if line:
        raise ValueError(f"{source}: {line}")


def load_featurizer(path: PathLike, device: str = "cpu") -> nn.Module:
    """Load a :func:`save_featurizer` checkpoint; returns the featurizer in eval mode on ``device``
    with its saved ``metrics`` attribute. Raises ``FileNotFoundError`` (missing file),
    ``RuntimeError`` (unreadable / corrupt file) or ``ValueError`` (unknown kind, malformed content),
    each naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"featurizer checkpoint not found: '{path}'")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot read featurizer checkpoint '{path}' (corrupt or not a torch "
                           f"checkpoint): {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"'{path}' is not a featurizer checkpoint (no 'kind' entry)")
    kind = ckpt["kind"]
    metrics = ckpt.get("metrics") or {}
    if kind == "classifier":
        check_classifier_config(ckpt.get("config"), f"featurizer checkpoint '{path}'")
        try:
            model: nn.Module = ClassifierFeaturizer(**ckpt["config"])
            model.load_state_dict(ckpt["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"malformed classifier checkpoint '{path}': {type(exc).__name__}: "
                             f"{exc}") from exc
    elif kind == "inception":
        model = InceptionFeaturizer(weights_path=ckpt.get("weights_path"))
    else:
        raise ValueError(f"featurizer checkpoint '{path}' has unknown kind {kind!r}; allowed kinds: "
                         f"{', '.join(FEATURIZER_KINDS)}")
    model.metrics = dict(metrics)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# Rulers: fixed, named feature spaces
# --------------------------------------------------------------------------------------------------
RULERS_DIR = Path(__file__).resolve().parent / "rulers"
# Shipped rulers: dataset -> (file under ddpm/metrics/rulers/, sha256, the featurizer params it was made with).
# Made by `python3 -m benchmarks.ruler --ship` (see that file for why and the numbers).
SHIPPED_RULERS: dict[str, dict[str, Any]] = {
    "digits": {"file": "digits-classifier-32d.pt",
               "sha256": "d84c7f6fdefb7eb3740415e0c28581e4450af61ef7bd51130681a1e97604eee4",
               "recipe": {"kind": "classifier", "feature_dim": 32, "epochs": 15, "batch_size": 64, "lr": 0.01,
                          "image_size": None, "channels": None}},
}


def feature_space_id(kind: str, dim: int, sha256: str) -> str:
    """The exact feature space of an FID: ``<kind>-<D>d-<first 8 hex of the featurizer file's
    sha256>``. Numbers with different ids are not comparable."""
    return f"{kind}-{int(dim)}d-{sha256[:8]}"


def shipped_ruler(dataset: str, recipe: dict[str, Any]) -> tuple[Path, str] | None:
    """(path, sha256) of the ruler shipped for ``dataset`` when ``recipe`` (the featurizer params
    kind, feature_dim, epochs, batch_size, lr, and the data's image_size and channels) is the one it
    was made with; None otherwise (the featurizer stage then trains one)."""
    entry = SHIPPED_RULERS.get(dataset)
    if entry is None or any(recipe.get(k) != v for k, v in entry["recipe"].items()):
        return None
    return RULERS_DIR / entry["file"], entry["sha256"]


def load_ruler(path: PathLike, sha256: str, device: str = "cpu") -> nn.Module:
    """Load a shipped featurizer after checking its sha256 (``ValueError`` naming the file when it
    differs: a corrupted or swapped ruler must never measure silently)."""
    got = file_sha256(path)
    if got != sha256:
        raise ValueError(f"ruler '{path}': sha256 {got} does not match the expected {sha256}; "
                         "restore the file from git (`git checkout -- ddpm/metrics/rulers`)")
    return load_featurizer(path, device=device)
