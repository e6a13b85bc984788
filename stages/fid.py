"""fid: FID, its 95% interval and KID of every sample set (schedule x training seed x sampler x steps), and the floor.

Writes reports/fid.csv (columns: COLUMNS; contract 2) and reports/fid_summary.json (contract 3), both pure
functions of their inputs (no timings). The track stage mirrors them into MLflow.
"""
from __future__ import annotations

import pandas as pd

from ddpm.config import load_params, resolve_device
from ddpm.fid import extract_features, fid_from_features, fid_interval, kid, load_featurizer
from ddpm.io import atomic_path
from ddpm.pipeline import (FEATURIZER, FID_CSV, FID_SUMMARY, load_arrays, load_sample_set, prepared_image_shape,
                           sample_path, sampler_label, setup_logging, write_json)

COLUMNS = ["schedule", "sampler", "eta", "steps", "fid", "n_samples", "features", "seed", "spacing", "fid_lo",
           "fid_hi", "kid", "kid_std"]
INTERVAL = "95% bootstrap interval for E[FID] at n_samples (basic bootstrap of both feature sets, 200 resamples)"


def measure(feats, ref_feats) -> dict[str, float]:
    """fid (plug-in), fid_lo, fid_hi and kid, kid_std of features [N, D] against the reference features."""
    lo, hi = fid_interval(feats, ref_feats)
    k, k_std = kid(feats, ref_feats)
    return {"fid": fid_from_features(feats, ref_feats), "fid_lo": lo, "fid_hi": hi, "kid": k, "kid_std": k_std}


def _images(schedule, seed, s, n):
    """The images of one sample set."""
    path = sample_path(schedule, seed, s.name, s.eta, s.steps)
    images = load_sample_set(path, prepared_image_shape())  # uint8 of the prepared shape, or one line naming it
    if len(images) != n:
        raise SystemExit(f"{path} has {len(images)} images, expected sample.n_samples={n}")
    return images


def main() -> None:
    log = setup_logging()
    p = load_params()
    device = resolve_device(p.device)
    n = p.sample.n_samples
    featurizer = load_featurizer(FEATURIZER / "featurizer.pt", device=str(device))
    ref = load_arrays(FEATURIZER / "reference.npz", ("features", "train_features", "holdout_features"))
    features, ref_feats, held = str(ref["features"]), ref["train_features"], ref["holdout_features"]
    if len(held) < n:
        raise SystemExit(f"sample.n_samples: got {n}, but the held-out set has only {len(held)} images and the FID "
                         f"floor needs as many; allowed: at most {len(held)} (or raise data.holdout_fraction)")
    floor = measure(held[:n], ref_feats)
    rows = []
    for schedule in p.diffusion.schedules:
        for seed in p.seeds:
            for s in p.sample.samplers:
                images = _images(schedule, seed, s, n)
                m = measure(extract_features(featurizer, images, device=device), ref_feats)
                rows.append({"schedule": schedule, "sampler": s.name, "eta": s.eta, "steps": s.steps, "n_samples": n,
                             "features": features, "seed": seed, "spacing": p.sample.spacing, **m})
                log.info("fid %s seed %d %s x%d: %.3f [%.3f, %.3f] (floor %.3f)", schedule, seed,
                         sampler_label(s.name, s.eta), s.steps, m["fid"], m["fid_lo"], m["fid_hi"], floor["fid"])
    table = pd.DataFrame(rows, columns=COLUMNS)
    with atomic_path(FID_CSV) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_json(FID_SUMMARY, {
        "features": features, "fid_floor": floor["fid"], "fid_floor_lo": floor["fid_lo"],
        "fid_floor_hi": floor["fid_hi"], "kid_floor": floor["kid"], "kid_floor_std": floor["kid_std"],
        "n_samples": n, "interval": INTERVAL})


if __name__ == "__main__":
    main()
