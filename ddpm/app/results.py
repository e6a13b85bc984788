"""The experiment's results as one object, read from the pipeline's outputs; the statistics the report states.

:func:`load_results` reads ``reports/fid.csv``, ``reports/fid_summary.json``, ``reports/comparisons.csv``,
``featurizer/metrics.json``, each model's ``loss.csv`` and ``fid_curve.csv`` (``models/<schedule>/seed<k>/``),
the sample sets of the first training seed and a few held-out images, and returns a :class:`Results`.
Nothing here draws or formats: :mod:`ddpm.app.report.figures` draws and :mod:`ddpm.app.report.build` renders.

Aggregation over training seeds (:func:`aggregate`): one row per configuration (schedule, sampler, eta,
spacing, steps). With one seed, its FID interval is the one in ``fid.csv`` and KID's sd is ``kid_std``.
With n >= 2 seeds, the FID is the mean over seeds, ``fid_sd`` their sample sd, the interval the 95%
Student-t interval of that mean (it holds training and sampling noise, since each seed's FID carries
both), and KID's sd the sd over seeds.

Comparisons (``reports/comparisons.csv``, written by the fid stage with :mod:`ddpm.metrics.compare`): each difference
between configurations has its own interval from a paired bootstrap (sample sets share x_T per index and one
reference). Family ``questions``: the questions of the schedule x sample-set design; family ``ranking``: the
best configuration against every other one and each step count's best against the other samplers there, Holm
over those pairs. :data:`TIE_RULE` reads them: the ``tie`` marks and :func:`winners_by_steps`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ddpm.app import paths
from ddpm.limits import LimitError
from ddpm.app.names import SCHEDULES, SPACINGS, STEP_RULES, sampler_label, set_label

FID_COLUMNS = ("schedule", "sampler", "eta", "steps", "fid", "n_samples", "features",
               "seed", "spacing", "fid_lo", "fid_hi", "kid", "kid_std")
SUMMARY_KEYS = ("features", "fid_floor", "fid_floor_lo", "fid_floor_hi", "kid_floor", "kid_floor_std",
                "n_samples", "interval")
FEATURIZER_KEYS = ("features", "ruler", "sha256")
CURVE_COLUMNS = ("step", "fid", "floor")
LOSS_COLUMNS = ("step", "loss")
CONFIG_KEYS = ["schedule", "sampler", "eta", "spacing", "steps"]
COMPARISON_COLUMNS = ("question", "kind", "a", "b", "effect", "lo", "hi", "p", "p_holm", "verdict", "family",
                      "family_size", "method")  # ddpm.metrics.compare.COLUMNS
TIE_RULE = ("two configurations tie when their paired FID difference is not resolved at 95% (paired bootstrap, "
            "Holm over the ranking's comparisons)")
MAX_JSON_BYTES = 1 << 20  # JSON files the report reads are small; refuse anything larger
# fid.csv columns that name files (models/<schedule>/seed<k>/, samples/.../<sampler>-eta<eta>-<steps>.npz):
# only the configuration's vocabulary (ddpm/app/names.py), so no row can point outside the repository
NAME_COLUMNS = {"schedule": SCHEDULES, "sampler": STEP_RULES, "spacing": SPACINGS}
MAX_SEED_OR_STEPS = 10**9


class ResultsError(ValueError):
    """A pipeline output is missing, malformed or inconsistent (the message names the file)."""


@dataclass(frozen=True)
class Floor:
    """The real-vs-real FID (and KID) between two held-out sets of ``n_samples`` images, with its interval."""

    fid: float
    lo: float
    hi: float
    kid: float
    kid_std: float
    n_samples: int
    features: str
    interval: str  # one line naming the interval's method and level


@dataclass(frozen=True)
class Results:
    rows: pd.DataFrame  # fid.csv, one row per schedule x seed x sampler x steps, plus ``label``
    configs: pd.DataFrame  # one row per configuration, sorted by FID: see aggregate()
    comparisons: pd.DataFrame  # comparisons.csv: families "questions" and "ranking" (COMPARISON_COLUMNS)
    floor: Floor
    seeds: tuple[int, ...]
    schedules: tuple[str, ...]
    losses: dict[tuple[str, int], pd.DataFrame]  # (schedule, seed) -> loss.csv
    fid_curves: dict[tuple[str, int], pd.DataFrame]  # (schedule, seed) -> fid_curve.csv (step, fid, floor)
    samples: dict[tuple[str, str, int], np.ndarray]  # (schedule, label, steps) -> uint8 [N, C, H, W], seeds[0]
    real_images: np.ndarray  # uint8 [N, C, H, W] held-out images for the forward-process figure
    featurizer: dict[str, Any]
    params: dict[str, Any]
    timesteps: int
    zero_terminal_snr: bool
    nll: dict[str, pd.DataFrame] | None = None  # nll.csv, nll_terms.csv, nll_comparisons.csv (keys table, terms, pairs)

    @property
    def best(self) -> pd.Series | None:
        finite = self.configs[np.isfinite(self.configs["fid"])]
        return finite.iloc[0] if len(finite) else None


# ------------------------------------------------------------------------------------------------
# Reading files (each error names the file and what is missing)
# ------------------------------------------------------------------------------------------------
def read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not Path(path).is_file():
        raise ResultsError(f"{path} not found: run the stage that writes it (`dvc repro`)")
    df = pd.read_csv(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ResultsError(f"{path}: missing column(s) {', '.join(missing)}; expected columns: {', '.join(columns)}")
    return df


def read_json(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path} not found: run the stage that writes it (`dvc repro`)")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ResultsError(f"{path}: {path.stat().st_size} bytes; allowed: at most {MAX_JSON_BYTES}")
    obj = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(obj, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ResultsError(f"{path}: missing key(s) {', '.join(missing)}; expected keys: {', '.join(keys)}")
    return obj


def read_fid_table(path: Path) -> pd.DataFrame:
    """fid.csv with every contract column, one feature space, and a ``label`` column."""
    df = read_csv(path, FID_COLUMNS)
    if len(df) == 0:
        raise ResultsError(f"{path}: no rows")
    spaces = sorted(set(df["features"].astype(str)))
    if len(spaces) > 1:
        raise ResultsError(f"{path}: FIDs from several feature spaces ({', '.join(spaces)}); allowed: one")
    df = df.astype({"schedule": str, "sampler": str, "spacing": str, "features": str})
    check_names(df, path)
    df["label"] = [sampler_label(n, e) for n, e in zip(df["sampler"], df["eta"])]
    return df


def check_names(df: pd.DataFrame, path: Path) -> None:
    """The columns of ``fid.csv`` that become file names hold allowed values: schedule, sampler and spacing
    from ddpm/app/names.py, seed and steps whole numbers, eta a finite number; else ResultsError naming the line."""
    for col, allowed in NAME_COLUMNS.items():
        for i, v in enumerate(df[col]):
            if v not in allowed:
                raise ResultsError(f"{path} line {i + 2}: {col} = {v[:80]!r}; allowed: {', '.join(allowed)}")
    for col, lo in (("seed", 0), ("steps", 1), ("eta", None)):
        allowed = "a finite number" if lo is None else f"a whole number in [{lo}, {MAX_SEED_OR_STEPS}]"
        for i, v in enumerate(pd.to_numeric(df[col], errors="coerce")):
            whole = lo is None or (float(v).is_integer() and lo <= v <= MAX_SEED_OR_STEPS)
            if not (math.isfinite(v) and whole):
                raise ResultsError(f"{path} line {i + 2}: {col} = {df[col].iloc[i]!r}; allowed: {allowed}")


def inside(root: Path, rel: Path) -> Path:
    """``root / rel``, refused (ResultsError) unless it stays inside ``root`` once '..' is resolved (symlinks
    the repository's owner made, e.g. DVC's symlink cache, are followed as they are)."""
    path, base = Path(root) / rel, os.path.abspath(root)
    if Path(rel).is_absolute() or os.path.commonpath([os.path.abspath(path), base]) != base:
        raise ResultsError(f"{rel}: a path outside the repository {root}; allowed: paths inside it")
    return path


def read_comparisons(path: Path) -> pd.DataFrame:
    """comparisons.csv with every column of :data:`COMPARISON_COLUMNS` (verdicts as strings)."""
    df = read_csv(path, COMPARISON_COLUMNS)
    return df.astype({"question": str, "kind": str, "a": str, "b": str, "verdict": str, "family": str})


def read_floor(path: Path, features: str) -> Floor:
    s = read_json(path, SUMMARY_KEYS)
    if str(s["features"]) != features:
        raise ResultsError(f"{path}: features {s['features']!r} differ from fid.csv's {features!r}")
    return Floor(fid=float(s["fid_floor"]), lo=float(s["fid_floor_lo"]), hi=float(s["fid_floor_hi"]),
                 kid=float(s["kid_floor"]), kid_std=float(s["kid_floor_std"]), n_samples=int(s["n_samples"]),
                 features=str(s["features"]), interval=str(s["interval"]))


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def _t95(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def _aggregate_group(g: pd.DataFrame) -> dict[str, Any]:
    n = len(g)
    fid = g["fid"].to_numpy(np.float64)
    out = {"label": g["label"].iloc[0], "n_seeds": n, "fid": float(fid.mean()), "kid": float(g["kid"].mean())}
    if n == 1:
        out.update(fid_sd=float("nan"), fid_lo=float(g["fid_lo"].iloc[0]), fid_hi=float(g["fid_hi"].iloc[0]),
                   kid_sd=float(g["kid_std"].iloc[0]))
    else:
        sd = float(fid.std(ddof=1))
        half = _t95(n) * sd / math.sqrt(n)  # Student-t 95% interval of the mean over seeds
        out.update(fid_sd=sd, fid_lo=out["fid"] - half, fid_hi=out["fid"] + half,
                   kid_sd=float(g["kid"].std(ddof=1)))
    return out


def config_name(c: pd.Series | dict) -> str:
    """A configuration's name in comparisons.csv: ``<schedule>/<sampler label>-<steps>``."""
    return f"{c['schedule']}/{set_label(c['label'], c['steps'])}"


def paired(comparisons: pd.DataFrame, a: pd.Series, b: pd.Series) -> pd.Series:
    """The ranking's comparison of configurations a and b, oriented as FID(a) - FID(b) (effect, lo, hi, verdict)."""
    na, nb = config_name(a), config_name(b)
    rank = comparisons[comparisons["family"] == "ranking"]
    hit = rank[(rank["a"] == na) & (rank["b"] == nb)]
    if len(hit):
        return hit.iloc[0]
    hit = rank[(rank["a"] == nb) & (rank["b"] == na)]
    if not len(hit):
        raise ResultsError(f"{paths.COMPARISONS_CSV}: no paired comparison of {na} and {nb}; rerun the fid stage")
    r = hit.iloc[0].copy()
    r["effect"], r["lo"], r["hi"] = -r["effect"], -r["hi"], -r["lo"]
    return r


def aggregate(rows: pd.DataFrame, comparisons: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (CONFIG_KEYS + label, n_seeds, fid, fid_sd, fid_lo, fid_hi, kid, kid_sd),
    sorted by FID (NaN last), then ``rank`` (1 = best), ``tie`` (:data:`TIE_RULE` with the best one) and the
    paired difference to the best, FID(config) - FID(best): ``vs_best``, ``vs_best_lo``, ``vs_best_hi``."""
    groups = rows.groupby(CONFIG_KEYS, sort=False, dropna=False)
    df = pd.DataFrame([{**dict(zip(CONFIG_KEYS, k)), **_aggregate_group(g)} for k, g in groups])
    df = df.sort_values(["fid", "schedule", "label", "steps"], kind="mergesort", na_position="last")
    df = df.reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    df["tie"], df["vs_best"], df["vs_best_lo"], df["vs_best_hi"] = False, np.nan, np.nan, np.nan
    finite = np.isfinite(df["fid"])
    for i in np.flatnonzero(finite)[1:]:
        r = paired(comparisons, df.iloc[i], df.iloc[0])
        df.loc[i, ["tie", "vs_best", "vs_best_lo", "vs_best_hi"]] = [r["verdict"] == "tie", r["effect"], r["lo"],
                                                                     r["hi"]]
    df["tie"] = df["tie"].astype(bool)
    return df


def winners_by_steps(configs: pd.DataFrame, comparisons: pd.DataFrame) -> list[tuple[int, pd.Series, list[str]]]:
    """For each step count with several samplers: (steps, the best configuration, the other samplers whose best
    configuration at that step count ties with it by :data:`TIE_RULE`)."""
    out = []
    finite = configs[np.isfinite(configs["fid"])]
    for steps in sorted(set(int(s) for s in finite["steps"])):
        at = finite[finite["steps"] == steps]
        per_label = at.groupby("label", sort=False).head(1)  # configs are sorted: first = that sampler's best
        if len(per_label) < 2:
            continue
        win = per_label.iloc[0]
        tied = [r["label"] for _, r in per_label.iloc[1:].iterrows() if paired(comparisons, win, r)["verdict"] == "tie"]
        out.append((steps, win, tied))
    return out


def final_loss(df: pd.DataFrame) -> float | None:
    """Mean ``loss`` over the last 10% of logged steps (at least one row)."""
    if df is None or len(df) == 0:
        return None
    d = df.sort_values("step", kind="mergesort")
    n = max(1, int(math.ceil(0.1 * len(d))))
    vals = pd.to_numeric(d["loss"].iloc[-n:], errors="coerce").to_numpy(dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if len(vals) else None


# ------------------------------------------------------------------------------------------------
# Loading everything
# ------------------------------------------------------------------------------------------------
def _load_arrays(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise ResultsError(f"{path} not found: run the stage that writes it (`dvc repro`)")
    try:
        return paths.load_arrays(path, (key,))[key]  # bounded, and only this key is read
    except LimitError as err:
        raise ResultsError(str(err)) from err


def _load_model_files(root: Path, schedules: tuple[str, ...], seeds: tuple[int, ...]) -> tuple[dict, dict]:
    losses, curves = {}, {}
    for schedule in schedules:
        for seed in seeds:
            folder = inside(root, paths.model_dir(schedule=schedule, seed=seed))
            losses[(schedule, seed)] = read_csv(folder / paths.LOSS_CSV, LOSS_COLUMNS)
            curve = folder / paths.FID_CURVE_CSV
            if curve.is_file():  # absent when train.fid_every = 0
                curves[(schedule, seed)] = read_csv(curve, CURVE_COLUMNS)
    return losses, curves


def _load_samples(root: Path, rows: pd.DataFrame, seed: int, shape: tuple[int, ...]
                  ) -> dict[tuple[str, str, int], np.ndarray]:
    out = {}
    for r in rows[rows["seed"] == seed].itertuples(index=False):
        path = inside(root, paths.sample_path(schedule=r.schedule, seed=seed, name=r.sampler, eta=float(r.eta),
                                                 steps=int(r.steps)))
        out[(r.schedule, r.label, int(r.steps))] = paths.load_sample_set(path, shape)
    return out


NLL_FILES = {"table": ("nll.csv", ("schedule", "seed", "bpd", "bpd_lo", "bpd_hi", "prior", "decoder", "diffusion")),
             "terms": ("nll_terms.csv", ("schedule", "seed", "t_lo", "t_hi", "term")),
             "pairs": ("nll_comparisons.csv", ("seed", "a", "b", "effect", "lo", "hi", "p_holm", "verdict"))}


def read_nll(root: Path) -> dict[str, pd.DataFrame] | None:
    """The nll stage's tables under ``root``/reports (None when nll.csv is absent: a run without the nll stage)."""
    if not (root / paths.NLL_CSV).is_file():
        return None
    return {key: read_csv(root / paths.REPORTS / name, cols) for key, (name, cols) in NLL_FILES.items()}


def load_results(p: Any, root: str | Path = ".") -> Results:
    """Everything the report shows, from the files under ``root`` (the repository root); ``p``: the
    :class:`ddpm.app.config.Params`. The configurations come from ``fid.csv`` (the fid stage wrote one row per
    params.yaml grid cell and seed)."""
    root = Path(root)
    rows = read_fid_table(root / paths.FID_CSV)
    features = str(rows["features"].iloc[0])
    floor = read_floor(root / paths.FID_SUMMARY, features)
    featurizer = read_json(root / paths.FEATURIZER_METRICS, FEATURIZER_KEYS)
    if str(featurizer["features"]) != features:
        raise ResultsError(f"{root / paths.FEATURIZER_METRICS}: features {featurizer['features']!r} differ "
                           f"from fid.csv's {features!r}")
    comparisons = read_comparisons(root / paths.COMPARISONS_CSV)
    seeds = tuple(sorted(int(s) for s in set(rows["seed"])))
    schedules = tuple(dict.fromkeys(rows["schedule"]))
    losses, curves = _load_model_files(root, schedules, seeds)
    real = _load_arrays(root / paths.HOLDOUT, "images")[: p.report.forward_images]
    return Results(rows=rows, configs=aggregate(rows, comparisons), comparisons=comparisons, floor=floor, seeds=seeds,
                   schedules=schedules,
                   losses=losses, fid_curves=curves, samples=_load_samples(root, rows, seeds[0], real.shape[1:]), real_images=real,
                   featurizer=featurizer, params=p.to_dict(), timesteps=int(p.timesteps),
                   zero_terminal_snr=bool(p.diffusion.zero_terminal_snr), nll=read_nll(root))

