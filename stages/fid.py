"""fid: FID of every sample set listed in params.yaml, at one sample count, and the real-vs-real floor.

Writes reports/fid.csv (schedule, sampler, eta, steps, fid, n_samples, features) and
reports/fid_summary.json; logs one nested MLflow run per sample set under its schedule's training run.
"""
from __future__ import annotations

import pandas as pd

from ddpm.config import load_params, resolve_device
from ddpm.fid import extract_features, feature_statistics, frechet_distance, load_featurizer
from ddpm.io import atomic_path
from ddpm.pipeline import (FEATURIZER, REPORTS, load_arrays, sample_key, sample_path, sampler_label, setup_logging,
                           read_json, timed, write_json)
from ddpm.tracking import Tracker, pending_file

COLUMNS = ["schedule", "sampler", "eta", "steps", "fid", "n_samples", "features", "spacing"]


def main() -> None:
    log = setup_logging()
    p = load_params()
    device = resolve_device(p.device)
    n = p.sample.n_samples
    featurizer = load_featurizer(FEATURIZER / "featurizer.pt", device=str(device))
    ref = load_arrays(FEATURIZER / "reference.npz")
    features = f"{p.featurizer.kind}-{ref['mu'].shape[0]}d"
    held = ref["holdout_features"]
    if len(held) < n:
        raise SystemExit(f"sample.n_samples: got {n}, but the held-out set has only {len(held)} images and the FID "
                         f"floor needs as many; allowed: at most {len(held)} (or raise data.holdout_fraction)")
    with timed() as t:
        floor = frechet_distance(*feature_statistics(held[:n]), ref["mu"], ref["sigma"])
        rows, keys = [], []
        for schedule, seed in ((sc, k) for sc in p.diffusion.schedules for k in p.seeds):
            for s in p.sample.samplers:
                for steps in [s.steps]:
                    path = sample_path(schedule, seed, s.name, s.eta, steps)
                    images = load_arrays(path)["images"]
                    if len(images) != n:
                        raise SystemExit(f"{sample_path(schedule, seed, s.name, s.eta, steps)} has {len(images)} images, "
                                         f"expected sample.n_samples={n}")
                    feats = extract_features(featurizer, images, device=device)
                    fid = frechet_distance(*feature_statistics(feats), ref["mu"], ref["sigma"])
                    rows.append([schedule, s.name, s.eta, steps, fid, n, features, p.sample.spacing])
                    keys.append((sample_key(images), read_json(path.with_suffix(".json")).get("model_sha256")))
                    log.info("fid %s %s x%d: %.3f (floor %.3f)", schedule, sampler_label(s.name, s.eta), steps, fid,
                             floor)
    table = pd.DataFrame(rows, columns=COLUMNS)
    with atomic_path(REPORTS / "fid.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_json(REPORTS / "fid_summary.json", {"fid_floor": floor, "n_samples": n, "features": features,
                                              "seconds": t["seconds"]})

    tracker = Tracker(enabled=p.tracking.enabled, experiment=p.tracking.experiment,
                      pending_path=pending_file("fid"))
    for row, (key, model_sha256) in zip(table.itertuples(index=False), keys):
        parent = tracker.train_run(model_sha256)
        # a sample set already logged under this parent (same images) needs no new run
        if parent and tracker.find_runs(f"tags.sample_key = '{key}' and tags.mlflow.parentRunId = '{parent}'"):
            continue
        run = tracker.start_run(
            f"{row.schedule}-{sampler_label(row.sampler, row.eta)}-{row.steps}",
            params={"schedule": row.schedule, "sampler": row.sampler, "eta": row.eta, "steps": row.steps,
                    "spacing": row.spacing, "timesteps": p.timesteps, "n_samples": n, "features": features, "seed": p.seed,
                    "objective": p.diffusion.objective},
            tags={"kind": "sample", "sample_key": key, "schedule": row.schedule}, parent_run_id=parent)
        tracker.log_metrics(run, [{"step": 0, "fid": row.fid, "fid_floor": floor}])
        tracker.end_run(run)
    log.info("fid: floor %.3f; best %.3f (%s)", floor, table["fid"].min(),
             ", ".join(str(v) for v in table.loc[table["fid"].idxmin(), ["schedule", "sampler", "steps"]]))


if __name__ == "__main__":
    main()
