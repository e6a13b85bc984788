"""fid: FID, its 95% interval and KID of every sample set (schedule x training seed x sampler x steps), and the floor;
the paired comparisons of the grid.

Writes reports/fid.csv (columns: COLUMNS; contract 2), reports/fid_summary.json (contract 3),
reports/comparisons.csv (ddpm.metrics.compare.COLUMNS: the question table and the ranking's pairs, each family Holm-adjusted)
and reports/features.npz (every set's features and the reference, for `ddpm compare`), all pure functions of their
inputs (no timings). The track stage mirrors them into MLflow.
"""
from __future__ import annotations

import pandas as pd

from ddpm.metrics import compare
from ddpm.app.config import load_params, resolve_device
from ddpm.metrics.features import extract_features, load_featurizer
from ddpm.metrics.fid import fid_from_features, fid_infinity, fid_interval, kid, perfect_model_fid
from ddpm.metrics.prdc import METRICS as PRDC, prdc_with_intervals
from ddpm.io import atomic_path
from ddpm.app.names import sampler_label
from ddpm.app.paths import COMPARISONS_CSV, FEATURES_NPZ, FEATURIZER, FID_CSV, FID_SUMMARY, load_arrays, load_sample_set, prepared_image_shape, sample_path, setup_logging, write_json

COLUMNS = ["schedule", "sampler", "eta", "steps", "fid", "n_samples", "features", "seed", "spacing", "fid_lo",
           "fid_hi", "kid", "kid_std", "fid_inf", *[f"{m}{x}" for m in PRDC for x in ("", "_lo", "_hi")]]
INTERVAL = "95% bootstrap interval for E[FID] at n_samples (basic bootstrap of both feature sets, 200 resamples)"
FID_INF = ("fid_inf: FID-infinity (Chong & Forsyth 2020): the line FID(k) = a + b / k fitted to subsets of k of the n "
           "features, extrapolated to 1 / k = 0; comparable across n (the reference's own bias stays in every value)")
FLOOR = ("fid_floor: what a perfect model (n i.i.d. draws of the data) is expected to score against this reference, "
         "first order: fid_floor_inf + slope / n; slope = the FID-infinity slope of random subsets of the held-out "
         "images, fid_floor_inf = the reference's own error, the 1/M share of the held-out plug-in (ddpm.metrics.fid."
         "perfect_model_fid); interval: normal, half-sample variance of the held-out set")
PRDC_NOTE = ("precision, recall (Kynkaanniemi et al. 2019), density, coverage (Naeem et al. 2020): prdc.compute_prdc "
             "with k = 5 against the FID reference; intervals: the FID interval's bootstrap, same resamples")
N_BOOT = 1000  # replicates of the paired bootstrap (18 cells: about 3 s)


def measure(feats, ref_feats) -> dict[str, float]:
    """fid (plug-in), fid_lo, fid_hi, kid, kid_std, fid_inf and precision, recall, density, coverage (each with
    _lo, _hi) of features [N, D] against the reference features."""
    lo, hi = fid_interval(feats, ref_feats)
    k, k_std = kid(feats, ref_feats)
    return {"fid": fid_from_features(feats, ref_feats), "fid_lo": lo, "fid_hi": hi, "kid": k, "kid_std": k_std,
            "fid_inf": fid_infinity(feats, ref_feats)[0], **prdc_with_intervals(feats, ref_feats)}


def floor_at(held, ref_feats, n: int) -> tuple[dict[str, float], int]:
    """The floor at n samples and the held-out count it was measured on: FID from ddpm.metrics.fid.perfect_model_fid
    (what a perfect model scores at n, any n); KID and precision/recall/density/coverage of min(n, m) held-out
    images against the reference."""
    try:
        fid = perfect_model_fid(held, ref_feats, n)
    except ValueError as e:
        raise SystemExit(f"sample.n_samples={n}: {e} (raise data.holdout_fraction)") from None
    real = held[:min(n, len(held))]
    k, k_std = kid(real, ref_feats)
    return {"fid": fid["fid"], "fid_lo": fid["lo"], "fid_hi": fid["hi"], "fid_inf": fid["inf"], "kid": k,
            "kid_std": k_std, **prdc_with_intervals(real, ref_feats)}, len(held)


def _images(schedule, seed, s, n):
    """The images of one sample set."""
    path = sample_path(schedule, seed, s.name, s.eta, s.steps)
    images = load_sample_set(path, prepared_image_shape())  # uint8 of the prepared shape, or one line naming it
    if len(images) != n:
        raise SystemExit(f"{path} has {len(images)} images, expected sample.n_samples={n}")
    return images


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
    ref = load_arrays(FEATURIZER / "reference.npz", ("features", "train_features", "holdout_features"))
    features, ref_feats, held = str(ref["features"]), ref["train_features"], ref["holdout_features"]
    floor, floor_real = floor_at(held, ref_feats, n)
    rows, cells = [], {}
    for schedule in p.diffusion.schedules:
        for seed in p.seeds:
            for s in p.sample.samplers:
                images = _images(schedule, seed, s, n)
                feats = extract_features(featurizer, images, device=device)
                cells[(schedule, seed, compare.set_label(sampler_label(s.name, s.eta), s.steps))] = feats
                m = measure(feats, ref_feats)
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
        "n_samples": n, "interval": INTERVAL, "fid_floor_inf": floor["fid_inf"], "fid_floor_real_images": floor_real,
        "fid_inf": FID_INF, "floor": FLOOR, "prdc": PRDC_NOTE, **{f"{m}_floor": floor[m] for m in PRDC}})
    write_comparisons(p, cells, ref_feats, features)


if __name__ == "__main__":
    main()
