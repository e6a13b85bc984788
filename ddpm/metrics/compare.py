"""Paired comparisons of FID: differences with intervals, pooled main effects, interactions, Holm.

One job: given the features of every cell of a grid (schedule x training seed x sample set) and the
reference features, say which differences in FID are resolved, the way the sets were drawn.

How the sets were drawn, and so how they are resampled (:func:`paired_bootstrap`):

* every sample set of a run draws its starting noise x_T per sample index from the same sampler seed,
  so image i of one set and image i of another share x_T (common random numbers). Cells that share
  noise (same ``group``; by default: same sample count) are resampled with ONE draw of the sample
  indices per bootstrap replicate, applied to all of them together;
* every cell is measured against one reference set (the train features): it is resampled once per
  replicate and shared by every cell;
* cells in different groups share nothing and are resampled independently.

A replicate thus gives one bootstrap FID per cell; the result, :class:`PairedBootstrap`, holds the point
FIDs ``fid [C]`` and the replicates ``draws [B, C]``. Any contrast w (a difference, or an average of
differences) gets its effect ``w . fid``, its interval and a two-sided bootstrap p-value from
``draws @ w`` (:meth:`PairedBootstrap.contrast`).

Interval: only the spread of the bootstrap distribution is used, never its location. A bootstrap FID is
biased upwards by about c/N on top of the plug-in's own c/N (Chong & Forsyth 2020), so a percentile
interval would sit one bias too high (see :func:`ddpm.metrics.fid.fid_interval`); for a difference of cells at the
same N much of that bias cancels, and centring removes the rest. The target is the contrast of the
*expected* plug-in FIDs at these sample counts. Default (``normal``): theta -/+ 1.96 sd*, with sd* the
replicates' standard deviation, and p = 2 Phi(-|theta| / sd*). Why not the percentiles (``basic``,
available): a tail count resolves p only down to 1/(B + 1), while Holm over the 36 verdicts of the
default grid tests its smallest p at 0.05 x 0.8 / 18 = 0.0022; the sd* of 1000 replicates is within about
2% of its limit, and a contrast of FIDs (differences, averages of differences) is close to normal.
Calibrated on Gaussians with a known difference (tests/test_compare.py; benchmarks/interval_coverage.py,
results in benchmarks/results/interval_coverage_paired.txt, both methods side by side).

Training seeds (:func:`estimate`): with one seed the bootstrap interval is the answer and does not hold
training noise (say so). With S >= 2 seeds the contrast is computed per seed and the interval is the
Student-t interval over the S per-seed values (each carries its sampling and its training noise), as
:func:`ddpm.app.results.aggregate` does for single configurations.

The questions of a factorial grid (:func:`question_table`): each pair of schedules averaged over the
sample sets, each pair of sample sets averaged over the schedules (kind ``sampler`` at the same step
count, ``steps`` for one sampler, ``set`` otherwise), and for each of those one interaction check:
do the per-level differences (per set for a schedule pair, per schedule for a set pair) disagree with
the main effect? (Bonferroni minimum over the levels of the deviation's p-value.) Family-wise error:
one weighted Holm procedure over every stated verdict (:func:`holm`), the main effects carrying
``main_share`` (80%) of alpha and the interaction checks the rest, so that the interaction checks do not
dilute the main questions; FWER <= alpha over all of them (Holm 1979 with weights).

Public API::

    CellKey = tuple  # (schedule, seed, set) in the pipeline; any hashable tuple works
    paired_bootstrap(cells, references, *, cell_reference=None, groups=None, n_boot=1000, seed=0)
        -> PairedBootstrap(keys, fid [C], draws [B, C])
    PairedBootstrap.contrast(weights: {key: w}) -> Estimate (bootstrap)
    estimate(boot, weights_per_seed: list[{key: w}]) -> Estimate (bootstrap for one, t for several)
    holm(p, weights=None) -> adjusted p [K]
    set_label(label, steps) -> "ddim-eta0-10" (from ddpm.app.names);  split_set("ddim-eta0-10") -> ("ddim-eta0", 10)
    question_table(boot, schedules, sets, seeds, alpha=0.05, main_share=0.8) -> DataFrame (COLUMNS)
    pairs_table(boot, pairs, seeds, family, alpha=0.05) -> DataFrame (COLUMNS), Holm over the pairs
    grid_comparisons(cells, reference, n_boot=1000, seed=0) -> DataFrame: question_table + ranking pairs
    ranking_pairs({(schedule, set): fid}) -> the pairs a ranking states (best vs every other; per step count)
    cross_table(cells_a, ref_a, cells_b, ref_b, n_boot=1000, seed=0) -> DataFrame: B - A per configuration + pooled
    save_features(path, cells, reference, space="") / load_features(file) -> (cells, reference, space)

Features file (``reports/features.npz``, what ``ddpm compare`` pairs across experiments):
``keys`` [C] str "schedule|seed|set", ``features`` [C, N, D] and ``reference`` [M, D], float32 when that is
exact (the featurizers compute in float32, so it is), else float64; ``space`` the feature space id
(:func:`ddpm.metrics.features.feature_space_id`).

Across experiments (:func:`cross_table`, ``ddpm compare A B``): the cells of A and B with
the same (schedule, seed, set) pair up. Both sides are resampled with one index draw per replicate (valid
whenever the pairs (a_i, b_i) are i.i.d. over i; with the same sampler seed and n they also share x_T, which
is what makes pairing pay); one reference draw when both references are the same array, else one each.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import pandas as pd

from ddpm.metrics.fid import _frechet_batch, _one_thread, _weighted_statistics, fid_from_features
from ddpm.app.names import set_label

__all__ = ["COLUMNS", "Estimate", "PairedBootstrap", "cross_table", "estimate", "grid_comparisons", "holm",
           "load_features", "pairs_table", "paired_bootstrap", "question_table", "ranking_pairs", "save_features",
           "set_label", "split_set"]

COLUMNS = ["question", "kind", "a", "b", "effect", "lo", "hi", "p", "p_holm", "verdict", "family", "family_size",
           "method"]
CHUNK = 125  # replicates per batch: bounds memory at [CHUNK, D, M] floats for the reference


@dataclass(frozen=True)
class Estimate:
    """A contrast: its point value, ``level`` interval, two-sided p-value (H0: contrast = 0), method."""

    effect: float
    lo: float
    hi: float
    p: float
    method: str


@dataclass(frozen=True)
class PairedBootstrap:
    keys: tuple[Hashable, ...]
    fid: np.ndarray  # [C] plug-in FID of each cell (ddpm.metrics.fid.fid_from_features)
    draws: np.ndarray  # [B, C] bootstrap FIDs, one row per replicate

    def index(self, key: Hashable) -> int:
        try:
            return self.keys.index(key)
        except ValueError:
            raise KeyError(f"no cell {key!r}; cells: {', '.join(map(str, self.keys[:6]))}...") from None

    def vector(self, weights: Mapping[Hashable, float]) -> np.ndarray:
        w = np.zeros(len(self.keys))
        for k, v in weights.items():
            w[self.index(k)] += v
        return w

    def contrast(self, weights: Mapping[Hashable, float], level: float = 0.95, method: str = "normal") -> Estimate:
        """Interval and two-sided p-value of sum_k w_k FID_k from the spread of the replicates (module
        docstring): ``normal`` (default) theta -/+ z sd*, p = 2 Phi(-|theta| / sd*); ``basic`` the centred
        percentiles of the replicates, p = 2 min(P*(c >= theta), P*(c <= theta)) (resolves only to 1/B)."""
        from scipy.stats import norm

        w = self.vector(weights)
        theta = float(self.fid @ w)
        c = self.draws @ w
        c = c - c.mean()
        b = len(c)
        if method == "normal":
            sd = float(c.std(ddof=1))
            half = float(norm.ppf(0.5 + level / 2.0)) * sd
            p = float(2.0 * norm.sf(abs(theta) / sd)) if sd > 0 else (1.0 if theta == 0.0 else 0.0)
            return Estimate(theta, theta - half, theta + half, p, f"paired bootstrap, normal ({b} replicates)")
        if method != "basic":
            raise ValueError(f"method must be 'normal' or 'basic', got {method!r}")
        alpha = (1.0 - level) / 2.0
        q_lo, q_hi = np.quantile(c, [alpha, 1.0 - alpha])
        tail = min((1 + np.count_nonzero(c >= theta)) / (b + 1), (1 + np.count_nonzero(c <= theta)) / (b + 1))
        return Estimate(theta, theta - float(q_hi), theta - float(q_lo), min(1.0, 2.0 * tail),
                        f"paired bootstrap, basic ({b} replicates)")


def _counts(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)


def _check(cells: Mapping[Hashable, Any], references: Mapping[Hashable, Any], cell_reference, groups):
    """Float64 features per cell and reference; every cell's group shares its sample count."""
    if not cells:
        raise ValueError("paired_bootstrap: no cells given")
    feats = {k: np.asarray(v, dtype=np.float64) for k, v in cells.items()}
    refs = {k: np.asarray(v, dtype=np.float64) for k, v in references.items()}
    dims = {a.shape[1] for a in [*feats.values(), *refs.values()] if a.ndim == 2}
    if any(a.ndim != 2 for a in [*feats.values(), *refs.values()]) or len(dims) != 1:
        raise ValueError(f"features must be [N, D] arrays with one D; got dims {sorted(dims)}")
    cell_reference = cell_reference or {k: next(iter(refs)) for k in feats}
    groups = groups or {k: len(a) for k, a in feats.items()}
    for k in feats:
        if cell_reference.get(k) not in refs:
            raise ValueError(f"cell {k!r}: reference {cell_reference.get(k)!r} not given; have {list(refs)}")
    sizes: dict[Hashable, set] = {}
    for k, a in feats.items():
        sizes.setdefault(groups[k], set()).add(len(a))
    bad = {g: s for g, s in sizes.items() if len(s) > 1}
    if bad:
        raise ValueError(f"cells of one noise group must have one sample count; got {bad}")
    return feats, refs, cell_reference, groups


def paired_bootstrap(cells: Mapping[Hashable, Any], references: Any, *, cell_reference=None, groups=None,
                     n_boot: int = 1000, seed: int = 0) -> PairedBootstrap:
    """Bootstrap FIDs of every cell, resampled the way the sets were drawn (module docstring).

    ``cells``: key -> features [N, D]; ``references``: one array [M, D], or name -> array with
    ``cell_reference`` key -> name (cells of one name share that reference's draw). ``groups``: key ->
    noise group (cells of a group share x_T per index and take one index draw per replicate; default:
    cells with the same N). Seeded: the same inputs give the same draws."""
    if not isinstance(references, Mapping):
        references = {"reference": references}
    if n_boot < 20:
        raise ValueError(f"n_boot must be >= 20, got {n_boot}")
    feats, refs, cell_reference, groups = _check(cells, references, cell_reference, groups)
    keys = tuple(feats)
    rng = np.random.default_rng(seed)
    draws = np.empty((n_boot, len(keys)))
    with _one_thread():
        point = np.array([fid_from_features(feats[k], refs[cell_reference[k]]) for k in keys])
        for start in range(0, n_boot, CHUNK):
            b = min(CHUNK, n_boot - start)
            draws[start:start + b] = _replicates(rng, b, keys, feats, refs, cell_reference, groups)
    return PairedBootstrap(keys, point, draws)


def _replicates(rng, b, keys, feats, refs, cell_reference, groups) -> np.ndarray:
    """[b, C] bootstrap FIDs: one index draw per noise group and per reference, shared by their cells."""
    group_counts = {g: _counts(rng, len(feats[k]), b) for k in keys for g in [groups[k]] if g is not None}
    ref_stats = {}
    for name, r in refs.items():
        mu, cov = _weighted_statistics(r, _counts(rng, len(r), b))
        ref_stats[name] = (mu[:, None], cov[:, None])  # [b, 1, D], [b, 1, D, D]: one root per replicate
    out = np.empty((b, len(keys)))
    for name, (mu_r, cov_r) in ref_stats.items():
        idx = [i for i, k in enumerate(keys) if cell_reference[k] == name]
        stats = [_weighted_statistics(feats[keys[i]], group_counts[groups[keys[i]]]) for i in idx]
        mu = np.stack([m for m, _ in stats], axis=1)
        cov = np.stack([c for _, c in stats], axis=1)
        out[:, idx] = _frechet_batch(mu_r, cov_r, mu, cov)  # FID is symmetric in its two sets
    return out


# ------------------------------------------------------------------------------------------------
# Seeds, Holm
# ------------------------------------------------------------------------------------------------
def estimate(boot: PairedBootstrap, weights_per_seed: Sequence[Mapping[Hashable, float]],
             level: float = 0.95) -> Estimate:
    """The contrast averaged over training seeds (one weights dict per seed). One seed: the paired
    bootstrap. S >= 2 seeds: the Student-t interval and test over the S per-seed contrasts."""
    if len(weights_per_seed) == 1:
        return boot.contrast(weights_per_seed[0], level)
    from scipy import stats

    d = np.array([float(boot.fid @ boot.vector(w)) for w in weights_per_seed])
    s = len(d)
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(s))
    half = float(stats.t.ppf(0.5 + level / 2.0, s - 1)) * se
    p = float(2.0 * stats.t.sf(abs(mean) / se, s - 1)) if se > 0 else (1.0 if mean == 0.0 else 0.0)
    return Estimate(mean, mean - half, mean + half, p, f"t over {s} training seeds")


def holm(p: Sequence[float], weights: Sequence[float] | None = None) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values, weighted: hypotheses are ordered by p_i / w_i and the
    j-th is adjusted to max_{l <= j} (p_(l) / w_(l)) * (sum of the weights not yet rejected), capped at 1.
    Equal weights give the classic Holm: max_{l <= j} (K - l + 1) p_(l). Reject where adjusted <= alpha."""
    p = np.asarray(p, dtype=np.float64)
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    if p.shape != w.shape or (w <= 0).any():
        raise ValueError(f"holm: need positive weights, one per p-value; got {len(w)} for {len(p)}")
    w = w / w.sum()
    order = np.argsort(p / w, kind="mergesort")
    remaining = np.cumsum(w[order][::-1])[::-1]  # weight still in play at each step
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] / w[order] * remaining))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


# ------------------------------------------------------------------------------------------------
# The questions of a schedule x sample-set grid; pairs of configurations
# ------------------------------------------------------------------------------------------------
def split_set(name: str) -> tuple[str, int]:
    label, steps = name.rsplit("-", 1)
    return label, int(steps)


def _set_kind(a: str, b: str) -> str:
    (la, sa), (lb, sb) = split_set(a), split_set(b)
    return "sampler" if sa == sb else "steps" if la == lb else "set"


def _pair(cell_a: list, cell_b: list, seeds: Sequence[int]) -> list[dict]:
    """Weights per seed for mean(FID over cell_a) - mean(FID over cell_b); cells are (schedule, set)."""
    out = []
    for seed in seeds:
        w: dict = {}
        for cells, sign in ((cell_a, 1.0), (cell_b, -1.0)):
            for sched, s in cells:
                w[(sched, seed, s)] = w.get((sched, seed, s), 0.0) + sign / len(cells)
        out.append(w)
    return out


def _main_effects(schedules, sets) -> list[tuple[str, str, str, list, list, list]]:
    """(kind, a, b, cells of a, cells of b, per-level (level, cells a, cells b)) for every main effect."""
    out = []
    for i, a in enumerate(schedules):
        for b in schedules[i + 1:]:
            levels = [(s, [(a, s)], [(b, s)]) for s in sets]
            out.append(("schedule", a, b, [(a, s) for s in sets], [(b, s) for s in sets], levels))
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            levels = [(sc, [(sc, a)], [(sc, b)]) for sc in schedules]
            out.append((_set_kind(a, b), a, b, [(sc, a) for sc in schedules], [(sc, b) for sc in schedules], levels))
    return out


def _minus(w1: dict, w2: dict) -> dict:
    return {k: w1.get(k, 0.0) - w2.get(k, 0.0) for k in set(w1) | set(w2)}


def _interaction(boot, main_a, main_b, levels, seeds) -> tuple[Estimate, str]:
    """Whether some per-level difference departs from the main effect: the departure (level difference - main
    effect) of the most significant level, with its interval, and p = Bonferroni minimum over the levels."""
    main = _pair(main_a, main_b, seeds)
    found = []
    for level, la, lb in levels:
        e = estimate(boot, [_minus(lw, mw) for lw, mw in zip(_pair(la, lb, seeds), main)])
        found.append((e.p, -abs(e.effect), level, e))
    p, _, level, e = min(found, key=lambda f: f[:2])
    return Estimate(e.effect, e.lo, e.hi, min(1.0, len(levels) * p),
                    f"{e.method}; Bonferroni min over {len(levels)} levels"), level


def _row(question, kind, a, b, e: Estimate, family) -> dict:
    return {"question": question, "kind": kind, "a": a, "b": b, "effect": e.effect, "lo": e.lo, "hi": e.hi,
            "p": e.p, "family": family, "method": e.method}


def _verdicts(df: pd.DataFrame, weights, alpha: float) -> pd.DataFrame:
    df["p_holm"] = holm(df["p"].to_numpy(), weights)
    df["family_size"] = len(df)
    sig = df["p_holm"] <= alpha
    is_inter = df["kind"] == "interaction"
    better = np.where(df["effect"] < 0, df["a"], df["b"]) + " better"
    df["verdict"] = np.where(~sig, "tie", np.where(is_inter, "interaction", better))
    return df[COLUMNS]


def question_table(boot: PairedBootstrap, schedules: Sequence[str], sets: Sequence[str], seeds: Sequence[int],
                   *, alpha: float = 0.05, main_share: float = 0.8) -> pd.DataFrame:
    """Main effects (schedule pairs over the sets; set pairs over the schedules) and one interaction
    check per main effect; effect = FID(a) - FID(b) (negative: a better); an interaction row's effect is the
    departure from the main effect at its most significant level. Verdicts by weighted Holm at
    ``alpha`` over all rows (main effects share ``main_share`` of the weight). Columns: COLUMNS."""
    rows = []
    for kind, a, b, cells_a, cells_b, levels in _main_effects(list(schedules), list(sets)):
        e = estimate(boot, _pair(cells_a, cells_b, seeds))
        over = "sample sets" if kind == "schedule" else "schedules"
        rows.append(_row(f"{a} vs {b}, averaged over the {over}", kind, a, b, e, "questions"))
        dep, level = _interaction(boot, cells_a, cells_b, levels, seeds)
        rows.append(_row(f"does {a} vs {b} depend on the {over[:-1]}? largest departure at {level}",
                         "interaction", a, b, dep, "questions"))
    if not rows:  # one schedule and one set: nothing to compare
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame(rows)
    n_main = int((df["kind"] != "interaction").sum())
    w = np.where(df["kind"] != "interaction", main_share / n_main, (1.0 - main_share) / n_main)
    return _verdicts(df, w, alpha)


def pairs_table(boot: PairedBootstrap, pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]],
                seeds: Sequence[int], family: str, *, alpha: float = 0.05) -> pd.DataFrame:
    """Paired differences FID(a) - FID(b) of configurations a, b = (schedule, set), averaged over seeds,
    with Holm over the given pairs (one family). Columns: COLUMNS (a, b: "schedule/set")."""
    rows = []
    for a, b in pairs:
        e = estimate(boot, _pair([a], [b], seeds))
        na, nb = "/".join(a), "/".join(b)
        rows.append(_row(f"{na} vs {nb}", "pair", na, nb, e, family))
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    return _verdicts(pd.DataFrame(rows), None, alpha)


def ranking_pairs(fids: Mapping[tuple[str, str], float]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The comparisons a ranking of configurations (schedule, set) by FID states: the best against every other
    one, and at each step count with several samplers, the best there against each other sampler's best
    configuration at that step count (as :func:`ddpm.app.results.winners_by_steps` reads them). Finite FIDs only."""
    finite = sorted((f, c) for c, f in fids.items() if math.isfinite(f))
    if not finite:
        return []
    best = finite[0][1]
    pairs = [(best, c) for _, c in finite[1:]]
    for steps in sorted({split_set(c[1])[1] for _, c in finite}):
        firsts: dict[str, tuple[str, str]] = {}
        for _, c in finite:  # sorted by FID: the first of each sampler label is its best at this step count
            label, st = split_set(c[1])
            if st == steps:
                firsts.setdefault(label, c)
        win, *others = firsts.values()
        pairs += [(win, c) for c in others if (win, c) not in pairs]
    return pairs


def grid_comparisons(cells: Mapping[tuple[str, int, str], Any], reference: Any, *, n_boot: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """Everything the report states about a grid of cells (schedule, seed, set): the question table (family
    ``questions``) and the ranking's pairs (family ``ranking``, Holm over its own pairs); columns COLUMNS.
    Schedules, seeds and sets are taken in the cells' order; every combination must be present."""
    boot = paired_bootstrap(cells, reference, n_boot=n_boot, seed=seed)
    schedules, seeds, sets = ([*dict.fromkeys(k[i] for k in cells)] for i in range(3))
    missing = [(a, b, c) for a in schedules for b in seeds for c in sets if (a, b, c) not in cells]
    if missing:
        raise ValueError(f"grid_comparisons: the grid is incomplete, missing cells {missing[:3]}")
    fids = {(sc, s): float(np.mean([boot.fid[boot.index((sc, k, s))] for k in seeds]))
            for sc in schedules for s in sets}
    ranking = pairs_table(boot, ranking_pairs(fids), seeds, "ranking")
    return pd.concat([question_table(boot, schedules, sets, seeds), ranking], ignore_index=True)


# ------------------------------------------------------------------------------------------------
# The features file
# ------------------------------------------------------------------------------------------------
def _compact(a: np.ndarray) -> np.ndarray:
    a32 = a.astype(np.float32)
    return a32 if np.array_equal(a32.astype(a.dtype), a) else a


def save_features(path, cells: Mapping[tuple[str, int, str], Any], reference: Any, space: str = "") -> None:
    """Write every cell's features (one sample count) and the reference to ``path`` (npz, atomic)."""
    from ddpm.io import atomic_save_npz

    keys = list(cells)
    sizes = {np.shape(cells[k]) for k in keys}
    if len(sizes) != 1:
        raise ValueError(f"save_features: cells must share one shape [N, D]; got {sorted(sizes)}")
    feats = np.stack([np.asarray(cells[k]) for k in keys])
    atomic_save_npz(path, keys=np.array([f"{sc}|{int(seed)}|{s}" for sc, seed, s in keys]),
                    features=_compact(feats), reference=_compact(np.asarray(reference)), space=np.array(str(space)))


def load_features(source) -> tuple[dict[tuple[str, int, str], np.ndarray], np.ndarray, str]:
    """Read :func:`save_features`'s file (a path, a file object or bytes): ({(schedule, seed, set): [N, D]},
    reference [M, D], feature space id); never unpickles."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with np.load(source, allow_pickle=False) as f:
        missing = {"keys", "features", "reference"} - set(f.files)
        if missing:
            raise ValueError(f"features file: missing array(s) {', '.join(sorted(missing))}; found {f.files}")
        keys, feats, ref = [str(k) for k in f["keys"]], f["features"], f["reference"]
        space = str(f["space"]) if "space" in f.files else ""
    if feats.ndim != 3 or len(keys) != len(feats):
        raise ValueError(f"features file: {len(keys)} keys for features of shape {feats.shape}")
    cells = {}
    for k, x in zip(keys, feats):
        sc, seed, s = k.split("|")
        cells[(sc, int(seed), s)] = x.astype(np.float64)
    return cells, ref.astype(np.float64), space


def cross_table(cells_a: Mapping, ref_a: Any, cells_b: Mapping, ref_b: Any, *, n_boot: int = 1000,
                seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """B - A for every configuration (schedule, set) present on both sides (averaged over their common
    training seeds), and pooled over those configurations; Holm over all of these rows. Columns COLUMNS
    (a = "B", b = "A": verdicts read "A better", "B better" or "tie"; the question names the configuration)."""
    common = [k for k in cells_a if k in cells_b]
    if not common:
        raise ValueError(f"no cell in common: A has {list(cells_a)[:3]}..., B has {list(cells_b)[:3]}...")
    same_ref = np.shape(ref_a) == np.shape(ref_b) and np.array_equal(ref_a, ref_b)
    cells = {("A", *k): cells_a[k] for k in common} | {("B", *k): cells_b[k] for k in common}
    refs = {"A": ref_a} if same_ref else {"A": ref_a, "B": ref_b}
    boot = paired_bootstrap(cells, refs, cell_reference={k: "A" if same_ref else k[0] for k in cells},
                            n_boot=n_boot, seed=seed)
    configs = list(dict.fromkeys((sc, s) for sc, _, s in common))
    seeds = [*dict.fromkeys(k[1] for k in common)]

    def weights(which) -> list[dict]:
        return [{("B", sc, sd, s): 1.0 / len(which) for sc, s in which} | {("A", sc, sd, s): -1.0 / len(which)
                                                                            for sc, s in which} for sd in seeds]
    # effect = FID(B) - FID(A), so B is the row's "a" (negative: B better)
    rows = [_row(f"{sc}/{s}: B - A", "config", "B", "A", estimate(boot, weights([(sc, s)])), "across")
            for sc, s in configs]
    rows.append(_row(f"all {len(configs)} configurations: B - A", "pooled", "B", "A", estimate(boot, weights(configs)),
                     "across"))
    return _verdicts(pd.DataFrame(rows), None, alpha)
