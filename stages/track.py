"""track: mirror every result the workspace holds into MLflow, whether DVC ran the stages that made it or not.

Runs on every `dvc repro` (always_changed, no outputs) after report. Each result is keyed by its content, so a
rerun finds what is there and adds nothing:
- a `train` run for each model that no run carries the hash of (tag model_sha256; e.g. a fresh clone where
  DVC skipped training): params, the loss curves of loss.csv, fid_train of fid_curve.csv, train.json's numbers;
- a `sample` run per row of reports/fid.csv (FID, its interval, KID, the floor; the report's sample grid of the
  first training seed) nested under its model's train run, keyed by tag result_key (the sample set's content
  hash, its row and the floor);
- on each model's train run, the nll stage's numbers (reports/nll.csv: nll_bpd, its interval, the prior, decoder
  and diffusion parts, in bits/dim), keyed by tag nll_key (the row's content) so a rerun adds nothing;
- a `report` run keyed by the report files' content (tag results_key): reports/metrics.json's numbers, and as
  artifacts report.md, report.html, fid.csv, fid_summary.json, metrics.json, comparisons.csv where present,
  figures/ (every sample grid).
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pandas as pd

from ddpm.app.config import load_params
from ddpm.app.names import sampler_label
from ddpm.app.paths import NLL_CSV, COMPARISONS_CSV, FID_CSV, FID_CURVE_CSV, FID_SUMMARY, LOSS_CSV, REPORT_METRICS, REPORTS, TRAIN_JSON, grid_name, load_sample_set, model_dir, read_json, sample_key, sample_path, setup_logging
from ddpm.io import file_sha256
from ddpm.app.results import NAME_COLUMNS, check_names
from ddpm.app.tracking.runs import Tracker, kernel_tags, pending_file
from ddpm.app.tracking.table import log_comparisons

REPORT_FILES = (REPORTS / "report.md", REPORTS / "report.html", FID_CSV, FID_SUMMARY, REPORT_METRICS,
                COMPARISONS_CSV, NLL_CSV)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def mirror_train(tracker: Tracker, p, schedule: str, seed: int, log) -> str | None:
    """The train run of models/<schedule>/seed<seed>: the one tagged with its hash, else one made from its files."""
    folder = model_dir(schedule, seed)
    if not (folder / "model.pt").is_file():
        return None
    sha = file_sha256(folder / "model.pt")
    found = tracker.train_run(sha)
    if found:
        return found
    summary = read_json(folder / TRAIN_JSON) if (folder / TRAIN_JSON).is_file() else {}
    run = tracker.start_run(f"train-{schedule}-seed{seed}",
                            params={**p.flat(), "schedule": schedule, "train_seed": seed},
                            tags={"kind": "train", "schedule": schedule, "seed": str(seed), "model_sha256": sha,
                                  "mirrored_by": "track", **kernel_tags(summary.get("kernels"))})
    rows = read_csv(folder / LOSS_CSV) if (folder / LOSS_CSV).is_file() else []
    curve = read_csv(folder / FID_CURVE_CSV) if (folder / FID_CURVE_CSV).is_file() else []
    tracker.log_metrics(run, rows + [{"step": r["step"], "fid_train": r["fid"]} for r in curve])
    if summary:
        tracker.log_metrics(run, [{"step": summary.get("steps", 0), "final_loss": summary.get("final_loss"),
                                   "skipped_steps": summary.get("skipped_steps")}])
    for name in (LOSS_CSV, FID_CURVE_CSV):
        if (folder / name).is_file():
            tracker.log_artifact(run, folder / name)
    tracker.end_run(run)
    log.info("track: train run for %s (model %s) made from its files", folder, sha[:12])
    return run


def result_key(images_key: str, row: dict[str, str], floor: dict) -> str:
    """The content key of one FID row: the sample set's hash, the row as fid.csv spells it, and the floor."""
    text = json.dumps([images_key, row, floor.get("fid_floor"), floor.get("features")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mirror_sample(tracker: Tracker, p, row: dict[str, str], floor: dict, parents: dict, log) -> bool:
    """One sample-set run for a row of fid.csv, unless a run with its result_key exists; True if made."""
    schedule, seed, steps, eta = row["schedule"], int(row["seed"]), int(row["steps"]), float(row["eta"])
    path = sample_path(schedule, seed, row["sampler"], eta, steps)
    images_key = sample_key(load_sample_set(path))  # bounded read: uint8 images or one line naming the file
    key = result_key(images_key, row, floor)
    if tracker.find_runs(tags={"result_key": key}):
        return False
    info = read_json(path.with_suffix(".json"))
    run = tracker.start_run(
        f"{schedule}-seed{seed}-{sampler_label(row['sampler'], eta)}-{steps}",
        params={"schedule": schedule, "seed": seed, "sampler": row["sampler"], "eta": eta, "steps": steps,
                "spacing": row["spacing"], "features": row["features"], "timesteps": p.timesteps,
                "n_samples": row["n_samples"], "objective": p.diffusion.objective},
        tags={"kind": "sample", "sample_key": images_key, "result_key": key, "schedule": schedule,
              **kernel_tags(info.get("kernels"))},
        parent_run_id=parents.get((schedule, seed)))
    tracker.log_metrics(run, [{"step": 0, **{m: row[m] for m in ("fid", "fid_lo", "fid_hi", "kid", "kid_std", "fid_inf") if m in row},
                               "fid_floor": floor.get("fid_floor")}])
    grid = REPORTS / "figures" / grid_name(schedule, sampler_label(row["sampler"], eta), steps)
    if seed == p.seeds[0] and grid.is_file():
        tracker.log_artifact(run, grid)
    tracker.end_run(run)
    log.info("track: sample run %s-seed%d-%s-%d", schedule, seed, sampler_label(row["sampler"], eta), steps)
    return True


NLL_METRICS = {"nll_bpd": "bpd", "nll_bpd_lo": "bpd_lo", "nll_bpd_hi": "bpd_hi", "nll_prior": "prior",
               "nll_decoder": "decoder", "nll_diffusion": "diffusion"}


def mirror_nll(tracker: Tracker, row: dict[str, str], parents: dict, log) -> bool:
    """The nll row of one model as metrics on its train run (tag nll_key = the row's content); True if logged."""
    run = parents.get((row["schedule"], int(row["seed"])))
    key = hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()[:16]
    if not run or tracker.find_runs(tags={"nll_key": key}):
        return False
    tracker.log_metrics(run, [{"step": 0, **{m: row[c] for m, c in NLL_METRICS.items()}}])
    tracker.set_tags(run, {"nll_key": key, "nll_estimator": row["estimator"], "nll_images": row["images"]})
    log.info("track: nll of %s seed %s on its train run", row["schedule"], row["seed"])
    return True


def mirror_report(tracker: Tracker, p, parents: dict, log) -> bool:
    """The report run, unless one with the same report files' content exists; True if made."""
    files = [f for f in REPORT_FILES if f.is_file()]
    if not files or not REPORT_METRICS.is_file():
        return False
    key = hashlib.sha256("".join(f"{f}:{file_sha256(f)}\n" for f in files).encode()).hexdigest()[:16]
    if tracker.find_runs(tags={"kind": "report", "results_key": key}):
        return False
    run = tracker.start_run("report", params=p.flat(), tags={
        "kind": "report", "results_key": key, "train_run_ids": ",".join(x for x in parents.values() if x)})
    metrics = read_json(REPORT_METRICS)
    tracker.log_metrics(run, [{"step": 0, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}])
    for f in files:
        if f != COMPARISONS_CSV:  # logged below, under comparisons/ where the UI shows it as a table
            tracker.log_artifact(run, f)
    if (REPORTS / "figures").is_dir():
        tracker.log_artifacts(run, REPORTS / "figures", "figures")
    if COMPARISONS_CSV.is_file():  # the question table as a table artifact, and questions_resolved as a metric
        log_comparisons(tracker, run, COMPARISONS_CSV)
    tracker.end_run(run)
    log.info("track: report run (%d files)", len(files))
    return True


def main() -> None:
    log = setup_logging()
    p = load_params()
    tracker = Tracker(enabled=p.tracking.enabled, experiment=p.tracking.experiment, pending_path=pending_file("track"))
    if not tracker.enabled:
        log.info("track: tracking.enabled is false; nothing to mirror")
        return
    parents = {(s, k): mirror_train(tracker, p, s, k, log) for s in p.diffusion.schedules for k in p.seeds}
    made = 0
    if FID_CSV.is_file():
        floor = read_json(FID_SUMMARY) if FID_SUMMARY.is_file() else {}
        rows = read_csv(FID_CSV)
        check_names(pd.DataFrame(rows, columns=[*NAME_COLUMNS, "seed", "steps", "eta"]).fillna(""), FID_CSV)
        made = sum(mirror_sample(tracker, p, row, floor, parents, log) for row in rows)
    if NLL_CSV.is_file():
        for row in read_csv(NLL_CSV):
            mirror_nll(tracker, row, parents, log)
    mirror_report(tracker, p, parents, log)
    log.info("track: %d new sample-set run(s) in MLflow", made)


if __name__ == "__main__":
    main()
