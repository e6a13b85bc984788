"""report: the Markdown and self-contained HTML report, and reports/metrics.json, from DVC-tracked outputs only.

MLflow gets a copy: one `report` run (tag kind=report) with the summary metrics and the report files as
artifacts, and each sample set's grid PNG as an artifact of that set's `sample` run (logged by the fid stage).
"""
from __future__ import annotations

import pandas as pd

from ddpm.config import load_params
from ddpm.io import atomic_path, atomic_write_json
from ddpm.pipeline import (COMPARISONS_CSV, FID_CSV, REPORT_METRICS, REPORTS, file_sha256, model_dir, sample_key,
                           setup_logging)
from ddpm.report import build_report, summary_metrics
from ddpm.results import Results, load_results
from ddpm.tracking import Tracker, log_comparisons, pending_file


def write_plot_data(r: Results) -> None:
    """Long-format CSVs (a `series` column) for `dvc plots show` with the `multiline` template."""
    def series(schedule: str, seed: int) -> str:
        return schedule if len(r.seeds) == 1 else f"{schedule} seed{seed}"

    tables = {
        # loss rows averaged over blocks of 10 steps keep the plot light
        "loss.csv": pd.concat([df.assign(block=df["step"].sub(1) // 10).groupby("block", as_index=False)
                               .agg(step=("step", "max"), loss=("loss", "mean")).drop(columns="block")
                               .assign(series=series(*k)) for k, df in r.losses.items()], ignore_index=True),
        "fid_train.csv": pd.concat([df[["step", "fid", "floor"]].assign(series=series(*k))
                                    for k, df in r.fid_curves.items()] or [pd.DataFrame(columns=["step", "fid"])],
                                   ignore_index=True),
        "fid_steps.csv": r.configs.assign(series=r.configs["schedule"] + " " + r.configs["label"])
                                  [["steps", "fid", "fid_lo", "fid_hi", "series"]],
    }
    for name, df in tables.items():
        with atomic_path(REPORTS / "plots" / name) as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")


def log_to_mlflow(p, r: Results, out: dict, metrics: dict) -> None:
    """The report files into a new `report` run; each sample grid (first seed) into its sample set's run."""
    tracker = Tracker(enabled=p.tracking.enabled, experiment=p.tracking.experiment,
                      pending_path=pending_file("report"))
    models = {(s, k): model_dir(s, k) / "model.pt" for s in r.schedules for k in r.seeds}
    parents = {key: tracker.train_run(file_sha256(path)) if path.is_file() else None for key, path in models.items()}
    run = tracker.start_run("report", params=p.flat(), tags={
        "kind": "report", "train_run_ids": ",".join(x for x in parents.values() if x)})
    tracker.log_metrics(run, [{"step": 0, **metrics}])
    for path in (out["markdown"], out["html"], FID_CSV, REPORT_METRICS):
        tracker.log_artifact(run, path)
    tracker.log_artifacts(run, REPORTS / "figures", "figures")
    log_comparisons(tracker, run, COMPARISONS_CSV)  # the question table: `python -m ddpm.tracking table --questions`
    tracker.end_run(run)
    for (schedule, label, steps), images in r.samples.items():
        parent = parents[(schedule, r.seeds[0])]
        if parent:
            for run_id in tracker.find_runs(f"tags.sample_key = '{sample_key(images)}'", parent):
                tracker.log_artifact(run_id, out["grids"][(schedule, label, steps)])


def main() -> None:
    log = setup_logging()
    p = load_params()
    r = load_results(p)
    out = build_report(REPORTS, r, grid_images=p.report.grid_images, grid_scale=p.report.grid_scale)
    metrics = summary_metrics(r)
    atomic_write_json(REPORT_METRICS, metrics)
    write_plot_data(r)
    log_to_mlflow(p, r, out, metrics)
    log.info("report: %s and %s", out["markdown"], out["html"])


if __name__ == "__main__":
    main()
