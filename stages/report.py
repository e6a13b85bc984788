"""report: the Markdown and self-contained HTML report, and reports/metrics.json, from DVC-tracked outputs only.

MLflow gets a copy: one `report` run (tag kind=report) with the summary metrics and the report files as
artifacts, and each sample set's grid PNG as an artifact of that set's `sample` run (logged by the fid stage).
"""
from __future__ import annotations

import pandas as pd

from ddpm.config import load_params
from ddpm.io import atomic_path, atomic_write_json
from ddpm.pipeline import (FEATURIZER, PREPARED, REPORTS, load_arrays, model_dir, read_json, sample_key, sample_path,
                           sampler_label, setup_logging, train_run_id)
from ddpm.report import build_report, summary_metrics
from ddpm.tracking import Tracker


def write_plot_data(losses: dict, fid_curves: dict, fid: pd.DataFrame) -> None:
    """Long-format CSVs (a `series` column) for `dvc plots show` with the `multiline` template."""
    tables = {
        # loss rows averaged over blocks of 10 steps keep the plot light
        "loss.csv": pd.concat([df.assign(block=df["step"].sub(1) // 10).groupby("block", as_index=False)
                               .agg(step=("step", "max"), loss=("loss", "mean")).drop(columns="block")
                               .assign(series=s) for s, df in losses.items()], ignore_index=True),
        "fid_train.csv": pd.concat([df.assign(series=s) for s, df in fid_curves.items()], ignore_index=True),
        "fid_steps.csv": fid.assign(series=fid["schedule"] + " " + fid["sampler"] + " eta=" + fid["eta"].astype(str))
                            [["steps", "fid", "series"]],
    }
    for name, df in tables.items():
        with atomic_path(REPORTS / "plots" / name) as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")


def log_to_mlflow(p, out: dict, metrics: dict, samples: dict) -> None:
    """The report files into a new `report` run; each sample grid into its sample set's run."""
    tracker = Tracker(enabled=p.tracking.enabled, experiment=p.tracking.experiment,
                      pending_path=REPORTS / "mlflow-pending.jsonl")
    parents = {schedule: train_run_id(schedule) for schedule in p.diffusion.schedules}
    run = tracker.start_run("report", params=p.flat(), tags={
        "kind": "report", "train_run_ids": ",".join(r for r in parents.values() if r)})
    tracker.log_metrics(run, [{"step": 0, **metrics}])
    for path in (out["markdown"], out["html"], REPORTS / "fid.csv", REPORTS / "metrics.json"):
        tracker.log_artifact(run, path)
    tracker.log_artifacts(run, REPORTS / "figures", "figures")
    tracker.end_run(run)
    for (schedule, label, steps), images in samples.items():
        if parents[schedule]:
            for run_id in tracker.find_runs(f"tags.sample_key = '{sample_key(images)}'", parents[schedule]):
                tracker.log_artifact(run_id, out["grids"][(schedule, label, steps)])


def main() -> None:
    log = setup_logging()
    p = load_params()
    fid = pd.read_csv(REPORTS / "fid.csv")
    summary = read_json(REPORTS / "fid_summary.json")
    timings = [("prepare", "", read_json(PREPARED / "meta.json").get("seconds", float("nan"))),
               ("featurizer", p.featurizer.kind, read_json(FEATURIZER / "metrics.json").get("seconds", float("nan")))]
    losses, fid_curves, samples = {}, {}, {}
    for schedule in p.diffusion.schedules:
        losses[schedule] = pd.read_csv(model_dir(schedule) / "loss.csv")
        fid_curves[schedule] = pd.read_csv(model_dir(schedule) / "fid_curve.csv")
        timings.append(("train", schedule, read_json(model_dir(schedule) / "train.json")["seconds"]))
        for s in p.sample.samplers:
            for steps in p.sample.steps:
                path = sample_path(schedule, s.name, s.eta, steps)
                samples[(schedule, sampler_label(s.name, s.eta), steps)] = load_arrays(path)["images"]
                timings.append(("sample", f"{schedule} {sampler_label(s.name, s.eta)} x{steps}",
                                read_json(path.with_suffix(".json"))["seconds"]))
    timings.append(("fid", "", summary.get("seconds", float("nan"))))
    featurizer = read_json(FEATURIZER / "metrics.json")
    real = load_arrays(PREPARED / "holdout.npz")["images"][: p.report.forward_images]
    out = build_report(
        REPORTS, fid=fid, fid_floor=summary["fid_floor"], n_samples=summary["n_samples"],
        features=summary["features"], losses=losses, fid_curves=fid_curves, timesteps=p.timesteps,
        zero_terminal_snr=p.diffusion.zero_terminal_snr, samples=samples, real_images=real, featurizer=featurizer,
        timings=pd.DataFrame(timings, columns=["stage", "item", "seconds"]), params=p.to_dict(),
        grid_images=p.report.grid_images, grid_scale=p.report.grid_scale,
    )
    metrics = summary_metrics(fid, summary["fid_floor"], losses, featurizer)
    atomic_write_json(REPORTS / "metrics.json", metrics)
    write_plot_data(losses, fid_curves, fid)
    log_to_mlflow(p, out, metrics, samples)
    log.info("report: %s and %s", out["markdown"], out["html"])


if __name__ == "__main__":
    main()
