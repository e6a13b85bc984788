"""The comparison tables read back from MLflow: one row per sample-set run (``ddpm table``), the seed
summary, the question table of ``reports/comparisons.csv`` (``ddpm table --questions``) and paired
comparisons across commits or experiments (``ddpm compare A B``).
"""
from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)
from ddpm.app.tracking.runs import Tracker, _open_client, _redacted, _search_all, _tag_experiment
from ddpm.app.tracking.uris import default_tracking_uri, sqlite_path


# What a reader compares first (the configuration, FID with its 95% interval, KID), then how it was
# measured, then where the row comes from; run ids last.
_PARAM_COLUMNS = ["schedule", "seed", "sampler", "eta", "steps", "spacing", "timesteps", "n_samples", "features"]
_METRIC_COLUMNS = ["fid", "fid_lo", "fid_hi", "kid", "kid_std", "fid_floor"]
TABLE_COLUMNS = ["schedule", "seed", "sampler", "eta", "steps", "spacing", *_METRIC_COLUMNS, "n_samples",
                 "timesteps", "features", "experiment", "dvc_exp_name", "git_commit", "start_time",
                 "run_id", "parent_run_id"]
_INT_COLUMNS = ["seed", "steps", "timesteps", "n_samples"]


# --------------------------------------------------------------------------- comparison table

@_redacted
def experiments(uri: str | None = None) -> dict[str, str]:
    """{name: id} of the store's experiments, each given the :data:`EXPERIMENT_TAGS` it lacks; {} for a
    SQLite file that does not exist (none is created)."""
    uri = uri or default_tracking_uri()
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        return {}
    client = _open_client(uri)
    found = list(client.search_experiments(max_results=1000))
    for exp in found:
        _tag_experiment(client, exp)
    return {e.name: e.experiment_id for e in found}


def _empty_table():
    import pandas as pd
    dtypes = {"start_time": "datetime64[ns, UTC]", "eta": "float64",
              **{c: "Int64" for c in _INT_COLUMNS}, **{c: "float64" for c in _METRIC_COLUMNS}}
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "object")) for c in TABLE_COLUMNS})


@_redacted
def comparison_table(experiment: str | None = None, filter_string: str = "",
                     uri: str | None = None):
    """One row per ``sample`` run (schedule x sampler x steps x run), sorted by FID.

    Columns (:data:`TABLE_COLUMNS`): schedule, seed, sampler, eta, steps, spacing, fid, fid_lo,
    fid_hi (the 95% interval), kid, kid_std, fid_floor, n_samples, timesteps, features, then
    experiment, dvc_exp_name, git_commit, start_time, run_id, parent_run_id; a value the run did
    not log is empty. ``experiment`` None: all experiments.
    ``filter_string``: an MLflow filter ANDed with ``tags.kind = 'sample'``, e.g.
    ``"params.schedule = 'cosine'"``. A param missing on a sample run is taken from its parent
    (train) run. An empty or missing store gives an empty DataFrame with these columns."""
    import pandas as pd
    uri = uri or default_tracking_uri()
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        return _empty_table()  # don't create a database just to read it
    client = _open_client(uri)
    if experiment is not None:
        exps = [e for e in [client.get_experiment_by_name(experiment)] if e is not None]
    else:
        exps = list(client.search_experiments(max_results=1000))
    if not exps:
        return _empty_table()
    names = {e.experiment_id: e.name for e in exps}
    filt = " and ".join(f for f in ("tags.kind = 'sample'", filter_string.strip()) if f)
    runs = _search_all(client, list(names), filt)
    parents: dict[str, dict] = {}

    def parent_params(pid: str | None) -> dict:
        if pid and pid not in parents:
            try:
                parents[pid] = client.get_run(pid).data.params
            except Exception:
                parents[pid] = {}
        return parents.get(pid, {}) if pid else {}

    rows = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        pid = tags.get("mlflow.parentRunId")
        row = {"experiment": names.get(run.info.experiment_id), "run_id": run.info.run_id,
               "parent_run_id": pid, "dvc_exp_name": tags.get("dvc_exp_name"),
               "git_commit": tags.get("git_commit"), "start_time": run.info.start_time}
        for col in _PARAM_COLUMNS:
            row[col] = params[col] if col in params else parent_params(pid).get(col)
        row.update({m: run.data.metrics.get(m) for m in _METRIC_COLUMNS})
        rows.append(row)
    if not rows:
        return _empty_table()
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    df["start_time"] = pd.to_datetime(df["start_time"], unit="ms", utc=True)
    for col in ("eta", *_METRIC_COLUMNS):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in _INT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df.sort_values(["fid", "run_id"], na_position="last", kind="stable").reset_index(drop=True)


SEED_GROUP = ["schedule", "sampler", "eta", "steps", "spacing", "n_samples", "features"]


def seed_summary(df):
    """One row per configuration of :func:`comparison_table`'s rows (``SEED_GROUP``) over its
    training seeds: ``n_seeds``, ``fid_mean``, ``fid_sd`` (sample sd; empty for one seed), ``kid_mean``,
    ``kid_sd``, sorted by ``fid_mean``. With one seed per configuration, differences between rows
    have not been tested against training noise."""
    keys = [c for c in SEED_GROUP if c in df.columns]
    g = df.groupby(keys, dropna=False, sort=False)
    out = g.agg(n_seeds=("seed", "nunique"), fid_mean=("fid", "mean"), fid_sd=("fid", "std"),
                kid_mean=("kid", "mean"), kid_sd=("kid", "std")).reset_index()
    out["n_seeds"] = out["n_seeds"].where(out["n_seeds"] > 0, g.size().to_numpy()).astype("Int64")
    return out.sort_values(["fid_mean", *keys], na_position="last", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- questions, compare

COMPARISONS_ARTIFACT = "comparisons/comparisons.csv"


def log_comparisons(tracker: "Tracker", run_id: str | None, path: str | os.PathLike) -> None:
    """Attach a comparisons table (reports/comparisons.csv, ddpm.metrics.compare.COLUMNS) to ``run_id`` as the CSV
    artifact :data:`COMPARISONS_ARTIFACT` (the UI shows it as a table), and log ``questions`` and
    ``questions_resolved`` (main effects of the design, family-wise) as metrics."""
    import pandas as pd

    df = pd.read_csv(path)
    main = df[(df["family"] == "questions") & (df["kind"] != "interaction")]
    tracker.log_artifact(run_id, path, "comparisons")
    tracker.log_metrics(run_id, [{"step": 0, "questions": len(main),
                                  "questions_resolved": int((main["verdict"] != "tie").sum())}])


def read_rev_file(rev: str, path: str, repo: str | os.PathLike = ".") -> bytes:
    """``path`` as of ``rev`` (a commit, branch, tag or DVC experiment name; ``workspace``: the working
    tree): from git when git tracks it there, else from DVC's cache (``dvc.api.read``)."""
    if rev == "workspace":
        return (Path(repo) / path).read_bytes()
    git = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True, timeout=60)
    if git.returncode == 0:
        return git.stdout
    import dvc.api

    try:
        return dvc.api.read(path, repo=str(repo), rev=rev, mode="rb")
    except Exception as exc:
        raise FileNotFoundError(f"{path} at {rev!r}: not in git ({git.stderr.decode().strip()[:200]}) nor in "
                                f"DVC ({type(exc).__name__}: {exc}); run the fid stage there first") from exc


def compare_revs(rev_a: str, rev_b: str, repo: str | os.PathLike = ".", *, n_boot: int = 1000, seed: int = 0,
                 path: str = "reports/features.npz"):
    """B - A per configuration and pooled (ddpm.metrics.compare.cross_table) from each side's features file."""
    from ddpm.metrics import compare

    (ca, ra, sa), (cb, rb, sb) = (compare.load_features(read_rev_file(r, path, repo)) for r in (rev_a, rev_b))
    if sa != sb:
        raise ValueError(f"{path}: feature spaces differ ({rev_a}: {sa!r}, {rev_b}: {sb!r}); FIDs are comparable "
                         "only in one feature space")
    return compare.cross_table(ca, ra, cb, rb, n_boot=n_boot, seed=seed)


def _nll_side(rev: str, repo) -> dict[tuple[str, int], dict]:
    """Per-image bpd and the held-out images' hash of every model reports/nll.csv lists at ``rev``."""
    import io
    import tempfile

    import pandas as pd

    from ddpm.app.paths import load_arrays, nll_path

    table = pd.read_csv(io.BytesIO(read_rev_file(rev, "reports/nll.csv", repo)))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for schedule, seed in zip(table["schedule"], table["seed"]):
            path = Path(tmp) / f"{schedule}-{seed}.npz"
            path.write_bytes(read_rev_file(rev, nll_path(str(schedule), int(seed)).as_posix(), repo))
            d = load_arrays(path)
            out[(str(schedule), int(seed))] = {"bpd": d["bpd"], "images": str(d.get("holdout_sha256", ""))}
    return out


def compare_nll_revs(rev_a: str, rev_b: str, repo: str | os.PathLike = ".", alpha: float = 0.05):
    """bpd(B) - bpd(A) per model and pooled, paired per held-out image (:func:`nll_cross_table`), from each side's
    reports/nll.csv and nll/<schedule>/seed<k>/nll.npz. Refused unless both sides scored the same images (the
    nll stage records their sha256)."""
    a, b = _nll_side(rev_a, repo), _nll_side(rev_b, repo)
    for key in (k for k in a if k in b):
        ha, hb = a[key]["images"], b[key]["images"]
        if not ha or ha != hb:
            raise ValueError(f"nll of {'/'.join(map(str, key))}: the held-out images differ or are unrecorded "
                             f"({rev_a}: {ha[:12] or 'none'}, {rev_b}: {hb[:12] or 'none'}); per-image pairing needs "
                             "the same images (same seed, data and nll.images); rerun the nll stage on both sides")
    return nll_cross_table({k: v["bpd"] for k, v in a.items()}, {k: v["bpd"] for k, v in b.items()}, alpha)


def nll_cross_table(per_image_a: Mapping[tuple, "np.ndarray"], per_image_b: Mapping[tuple, "np.ndarray"],
                    alpha: float = 0.05) -> "pd.DataFrame":
    """bpd(B) - bpd(A) for every model key (schedule, seed) on both sides, paired per held-out image, and pooled
    (per image, the mean over those models of B - A); Holm over all rows. Columns: question, kind (``model`` |
    ``pooled``), effect, lo, hi, p, p_holm, verdict (``A better``, ``B better`` or ``tie``; lower bpd wins).
    Pairing needs the same images in the same order on both sides: the caller checks that."""
    import numpy as np
    import pandas as pd

    from ddpm.metrics.compare import holm
    from ddpm.metrics.nll import paired

    common = [k for k in per_image_a if k in per_image_b]
    if not common:
        raise ValueError(f"no model in common: A has {list(per_image_a)[:3]}, B has {list(per_image_b)[:3]}")
    rows = [{"question": f"{'/'.join(map(str, k))}: B - A", "kind": "model",
             **paired(per_image_b[k], per_image_a[k])} for k in common]
    pooled_b = np.mean([per_image_b[k] for k in common], axis=0)
    pooled_a = np.mean([per_image_a[k] for k in common], axis=0)
    rows.append({"question": f"all {len(common)} models: B - A", "kind": "pooled", **paired(pooled_b, pooled_a)})
    df = pd.DataFrame(rows)
    df["p_holm"] = holm(df["p"].to_numpy())
    df["verdict"] = np.where(df["p_holm"] > alpha, "tie", np.where(df["effect"] < 0, "B better", "A better"))
    return df


def _print_comparisons(df, columns: list[str]) -> None:
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 90,
                           "display.float_format", "{:.4g}".format):
        print(df[columns].to_string(index=False))
