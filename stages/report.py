"""report: the Markdown and self-contained HTML report, and reports/metrics.json, from DVC-tracked outputs only.

The track stage mirrors the report into MLflow (a `report` run with the summary metrics and the report files).
"""
from __future__ import annotations

import pandas as pd

from ddpm.app.config import load_params
from ddpm.io import atomic_path, atomic_write_json
from ddpm.app.paths import REPORT_METRICS, REPORTS, setup_logging
from ddpm.app.report.build import build_report, summary_metrics
from ddpm.app.results import Results, load_results


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


def main() -> None:
    log = setup_logging()
    p = load_params()
    r = load_results(p)
    out = build_report(REPORTS, r, grid_images=p.report.grid_images, grid_scale=p.report.grid_scale)
    metrics = summary_metrics(r)
    atomic_write_json(REPORT_METRICS, metrics)
    write_plot_data(r)
    log.info("report: %s and %s", out["markdown"], out["html"])


if __name__ == "__main__":
    main()
