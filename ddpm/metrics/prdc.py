"""Precision, recall, density and coverage of a sample set in a feature space, with bootstrap intervals.

Improved precision and recall (Kynkaenniemi et al. 2019, Sec. 3): each set's manifold is the union of balls
around its points, of radius the distance to the point's k-th nearest neighbour in its own set; precision is
the fraction of samples inside the real manifold, recall the fraction of real points inside the samples'
manifold. Density and coverage (Naeem et al. 2020, eq. 3 and 4): density counts how many real balls hold each
sample (divided by k; 1 on average when the sets match), coverage is the fraction of real balls that hold at
least one sample. Fidelity: precision, density; diversity: recall, coverage.

The point values are the `prdc` package's ``compute_prdc`` (Naeem et al.'s own code, NAVER, MIT) with the FID
reference as the real set and k = 5 (their default). The interval is the basic bootstrap of FID
(:func:`ddpm.metrics.fid.fid_interval`) with the SAME resamples (:func:`ddpm.metrics.fid.bootstrap_counts`,
same seed): a resample counts a point drawn c times as c points (its copies are each other's neighbours at
distance 0), as resampling the features and calling ``compute_prdc`` would; only the replicates' spread is
used, so the copies' shrinking of the radii does not move the interval's centre. Computed without building
any resampled matrix: each point's sorted neighbour list (the first NEIGHBOURS) gives its radius under any
counts, and only the pairs closer than a radius any resample can reach are scored (tests/test_prdc.py checks
every replicate against ``compute_prdc`` on the resampled features).

Public API::

    prdc(samples [N, D], reference [M, D], k=5) -> {"precision", "recall", "density", "coverage"}
    prdc_with_intervals(samples, reference, k=5, level=0.95, n_boot=200, seed=0)
        -> {"precision", "precision_lo", "precision_hi", ... for the four metrics}
"""
from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from ddpm.metrics.fid import basic_interval, bootstrap_counts, feature_pair

METRICS = ("precision", "recall", "density", "coverage")
NEIGHBOURS = 48  # sorted neighbours kept per point: a resample must drop 48 - k of them to run out (never seen)


def _check(samples: Any, reference: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = feature_pair(samples, reference, np.float64)
    if not 1 <= k < min(len(a), len(b)):
        raise ValueError(f"k (nearest neighbours) must be in 1..{min(len(a), len(b)) - 1}, got {k}")
    return a, b


def prdc(samples: Any, reference: Any, k: int = 5) -> dict[str, float]:
    """The four metrics of samples [N, D] against the real reference [M, D] (``prdc.compute_prdc``)."""
    from prdc import compute_prdc

    a, b = _check(samples, reference, k)
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes
        out = compute_prdc(real_features=b, fake_features=a, nearest_k=k)
    return {m: float(out[m]) for m in METRICS}


def _distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances [len(x), len(y)] (sklearn's, as compute_prdc uses)."""
    from sklearn.metrics import pairwise_distances

    return pairwise_distances(x, y, metric="euclidean")


def _neighbours(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point's m nearest others in its own set: indices [N, m] and distances [N, m], ascending."""
    d = _distances(x, x)
    np.fill_diagonal(d, -1.0)  # the point itself sorts first and is dropped (a duplicate is another point)
    m = min(m, len(x) - 1)
    idx = np.argpartition(d, m, axis=1)[:, :m + 1]
    order = np.argsort(np.take_along_axis(d, idx, axis=1), axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)[:, 1:]
    return idx, np.take_along_axis(d, idx, axis=1)


def _radii(counts: np.ndarray, idx: np.ndarray, dist: np.ndarray, k: int, head: int = 16) -> np.ndarray:
    """k-NN radius of every point [B, N] under resample counts [B, N]: the point's own c - 1 copies sit at
    distance 0, then neighbour j counts c_j times; the radius is where the count reaches k (compute_prdc's
    (k+1)-th smallest distance of the row, the point itself included). The first ``head`` neighbours settle
    almost every point; the few left walk the whole list."""
    c = counts.astype(np.int16)  # counts <= N, sums over <= NEIGHBOURS of them: far below 2**15 in practice
    r = _walk(c, c[:, idx[:, :head]], dist[:, :head], k)
    b, i = np.nonzero(np.isnan(r) & (counts > 0))
    if len(b):
        r[b, i] = _walk(c[b, i][:, None], c[b[:, None], idx[i]][:, None], dist[i][:, None], k)[:, 0]
        if np.isnan(r[b, i]).any():
            raise RuntimeError(f"a resample left fewer than k={k} of a point's {idx.shape[1]} nearest neighbours")
    return np.where(counts > 0, r, 0.0)  # a point not drawn has no ball


def _walk(c: np.ndarray, nbr: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Radii [B, N] from own counts c [B, N], neighbour counts nbr [B, N, m] and distances dist [N, m] (or [B, N, m]);
    NaN where the m neighbours do not reach k."""
    cum = nbr.cumsum(axis=2, dtype=np.int16) + (c - 1)[:, :, None]
    reached = cum >= k
    first = reached.argmax(axis=2)
    r = np.take_along_axis(np.broadcast_to(dist, cum.shape), first[..., None], axis=2)[..., 0]
    r = np.where(reached[..., -1], r, np.nan)
    return np.where(c - 1 >= k, 0.0, r)


def _pairs(d: np.ndarray, reach: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (real i, sample j, distance) pairs of d [M, N] closer than the largest radius ``reach`` of the
    point along ``axis`` (0: the real point's, 1: the sample's) that any replicate gives."""
    i, j = np.nonzero(d < (reach[:, None] if axis == 0 else reach[None, :]))
    return i, j, d[i, j]


def _any_hit(index: np.ndarray, hit: np.ndarray, n: int) -> np.ndarray:
    """[B, n] bool: for each replicate, whether any pair of the point ``index`` is a hit (hit [B, P])."""
    b = hit.shape[0]
    flat = (np.arange(b)[:, None] * n + index[None, :])[hit]
    return np.bincount(flat, minlength=b * n).reshape(b, n) > 0


def replicates(samples: Any, reference: Any, ca: np.ndarray, cb: np.ndarray, k: int = 5) -> dict[str, np.ndarray]:
    """The four metrics [B] for resamples given as counts ca [B, N] (samples) and cb [B, M] (reference)."""
    a, b = _check(samples, reference, k)
    ia, da = _neighbours(a, NEIGHBOURS)
    ib, db = _neighbours(b, NEIGHBOURS)
    ra, rb = _radii(ca, ia, da, k), _radii(cb, ib, db, k)  # [B, N], [B, M]
    d = _distances(b, a)  # [M, N] real x sample
    n, m = len(a), len(b)
    pi, pj, pd = _pairs(d, rb.max(axis=0), 0)  # inside some real ball: precision, density, coverage
    in_real = (pd[None, :] < rb[:, pi]) & (cb[:, pi] > 0)  # [B, P]
    flat = (np.arange(len(ca))[:, None] * n + pj[None, :]).ravel()  # how many real balls (with copies) hold j
    held = np.bincount(flat, weights=(in_real * cb[:, pi]).ravel(), minlength=len(ca) * n).reshape(len(ca), n)
    precision = (ca * (held > 0)).sum(axis=1) / n
    density = (ca * held).sum(axis=1) / (k * n)
    coverage = (cb * _any_hit(pi, in_real & (ca[:, pj] > 0), m)).sum(axis=1) / m
    qi, qj, qd = _pairs(d, ra.max(axis=0), 1)  # inside some sample ball: recall
    in_fake = (qd[None, :] < ra[:, qj]) & (ca[:, qj] > 0)
    recall = (cb * _any_hit(qi, in_fake, m)).sum(axis=1) / m
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def prdc_with_intervals(samples: Any, reference: Any, *, k: int = 5, level: float = 0.95, n_boot: int = 200,
                        seed: int = 0) -> dict[str, float]:
    """The four metrics and their ``level`` basic-bootstrap intervals (``<metric>_lo``, ``<metric>_hi``),
    resampled as :func:`ddpm.metrics.fid.fid_interval` resamples (same counts for the same seed). Precision,
    recall and coverage are clipped to [0, 1], density to >= 0. About 0.3 s at N = 1000, M = 1348, D = 32."""
    a, b = _check(samples, reference, k)
    point = prdc(a, b, k)
    ca, cb = bootstrap_counts(len(a), len(b), n_boot, seed)
    boot = replicates(a, b, ca, cb, k)
    out = {}
    for name in METRICS:
        lo, hi = basic_interval(point[name], boot[name], level)
        top = np.inf if name == "density" else 1.0
        out.update({name: point[name], f"{name}_lo": float(np.clip(lo, 0.0, top)),
                    f"{name}_hi": float(np.clip(hi, 0.0, top))})
    return out
