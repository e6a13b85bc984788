"""fid: FID, its 95% interval and KID of every sample set (schedule x training seed x sampler x steps), and the floor;
the paired comparisons of the grid.

Writes reports/fid.csv (columns: COLUMNS; contract 2), reports/fid_summary.json (contract 3),
reports/comparisons.csv (ddpm.compare.COLUMNS: the question table and the ranking's pairs, each family Holm-adjusted)
and reports/features.npz (every set's features and the reference, for `python -m ddpm.tracking compare`), all pure
functions of their inputs (no timings); logs one nested MLflow run per sample set under its training run.
"""
from __future__ import annotations

import pandas as pd

from ddpm import compare
from ddpm.config import load_params, resolve_device
from ddpm.fid import extract_features, fid_from_features, fid_infinity, fid_interval, kid, load_featurizer
from ddpm.io import atomic_path
from ddpm.pipeline import (COMPARISONS_CSV, FEATURES_NPZ, FEATURIZER, REPORTS, load_arrays, read_json, sample_key,
                           sample_path, sampler_label, setup_logging, write_json)
from ddpm.tracking import Tracker, pending_file

COLUMNS = ["schedule", "sampler", "eta", "steps", "fid", "n_samples", "features", "seed", "spacing", "fid_lo",
           "fid_hi", "kid", "kid_std", "fid_inf"]
INTERVAL = "95% bootstrap interval for E[FID] at n_samples (basic bootstrap of both feature sets, 200 resamples)"
FID_INF = ("fid_inf: FID-infinity (Chong & Forsyth 2020): the line FID(k) = a + b / k fitted to subsets of k of the n "
           "features, extrapolated to 1 / k = 0; comparable across n (the reference's own bias stays in every value)")
N_BOOT = 1000  # replicates of the paired bootstrap (18 cells: about 3 s)


def measure(feats, ref_feats) -> dict[str, float]:
    """fid (plug-in), fid_lo, fid_hi and kid, kid_std of features [N, D] against the reference features."""
    lo, hi = fid_interval(feats, ref_feats)
    k, k_std = kid(feats, ref_feats)
    return {"fid": fid_from_features(feats, ref_feats), "fid_lo": lo, "fid_hi": hi, "kid": k, "kid_std": k_std,
            "fid_inf": fid_infinity(feats, ref_feats)[0]}


def floor_at(held, ref_feats, n: int) -> tuple[dict[str, float], int]:
    """The real-vs-real floor at n samples and the held-out count it was measured on: measured on n held-out
    images when there are as many; else on all m of them and carried from m to n along their FID-infinity
    line (its value at n; the interval shifted with it, its width that of m images: conservative)."""
    m = min(n, len(held))
    floor = measure(held[:m], ref_feats)
    if m < n:
        a, b = fid_infinity(held[:m], ref_feats)
        if a != a:  # NaN: too few held-out images for the fit
            raise SystemExit(f"sample.n_samples: got {n}, but the held-out set of {m} images is too small to carry the "
                             f"FID floor to n; allowed: at most {m} (or raise data.holdout_fraction)")
        shift = a + b / n - floor["fid"]
        floor.update(fid=floor["fid"] + shift, fid_lo=max(floor["fid_lo"] + shift, 0.0), fid_hi=floor["fid_hi"] + shift)
    return floor, m


def _images(schedule, seed, s, n):
    """The images of one sample set and the content hash of the model that drew them (from its .json)."""
    path = sample_path(schedule, seed, s.name, s.eta, s.steps)
    images = load_arrays(path)["images"]
    if len(images) != n:
        raise SystemExit(f"{path} has {len(images)} images, expected sample.n_samples={n}")
    return images, read_json(path.with_suffix(".json")).get("model_sha256")


def write_comparisons(p, cells, ref_feats, space: str) -> None:
    """reports/features.npz and reports/comparisons.csv: the paired bootstrap of every cell (seeded by params' seed),
    the questions of the schedule x sample-set grid, and the pairs the report's ranking states."""
    compare.save_features(FEATURES_NPZ, cells, ref_feats, space=space)
    table = compare.grid_comparisons(cells, ref_feats, n_boot=N_BOOT, seed=p.seed)
    with atomic_path(COMPARISONS_CSV) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def main() -> None:
    log = setup_logging()
    p = load_params()
    device = resolve_device(p.device)
    n = p.sample.n_samples
    featurizer = load_featurizer(FEATURIZER / "featurizer.pt", device=str(device))
    ref = load_arrays(FEATURIZER / "reference.npz")
    features, ref_feats, held = str(ref["features"]), ref["train_features"], ref["holdout_features"]
    floor, floor_real = floor_at(held, ref_feats, n)
    rows, keys, cells = [], [], {}
    for schedule in p.diffusion.schedules:
        for seed in p.seeds:
            for s in p.sample.samplers:
                images, model_sha256 = _images(schedule, seed, s, n)
                feats = extract_features(featurizer, images, device=device)
                cells[(schedule, seed, compare.set_label(sampler_label(s.name, s.eta), s.steps))] = feats
                m = measure(feats, ref_feats)
                rows.append({"schedule": schedule, "sampler": s.name, "eta": s.eta, "steps": s.steps, "n_samples": n,
                             "features": features, "seed": seed, "spacing": p.sample.spacing, **m})
                keys.append((sample_key(images), model_sha256))
                log.info("fid %s seed %d %s x%d: %.3f [%.3f, %.3f] (floor %.3f)", schedule, seed,
                         sampler_label(s.name, s.eta), s.steps, m["fid"], m["fid_lo"], m["fid_hi"], floor["fid"])
    table = pd.DataFrame(rows, columns=COLUMNS)
    with atomic_path(REPORTS / "fid.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_json(REPORTS / "fid_summary.json", {
        "features": features, "fid_floor": floor["fid"], "fid_floor_lo": floor["fid_lo"],
        "fid_floor_hi": floor["fid_hi"], "kid_floor": floor["kid"], "kid_floor_std": floor["kid_std"],
        "n_samples": n, "interval": INTERVAL, "fid_floor_inf": floor["fid_inf"], "fid_floor_real_images": floor_real,
        "fid_inf": FID_INF})
    write_comparisons(p, cells, ref_feats, features)
    _log_mlflow(p, table, keys, floor["fid"], n)


def _log_mlflow(p, table, keys, floor, n) -> None:
    tracker = Tracker(enabled=p.tracking.enabled, experiment=p.tracking.experiment,
                      pending_path=pending_file("fid"))
    for row, (key, model_sha256) in zip(table.itertuples(index=False), keys):
        parent = tracker.train_run(model_sha256)  # the training run is tagged with its model's hash
        # a sample set already logged under this parent (same images) needs no new run
        if parent and tracker.find_runs(f"tags.sample_key = '{key}' and tags.mlflow.parentRunId = '{parent}'"):
            continue
        run = tracker.start_run(
            f"{row.schedule}-seed{row.seed}-{sampler_label(row.sampler, row.eta)}-{row.steps}",
            params={"schedule": row.schedule, "seed": row.seed, "sampler": row.sampler, "eta": row.eta,
                    "steps": row.steps, "spacing": row.spacing, "features": row.features, "timesteps": p.timesteps,
                    "n_samples": n, "objective": p.diffusion.objective},
            tags={"kind": "sample", "sample_key": key, "schedule": row.schedule}, parent_run_id=parent)
        tracker.log_metrics(run, [{"step": 0, "fid": row.fid, "fid_lo": row.fid_lo, "fid_hi": row.fid_hi,
                                   "kid": row.kid, "kid_std": row.kid_std, "fid_floor": floor}])
        tracker.end_run(run)


if __name__ == "__main__":
    main()
