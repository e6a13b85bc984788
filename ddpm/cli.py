"""The ``ddpm`` command: what users type every day, each subcommand with ``--help``.

    ddpm table [--experiment E] [--filter F] [--csv] [--seeds]   the comparison table of sample-set runs
    ddpm import-pending FILE [--uri URI]                          replay what a stage could not send to MLflow
    ddpm serve [--port P]                                         `mlflow ui` on the project's store

Every subcommand of ``python -m ddpm.tracking`` (its :func:`ddpm.tracking.parser`) is a subcommand here under
the same name and runs there, so one added to that parser needs no code in this file. ``serve`` is this
file's own.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from . import tracking

PROG = "ddpm"


def tracking_commands() -> dict[str, str]:
    """{name: one-line help} of every subcommand in ddpm.tracking's parser."""
    for action in tracking.parser(PROG)._actions:  # argparse keeps subcommands in a private list
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="DDPM experiments: MLflow comparison tables and the UI. "
                                 "`ddpm COMMAND --help` for each command's options.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, help_ in tracking_commands().items():  # parsed by ddpm.tracking itself (see main)
        sub.add_parser(name, help=help_, add_help=False)
    s = sub.add_parser("serve", help="open `mlflow ui` on the project's tracking store and print its URL",
                       description="Start `mlflow ui` on the store the pipeline logs to ($MLFLOW_TRACKING_URI, "
                       "else sqlite:///mlflow.db at $DVC_ROOT or the current directory) and print the URL of "
                       "the runs table. Ctrl-C stops it.")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    s.add_argument("--uri", default=None, help="backend store URI (default: the pipeline's)")
    s.add_argument("--dry-run", action="store_true", help="print the command and the URL, start nothing")
    return ap


def serve_command(uri: str, host: str, port: int) -> list[str]:
    """The `mlflow ui` command line for a backend store ``uri``."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def serve(args: argparse.Namespace) -> int:
    uri = args.uri or tracking.default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is a server already: open {tracking.redact_uri(uri)}")
        return 0
    cmd = serve_command(uri, args.host, args.port)
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {tracking.redact_uri(uri)}: {url}", flush=True)
    # MLflow 3.17 picks GenAI or classic pages from `workflowType`, not from the experiment's tag alone
    for name, eid in tracking.experiments(uri).items():
        print(f"  {name}: {url}/#/experiments/{eid}/runs?workflowType=machine_learning", flush=True)
    if args.dry_run:
        print(" ".join(tracking.redact_uri(c) for c in cmd))
        return 0
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}  # 0.5 GB instead of 2 (FACTS)
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in tracking_commands():
        return tracking.main(argv, prog=PROG)
    args = parser().parse_args(argv)
    return serve(args)  # the only command parsed here


if __name__ == "__main__":
    sys.exit(main())
