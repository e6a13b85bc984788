"""Replaying a Tracker's pending JSONL file into an MLflow store (``ddpm import-pending``).

A pending file is data: it is checked whole before anything is written, creates only the runs it
describes, touches an existing run only with that run's writer key (``WRITER_TAG``), and copies artifacts
only from the project's output folders.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
from ddpm.app.tracking.runs import (_KEY, PENDING_PREFIX, RUN_ID, WRITER_TAG, _experiment_id, _open_client,
                                    _send_metrics, _send_params, _send_tags, _redacted, _writer_hash, eq_filter)
from ddpm.app.tracking.uris import default_tracking_uri, redact_uri


# --------------------------------------------------------------------------- replay

MAX_PENDING_BYTES = 256 << 20  # what import-pending reads of a file: size, lines, and one line
MAX_PENDING_LINES = 1_000_000
MAX_PENDING_LINE = 16 << 20
# import-pending copies artifacts only from these folders of the project root (.dvc/cache: DVC's symlinked outputs)
ARTIFACT_FOLDERS = ("models", "samples", "reports", "featurizer", ".dvc/cache")


class PendingError(ValueError):
    """A pending file that import-pending refuses: one line naming the file, the line, what it holds and
    what is allowed; raised before anything is written."""

    quotes_no_uri = True  # passes through runs._redacted unchanged


def _pending_lines(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, record) of a pending file, reading at most MAX_PENDING_BYTES, MAX_PENDING_LINES lines of
    MAX_PENDING_LINE bytes; a line that is not a JSON object is refused, except a truncated last one (a crash)."""
    out: list[tuple[int, dict]] = []
    bad: tuple[int, str] | None = None
    if not Path(path).is_file():
        raise PendingError(f"{path}: not a regular file; allowed: a pending .jsonl file")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_PENDING_BYTES:
            raise PendingError(f"{path}: {size} bytes; allowed: at most {MAX_PENDING_BYTES} (split the file)")
        for n, raw in enumerate(iter(lambda: fh.readline(MAX_PENDING_LINE + 1), b""), 1):
            if bad is not None:
                raise PendingError(f"{path} line {bad[0]}: {bad[1]}; allowed: one JSON object per line")
            if n > MAX_PENDING_LINES or len(raw) > MAX_PENDING_LINE:
                raise PendingError(f"{path} line {n}: over {MAX_PENDING_LINES} lines or {MAX_PENDING_LINE} bytes "
                                   "in a line; allowed: at most that")
            if raw.strip():
                try:
                    rec = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    rec = None
                if isinstance(rec, dict):
                    out.append((n, rec))
                else:
                    bad = (n, "not a JSON object")
    return out


def read_pending(path: str | os.PathLike) -> list[dict]:
    """Records of a pending file (a truncated last line, e.g. after a crash, is skipped); bounded as
    :func:`_pending_lines` says."""
    return [rec for _, rec in _pending_lines(path)]


_NAME = re.compile(r"[A-Za-z0-9_\-. /]{1,250}")  # MLflow's metric, param and tag names
_ARTIFACT_DIR = re.compile(r"[A-Za-z0-9_.-]{1,100}(/[A-Za-z0-9_.-]{1,100}){0,8}")
_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _need(ok: bool, where: str, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise PendingError(f"{where}: {field} = {str(value)[:80]!r}; allowed: {allowed}")


def _check_strs(where: str, field: str, d: Any, reserved: tuple[str, ...] = ()) -> None:
    _need(isinstance(d, dict), where, field, type(d).__name__, "a mapping of names to strings")
    for k, v in d.items():
        _need(_NAME.fullmatch(k) is not None and ".." not in k and not k.startswith(reserved), where,
              f"{field} name", k, "letters, digits, _ - . / and spaces, no '..'" +
              (f", not starting with {', '.join(reserved)}" if reserved else ""))
        _need(isinstance(v, str) and len(v) <= 8000, where, f"{field}[{k}]", v, "a string of <= 8000 characters")


def _check_metrics(where: str, ms: Any) -> None:
    _need(isinstance(ms, list), where, "metrics", type(ms).__name__, "a list of [name, value, step, time]")
    for m in ms:
        ok = (isinstance(m, list) and len(m) == 4 and isinstance(m[0], str) and _NAME.fullmatch(m[0]) is not None
              and isinstance(m[1], (int, float)) and all(isinstance(x, int) for x in m[2:]))
        _need(ok, where, "metric", m, "[name, number, integer step, integer time]")


def _inside(real: Path, roots: list[Path]) -> bool:
    return any(real == r or r in real.parents for r in roots)


def _check_artifact(where: str, rec: dict, root: Path) -> None:
    """The file (or every file under the folder) resolves inside the project's ARTIFACT_FOLDERS."""
    roots = [(root / f).resolve() for f in ARTIFACT_FOLDERS]
    allowed = f"a path in {', '.join(ARTIFACT_FOLDERS)} under {root}, no link leading out"
    path = rec.get("path")
    _need(isinstance(path, str) and 0 < len(path) < 4096 and "\0" not in path, where, "path", path, allowed)
    p = Path(path) if Path(path).is_absolute() else root / path
    _need(_inside(p.resolve(), roots), where, "path", path, allowed)
    ap = rec.get("artifact_path")
    _need(ap is None or (isinstance(ap, str) and _ARTIFACT_DIR.fullmatch(ap) is not None and ".." not in ap.split("/")),
          where, "artifact_path", ap, "none, or a relative folder of letters, digits, _ . - without '..'")
    if rec["op"] == "artifacts" and p.is_dir():
        for folder, dirs, files in os.walk(p):
            for name in dirs + files:
                q = Path(folder) / name
                _need(_inside(q.resolve(), roots), where, "a file under path", q, allowed)


def _check_record(where: str, rec: dict, root: Path) -> None:
    """One record's shape; PendingError naming ``where`` (file and line), the field and what is allowed."""
    op = rec.get("op")
    _need(op in _OPS, where, "op", op, ", ".join(_OPS))
    _need(isinstance(rec.get("run_id"), str) and RUN_ID.fullmatch(rec["run_id"]) is not None, where, "run_id",
          rec.get("run_id"), "a run id (32 hex digits, or pending-<32 hex digits>)")
    _need(rec.get("key") is None or (isinstance(rec["key"], str) and _KEY.fullmatch(rec["key"]) is not None),
          where, "key", "(hidden)", "32 hex digits")
    _OPS[op](where, rec, root)


def _check_start(where: str, rec: dict, root: Path) -> None:
    parent = rec.get("parent_run_id")
    _need(parent is None or (isinstance(parent, str) and RUN_ID.fullmatch(parent) is not None), where,
          "parent_run_id", parent, "none or a run id")
    for field in ("experiment", "name"):
        v = rec.get(field)
        _need(v is None or (isinstance(v, str) and 0 < len(v) <= 250), where, field, v, "a name of <= 250 characters")
    _need(rec.get("start_time") is None or isinstance(rec["start_time"], int), where, "start_time",
          rec.get("start_time"), "an integer (ms)")
    _check_strs(where, "params", rec.get("params") or {})
    _check_strs(where, "tags", rec.get("tags") or {})


def _check_end(where: str, rec: dict, root: Path) -> None:
    _need(rec.get("status", "FINISHED") in _STATUSES, where, "status", rec.get("status"), ", ".join(_STATUSES))
    _need(rec.get("end_time") is None or isinstance(rec["end_time"], int), where, "end_time", rec.get("end_time"),
          "an integer (ms)")


_OPS: dict[str, Callable[[str, dict, Path], None]] = {
    "start_run": _check_start,
    "metrics": lambda where, rec, root: _check_metrics(where, rec.get("metrics")),
    "params": lambda where, rec, root: _check_strs(where, "params", rec.get("params")),
    "tags": lambda where, rec, root: _check_strs(where, "tags", rec.get("tags"),
                                                 ("mlflow.", "pending_id", WRITER_TAG)),
    "artifact": _check_artifact,
    "artifacts": _check_artifact,
    "end_run": _check_end,
}


def _lookup(client, old: str, exp_ids: list[str]) -> tuple[Any, bool]:
    """(the target store's run with id ``old``, or else tagged pending_id = ``old`` (a checked id), or None;
    whether it was found by its pending_id, i.e. created by an earlier import)."""
    if not old.startswith(PENDING_PREFIX):
        with contextlib.suppress(Exception):
            return client.get_run(old), False
    found = client.search_runs(exp_ids, eq_filter([("tags.pending_id", old)]), max_results=1) if exp_ids else []
    return (found[0], True) if found else (None, False)


def _plan(client, path, lines: list[tuple[int, dict]]) -> tuple[dict[str, str | None], set[str]]:
    """({old id: the existing run its records go to, None: a run this import creates}, the old ids of runs
    an earlier import created, whose records are skipped). PendingError for a record that would touch an
    existing run without that run's writer key (a run the file did not create)."""
    exp_ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    started = {rec["run_id"] for _, rec in lines if rec["op"] == "start_run"}
    plan: dict[str, str | None] = {}
    writers: dict[str, str | None] = {}
    done: set[str] = set()
    for n, rec in lines:
        old = rec["run_id"]
        if old not in writers:
            run, imported = _lookup(client, old, exp_ids)
            writers[old] = run.data.tags.get(WRITER_TAG, "") if run is not None else None
            plan[old] = run.info.run_id if run is not None else (None if old in started else "")
            if imported and old in started and not _holds_key(rec, writers[old]):
                done.add(old)  # imported before from a file without its key: used as a parent, never touched
        if old not in done and writers[old] is not None and not _holds_key(rec, writers[old]):
            raise PendingError(f"{path} line {n}: {rec['op']} for run {old}, which exists in the store and which "
                               "this file did not create (no matching writer key); allowed: new runs, and runs "
                               "whose key the file holds")
    return plan, done


def _holds_key(rec: dict, writer: str | None) -> bool:
    return bool(writer) and rec.get("key") is not None and _writer_hash(rec["key"]) == writer


def _create(client, uri: str, rec: dict, parent: str | None, exp_ids: dict[str, str]) -> str:
    """A new run from a start record: its name, params and tags (no mlflow.* tag but the parent's), tagged
    pending_id = the old id and the writer hash of the record's key."""
    name = rec.get("experiment") or "Default"
    if name not in exp_ids:
        exp_ids[name] = _experiment_id(client, uri, name)
    tags = {k: v for k, v in (rec.get("tags") or {}).items() if not k.startswith("mlflow.") and k != WRITER_TAG}
    tags.update({"pending_id": rec["run_id"], **({"mlflow.parentRunId": parent} if parent else {}),
                 **({WRITER_TAG: _writer_hash(rec["key"])} if rec.get("key") else {})})
    run = client.create_run(exp_ids[name], start_time=rec.get("start_time"), tags=tags, run_name=rec.get("name"))
    _send_params(client, run.info.run_id, rec.get("params") or {})
    return run.info.run_id


def _send(client, rid: str, rec: dict, root: Path) -> None:
    op = rec["op"]
    if op == "metrics":
        _send_metrics(client, rid, rec["metrics"])
    elif op == "params":
        _send_params(client, rid, rec["params"])
    elif op == "tags":
        _send_tags(client, rid, rec["tags"])
    elif op == "end_run":
        client.set_terminated(rid, rec.get("status", "FINISHED"), rec.get("end_time"))
    else:
        p = Path(rec["path"]) if Path(rec["path"]).is_absolute() else root / rec["path"]
        if p.exists():
            (client.log_artifacts if op == "artifacts" else client.log_artifact)(
                rid, str(p.resolve()), rec.get("artifact_path"))
        else:
            log.warning("artifact %s of run %s no longer exists; skipped", rec["path"], rid)


def _replay(client, uri: str, lines, plan: tuple[dict, set], root: Path, created: list[str]) -> dict[str, str]:
    mapping = {old: rid for old, rid in plan[0].items() if rid}
    exp_ids: dict[str, str] = {}
    for _, rec in lines:
        old = rec["run_id"]
        if old in plan[1]:
            continue  # imported before: never touched again
        if rec["op"] == "start_run":
            if old not in mapping:
                parent = rec.get("parent_run_id")
                pid = (mapping.get(parent) or _lookup_id(client, parent)) if parent else None
                if parent and pid is None:
                    log.warning("parent run %s of %s not found in %s", parent, old, redact_uri(uri))
                mapping[old] = _create(client, uri, rec, pid, exp_ids)
                created.append(mapping[old])
        elif old in mapping:
            _send(client, mapping[old], rec, root)
        else:
            log.warning("skipping %s record: run %s unknown in %s", rec["op"], old, redact_uri(uri))
    return mapping


def _lookup_id(client, old: str) -> str | None:
    exp_ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    run = _lookup(client, old, exp_ids)[0]
    return run.info.run_id if run is not None else None


@_redacted
def import_pending(path: str | os.PathLike, uri: str | None = None, root: str | os.PathLike | None = None
                   ) -> dict[str, str]:
    """Replay a Tracker's pending JSONL file into ``uri`` (default: :func:`default_tracking_uri`).

    The file is data from someone else: every record is checked first (bounded size, run ids, names,
    artifact paths inside ``root``'s ARTIFACT_FOLDERS; ``root``: $DVC_ROOT or the current directory), and
    PendingError names the first bad line before anything is written. It creates the runs its
    ``start_run`` records describe (tag ``pending_id`` = the old id; so replaying twice, or a second file
    nested under a run of the first, works) and touches an existing run only with that run's writer key
    (:data:`WRITER_TAG`). If MLflow fails half-way, the runs it created are deleted again. Returns
    {old run id: run id in the target store}."""
    uri = uri or default_tracking_uri()
    root = Path(root or os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    lines = _pending_lines(path)
    for n, rec in lines:
        _check_record(f"{path} line {n}", rec, root)
    client = _open_client(uri)
    plan = _plan(client, path, lines)
    created: list[str] = []
    try:
        return _replay(client, uri, lines, plan, root, created)
    except Exception:
        for rid in created:
            with contextlib.suppress(Exception):
                client.delete_run(rid)
        raise
