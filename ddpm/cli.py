"""The ``ddpm`` command: what users type every day, each subcommand with ``--help``.

    ddpm table [--experiment E] [--filter F] [--csv] [--seeds]   the comparison table of sample-set runs
    ddpm table --questions [--file F | --run RUN_ID]              the question table (paired, family-wise)
    ddpm compare A B [--repo R] [--nll]                           B - A per configuration, paired by sample index
                                                                  (--nll: bits/dim, paired per held-out image)
    ddpm import-pending FILE [--uri URI] [--root R]               replay what a stage could not send to MLflow
    ddpm serve [--port P]                                         `mlflow ui` on the project's store

``python -m ddpm.cli`` is the same command.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ddpm.app.tracking.pending import import_pending
from ddpm.app.tracking.runs import _open_client
from ddpm.app.tracking.table import (COMPARISONS_ARTIFACT, _print_comparisons, compare_nll_revs, compare_revs,
                                     comparison_table, experiments, seed_summary)
from ddpm.app.tracking.uris import default_tracking_uri, install_log_redaction, redact, redact_uri

PROG = "ddpm"
URI_HELP = "tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db at $DVC_ROOT or the current directory)"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="DDPM experiments: MLflow comparison tables, paired "
                                 "comparisons and the UI. `ddpm COMMAND --help` for each command's options.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    t = sub.add_parser("table", help="compare sampling runs (sorted by FID)")
    t.add_argument("--experiment", default=None, help="experiment name (default: all)")
    t.add_argument("--filter", default="", help="MLflow filter, e.g. \"params.schedule = 'cosine'\"")
    t.add_argument("--uri", default=None, help=URI_HELP)
    t.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    t.add_argument("--seeds", action="store_true",
                   help="one row per configuration: FID and KID as mean and sd over training seeds")
    t.add_argument("--questions", action="store_true",
                   help="the question table: of --file (default reports/comparisons.csv) or of --run's artifact")
    t.add_argument("--file", default="reports/comparisons.csv", help="comparisons CSV for --questions")
    t.add_argument("--run", default=None, help="MLflow run id whose comparisons artifact --questions reads")
    c = sub.add_parser("compare", help="B - A per configuration and pooled, paired by sample index (A, B: git "
                                       "revisions or DVC experiment names; 'workspace': the working tree)")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--repo", default=".", help="the repository (default: the current directory)")
    c.add_argument("--n-boot", type=int, default=1000)
    c.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    c.add_argument("--nll", action="store_true", help="compare bits/dim (per held-out image, paired) instead of FID")
    p = sub.add_parser("import-pending", help="replay a Tracker's pending JSONL file")
    p.add_argument("file")
    p.add_argument("--uri", default=None, help=URI_HELP)
    p.add_argument("--root", default=None, help="project root whose output folders artifacts may come from "
                   "(default: $DVC_ROOT or the current directory)")
    s = sub.add_parser("serve", help="open `mlflow ui` on the project's tracking store and print its URL",
                       description="Start `mlflow ui` on the store the pipeline logs to ($MLFLOW_TRACKING_URI, "
                       "else sqlite:///mlflow.db at $DVC_ROOT or the current directory) and print the URL of "
                       "the runs table. Ctrl-C stops it.")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    s.add_argument("--uri", default=None, help="backend store URI (default: the pipeline's)")
    s.add_argument("--dry-run", action="store_true", help="print the command and the URL, start nothing")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    uri = getattr(args, "uri", None) or default_tracking_uri()
    commands = {"table": _table, "compare": _compare, "import-pending": _import, "serve": serve}
    try:
        return commands[args.cmd](args, uri)
    except Exception as exc:
        print(redact(f"error: {type(exc).__name__}: {exc}", uri), file=sys.stderr)
        return 1


def _table(args: argparse.Namespace, uri: str) -> int:
    if args.questions:
        return _questions(args, uri)
    df = comparison_table(args.experiment, args.filter, uri=uri)
    if args.seeds and not df.empty:
        df = seed_summary(df)
    if args.csv:
        sys.stdout.write(df.to_csv(index=False))
        if df.empty:
            print("no runs", file=sys.stderr)
    elif df.empty:
        print("no runs")
    else:
        import pandas as pd
        with pd.option_context("display.width", 250, "display.max_columns", None):
            print(df.to_string(index=False))
    return 0


def _questions(args: argparse.Namespace, uri: str) -> int:
    import pandas as pd

    path = Path(args.file)
    if args.run:
        path = Path(_open_client(uri).download_artifacts(args.run, COMPARISONS_ARTIFACT, tempfile.mkdtemp()))
    df = pd.read_csv(path)
    q = df[df["family"] == "questions"]
    main, inter = q[q["kind"] != "interaction"], q[q["kind"] == "interaction"]
    flagged = {(a, b) for a, b, v in zip(inter["a"], inter["b"], inter["verdict"]) if v != "tie"}
    main = main.assign(interaction=["yes" if (a, b) in flagged else "no" for a, b in zip(main["a"], main["b"])])
    _print_comparisons(main, ["question", "effect", "lo", "hi", "p_holm", "verdict", "interaction"])
    print(f"{int((main['verdict'] != 'tie').sum())} of {len(main)} main effects resolved at 95% family-wise "
          f"(Holm over {len(q)} verdicts: {len(main)} main effects, {len(inter)} interaction checks); "
          f"{main['method'].iloc[0] if len(main) else ''}")
    return 0


def _compare(args: argparse.Namespace, uri: str) -> int:
    if args.nll:  # bits/dim per model, paired per held-out image
        df = compare_nll_revs(args.a, args.b, args.repo)
        what, unit, method = "bpd(B) - bpd(A)", "models", "paired t over the held-out images"
    else:  # FID per configuration, paired by sample index
        df = compare_revs(args.a, args.b, args.repo, n_boot=args.n_boot)
        what, unit, method = "FID(B) - FID(A)", "configurations", None
    if args.csv:
        sys.stdout.write(df.to_csv(index=False))
        return 0
    _print_comparisons(df, ["question", "effect", "lo", "hi", "p", "p_holm", "verdict"])
    pooled = df[df["kind"] == "pooled"].iloc[0]
    print(f"B = {args.b}, A = {args.a}: {what} pooled over {len(df) - 1} {unit} = {pooled['effect']:.4g} "
          f"[{pooled['lo']:.4g}, {pooled['hi']:.4g}], {pooled['verdict']} (Holm over {len(df)} comparisons; "
          f"{method or pooled['method']})")
    return 0


def _import(args: argparse.Namespace, uri: str) -> int:
    mapping = import_pending(args.file, uri=uri, root=args.root)
    print(f"imported {len(mapping)} run(s) from {args.file} into {redact_uri(uri)}")
    for old, new in mapping.items():
        print(f"  {old} -> {new}")
    return 0


def serve_command(uri: str, host: str, port: int) -> list[str]:
    """The `mlflow ui` command line for a backend store ``uri``."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def serve(args: argparse.Namespace, uri: str) -> int:
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is a server already: open {redact_uri(uri)}")
        return 0
    cmd = serve_command(uri, args.host, args.port)
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {redact_uri(uri)}: {url}", flush=True)
    # MLflow 3.17 picks GenAI or classic pages from `workflowType`, not from the experiment's tag alone
    for name, eid in experiments(uri).items():
        print(f"  {name}: {url}/#/experiments/{eid}/runs?workflowType=machine_learning", flush=True)
    if args.dry_run:
        print(" ".join(redact_uri(c) for c in cmd))
        return 0
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}  # 0.5 GB instead of 2 (FACTS)
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
