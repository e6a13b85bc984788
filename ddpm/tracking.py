"""MLflow tracking for the pipeline: the only module of the project that imports mlflow.

mlflow is imported lazily inside functions (``import mlflow`` costs ~1.6 s), so importing this
module is cheap and a disabled :class:`Tracker` never touches MLflow or creates a database.

Run layout (one MLflow experiment per pipeline, e.g. ``ddpm``)::

    train run            tags: kind=train, git_commit, dvc_exp_name, dvc_stage, ...
    |                    params: schedule, timesteps, lr, batch_size, ... (flat str -> scalar)
    |                    metrics: loss, loss_q0..loss_q3 (per-step loss curves, loss by quartile
    |                             of t), fid_train (FID over training)
    |                    artifacts: loss.csv, fid_curve.csv
    +-- sample run       nested (tag mlflow.parentRunId = the train run's id), one per
                         sampler x steps; tags: kind=sample, sample_key=...;
                         params: schedule, sampler, eta, steps, timesteps, n_samples;
                         metric: fid; artifact: the sample grid (samples_<...>.png)
    report run           one per report stage run; tags: kind=report, train_run_ids; params: all;
                         metrics: reports/metrics.json's numbers; artifacts: report.md,
                         report.html, fid.csv, metrics.json, figures/

:func:`comparison_table` lists the ``sample`` runs (one row per schedule x sampler x steps x run),
sorted by FID; ``python -m ddpm.tracking table`` prints it; ``table --questions`` prints the question table
of ``reports/comparisons.csv`` (or of a run's artifact, logged by :func:`log_comparisons`), and
``python -m ddpm.tracking compare A B`` pairs two experiments or commits (:func:`compare_revs`).

Where the data goes (:func:`default_tracking_uri`): ``$MLFLOW_TRACKING_URI`` if set (e.g. an
``mlflow server``), else ``sqlite:///<root>/mlflow.db`` with ``root = $DVC_ROOT`` (the real repo,
also when ``dvc exp run`` works in a temporary copy) or the current directory. SQLite databases are
put in WAL mode (and MLflow sets a 20 s busy timeout per session), so several processes can log at
once; local artifacts go to ``<root>/mlruns/<experiment>`` next to the database.

Failures never reach the caller: on the first MLflow error a :class:`Tracker` logs one warning,
stops talking to MLflow for the rest of the process, and appends everything it could not send to a
JSONL file (``pending_path``); a failed artifact upload only stops further uploads (the artifact
store is often separate, e.g. S3 behind a server). Replay it later, into the same or another store, with::

    python -m ddpm.tracking import-pending PENDING.jsonl [--uri URI]

or ``import_pending(path, uri)``. Replaying is idempotent (imported runs carry a ``pending_id``
tag, metrics already there are not duplicated by the SQL store). A pending file is data: it is checked
whole before anything is written, creates only the runs it describes, touches an existing run only with
that run's writer key (:data:`WRITER_TAG`), and copies artifacts only from the project's output folders.
Filters are built only from checked values (:func:`eq_filter`).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import subprocess
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
PENDING_PREFIX = "pending-"  # run ids handed out while the store is unreachable
RUN_ID = re.compile(r"(pending-)?[0-9a-f]{32}")  # MLflow's run ids (uuid4 hex) and our placeholders
# Each run a Tracker creates is tagged with the sha256 of a random key that only its pending records carry:
# a replayed file may touch an existing run only when it holds that run's key (see import_pending).
WRITER_TAG = "ddpm.writer_sha256"
# What a reader compares first (the configuration, FID with its 95% interval, KID), then how it was
# measured, then where the row comes from; run ids last.
_PARAM_COLUMNS = ["schedule", "seed", "sampler", "eta", "steps", "spacing", "timesteps", "n_samples", "features"]
_METRIC_COLUMNS = ["fid", "fid_lo", "fid_hi", "kid", "kid_std", "fid_floor"]
TABLE_COLUMNS = ["schedule", "seed", "sampler", "eta", "steps", "spacing", *_METRIC_COLUMNS, "n_samples",
                 "timesteps", "features", "experiment", "dvc_exp_name", "git_commit", "start_time",
                 "run_id", "parent_run_id"]
_INT_COLUMNS = ["seed", "steps", "timesteps", "n_samples"]
# The experiment type MLflow's UI offers for classic training runs (its "experiment kind" selector
# writes this tag). MLflow 3.17's UI opens pages by its sidebar switch instead (checked in headless
# Chromium): `#/experiments/<id>/runs?workflowType=machine_learning` opens the runs table.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


# --------------------------------------------------------------------------- secrets

SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
REDACTED = "***"
_USERINFO = re.compile(r"(?<=://)[^/@\s'\"]+@")  # user:password@ in any URL quoted in a message


def redact_uri(uri: str | None) -> str:
    """A tracking URI fit to print: user and password (``user:pw@``) and every query value
    (``?token=...``) replaced by ``***``; e.g. ``http://***@host:5000/?token=***``."""
    if not uri:
        return str(uri)
    out = _USERINFO.sub(REDACTED + "@", uri)
    base, sep, query = out.partition("?")
    if sep:
        query = "&".join(kv.split("=", 1)[0] + ("=" + REDACTED if "=" in kv else "") for kv in query.split("&"))
    return base + sep + query


def _secrets(uri: str | None) -> list[str]:
    """The secret substrings of ``uri`` (user info, query values, raw and %-decoded) and of the
    environment's MLflow credentials, longest first."""
    found = [os.environ.get(k, "") for k in SECRET_ENV]
    with contextlib.suppress(ValueError):
        parts = urlsplit(uri or "")
        if "@" in parts.netloc:
            userinfo = parts.netloc.rpartition("@")[0]
            found += [userinfo, *userinfo.split(":", 1)]
        found += [v for kv in parts.query.split("&") for v in kv.split("=", 1)[1:]]
        found += [v for _, v in parse_qsl(parts.query, keep_blank_values=True)]
    found += [unquote(f) for f in found]
    return sorted({f for f in found if f}, key=len, reverse=True)


def redact(text: str, uri: str | None = None) -> str:
    """``text`` with ``uri`` (default: the current tracking URI), any ``user:password@`` of a URL,
    and each secret of ``uri`` and of the environment redacted: for warnings, logs and error
    messages that quote a URI or a server's reply. Secrets shorter than 4 characters are only
    redacted in those URL forms (replacing every "ab" in a text would garble it)."""
    uri = uri if uri is not None else default_tracking_uri()
    text = str(text).replace(uri, redact_uri(uri)) if uri else str(text)
    text = _USERINFO.sub(REDACTED + "@", text)
    with contextlib.suppress(ValueError):
        for key in {k for k, _ in parse_qsl(urlsplit(uri or "").query, keep_blank_values=True)}:
            text = re.sub(rf"(?<=[?&]{re.escape(key)}=)[^&#\s'\"]+", REDACTED, text)
    for secret in _secrets(uri):
        if len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text


class _RedactFilter(logging.Filter):
    """Rewrites log records (ours, MLflow's, urllib3's) so no tracking secret reaches a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_REDACT_FILTER = _RedactFilter()


def install_log_redaction() -> None:
    """Attach the redacting filter to the handlers that exist now (root's and MLflow's own), and
    to the loggers that speak about the tracking store."""
    for name in ("", "mlflow", "urllib3", "urllib3.connectionpool", __name__):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if _REDACT_FILTER not in target.filters:
                target.addFilter(_REDACT_FILTER)


def pending_file(name: str | None = None) -> Path:
    """Where a stage keeps tracking data it could not send: ``<root>/mlflow-pending/<name>.jsonl``,
    ``root`` as for ``mlflow.db`` ($DVC_ROOT, else the current directory); ``name`` defaults to
    $DVC_STAGE. Outside every DVC output (git- and DVC-ignored): `dvc push` never uploads it and
    a rerun never deletes it."""
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    name = name or os.environ.get("DVC_STAGE") or "ddpm"
    safe = "".join(c if c.isalnum() or c in "._@-" else "_" for c in name).lstrip(".") or "ddpm"
    return root / "mlflow-pending" / f"{safe}.jsonl"


# --------------------------------------------------------------------------- URIs and SQLite

def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///<$DVC_ROOT or cwd>/mlflow.db`` (absolute path).

    Pure: creates nothing (the database is prepared when a client first opens it)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other URIs and in-memory DBs)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(path).resolve() if path and path != ":memory:" else None


def enable_wal(path: Path) -> None:
    """Put a SQLite database in WAL mode (persistent in the file), creating the file if needed.

    MLflow still creates its schema in such a file: it checks for its tables, not for the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=30)
    try:
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def init_lock_path(db: Path) -> Path:
    """The set-up lock of a SQLite store: ``<db>-init.lock`` beside the database (``mlflow.db-init.lock``,
    git-ignored), never a predictable name in the shared temp folder."""
    return db.with_name(db.name + "-init.lock")


def _open_lock(path: Path) -> int:
    """Open (or create, mode 0600) a lock file without truncating it and without following a symlink."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        if path.is_symlink():
            raise OSError(f"{path}: a symbolic link where the MLflow set-up lock belongs; allowed: a regular "
                          f"file (remove the link)") from None
        raise exc


@contextlib.contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """Serialise first-time store setup across processes (MLflow's tracking store creates its
    tables without a lock, so two stages starting on a fresh DB would race)."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(init_lock_path(path))
    try:
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (Windows, odd FS): go on unlocked
            pass
        try:
            enable_wal(path)
        except (sqlite3.Error, OSError) as exc:  # not fatal: MLflow reports real problems itself
            log.debug("could not enable WAL on %s: %s", path, exc)
        yield
    finally:
        os.close(fd)


def _import_mlflow(uri: str):
    """Import mlflow with offline-friendly defaults (each overridable from the environment)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # keep stdout clean
    if uri.startswith(("http://", "https://")):
        # MLflow's defaults retry for ~4 minutes per call when the server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import mlflow
    return mlflow


def _open_client(uri: str):
    """An MlflowClient whose store is initialised (schema created, WAL on) under the init lock."""
    mlflow = _import_mlflow(uri)
    with _init_lock(uri):
        client = mlflow.MlflowClient(uri)
        client.search_experiments(max_results=1)  # forces store creation / schema migration
    return client


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For SQLite stores, keep artifacts next to the DB (not in a DVC temp copy's cwd)."""
    path = sqlite_path(uri)
    if path is None:
        return None  # a server decides (its artifact root)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in experiment) or "default"
    return str(path.parent / "mlruns" / safe)


def _tag_experiment(client, exp) -> None:
    """Give an experiment made before :data:`EXPERIMENT_TAGS` (or by hand) the tags it lacks; a value
    someone chose (in the UI's selector) stays."""
    for key, value in EXPERIMENT_TAGS.items():
        if key not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, key, value)


def _experiment_id(client, uri: str, name: str, create: bool = True) -> str | None:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        _tag_experiment(client, exp)
        return exp.experiment_id
    if not create:
        return None
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri, name),
                                        tags=EXPERIMENT_TAGS)
    except Exception:  # created meanwhile by another process?
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


_GIT_COMMITS: dict[str, str | None] = {}  # cached per process and directory


def git_commit() -> str | None:
    """``git rev-parse HEAD`` in $DVC_ROOT (or cwd); None when unavailable."""
    where = os.environ.get("DVC_ROOT") or os.getcwd()
    if where not in _GIT_COMMITS:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                 text=True, timeout=10)
            _GIT_COMMITS[where] = (out.stdout.strip() or None) if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            _GIT_COMMITS[where] = None
    return _GIT_COMMITS[where]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _rows_to_metrics(rows: list[dict], step_key: str, ts: int) -> list[list]:
    """[{step: 3, loss: 0.1, ...}, ...] -> [[key, value, step, timestamp], ...], NaN/non-numbers skipped."""
    out: list[list] = []
    for row in rows:
        try:
            step = int(row.get(step_key, 0))
        except (TypeError, ValueError):
            continue  # a row without a usable step cannot be placed on a curve
        for key, value in row.items():
            if key == step_key or value is None:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isnan(value):
                out.append([key, value, step, ts])
    return out


def _chunks(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _send_metrics(client, run_id: str, metrics: list[list]) -> None:
    from mlflow.entities import Metric
    objs = [Metric(k, v, ts, step) for k, v, step, ts in metrics]
    for chunk in _chunks(objs, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk, synchronous=True)


def _send_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param
    objs = [Param(k, v) for k, v in params.items()]
    for chunk in _chunks(objs, MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=chunk, synchronous=True)


def _send_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag
    objs = [RunTag(k, v) for k, v in tags.items()]
    for chunk in _chunks(objs, MAX_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk, synchronous=True)


def kernel_tags(record: dict | None) -> dict[str, str]:
    """A kernel record (:func:`ddpm.kernels.kernel_record`, kept in model files, train.json and sample .json files)
    as run tags: kernels.fused_kernels, kernels.isa, kernels.aten_isa, kernels.reason."""
    return {f"kernels.{k}": str(v) for k, v in (record or {}).items() if v is not None}


def _str_params(params: dict | None) -> dict[str, str]:
    return {str(k): str(v)[:MAX_PARAM_LENGTH] for k, v in (params or {}).items()}


def _str_tags(tags: dict | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (tags or {}).items() if v is not None}


# --------------------------------------------------------------------------- filters

_FILTER_FIELD = re.compile(r"(tags|params|attributes)\.[A-Za-z0-9_.]{1,200}")  # e.g. tags.mlflow.parentRunId
_FILTER_VALUE = re.compile(r"[A-Za-z0-9_.:@+-]{0,250}")  # no quote, backslash, space or wildcard
_FILTER_CLAUSE = re.compile(r"\s*([^\s=]+)\s*=\s*'([^']*)'\s*")


def eq_filter(conditions: list[tuple[str, str]]) -> str:
    """An MLflow filter ``a = 'x' and b = 'y'`` built only from checked fields and values (a value with a
    quote, space or backslash is refused, so nothing read from a file can change the query); ValueError."""
    for field, value in conditions:
        if not _FILTER_FIELD.fullmatch(str(field)):
            raise ValueError(f"MLflow filter field {str(field)[:80]!r}; allowed: tags.<name>, params.<name>")
        if not isinstance(value, str) or not _FILTER_VALUE.fullmatch(value):
            raise ValueError(f"MLflow filter value for {field}: {str(value)[:80]!r}; allowed: up to 250 "
                             "letters, digits and _ . : @ + -")
    return " and ".join(f"{field} = '{value}'" for field, value in conditions)


def filter_pairs(text: str) -> list[tuple[str, str]]:
    """``"tags.kind = 'train' and tags.x = 'y'"`` -> [(field, value), ...]; ValueError for anything else."""
    text = (text or "").strip()
    if not text:
        return []
    pairs = []
    for clause in re.split(r"\s+and\s+", text, flags=re.IGNORECASE):
        m = _FILTER_CLAUSE.fullmatch(clause)
        if m is None:
            raise ValueError(f"MLflow filter {text[:120]!r}: clause {clause[:80]!r}; allowed: field = 'value' "
                             "clauses joined by 'and'")
        pairs.append((m[1], m[2]))
    return pairs


def _writer_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --------------------------------------------------------------------------- Tracker

class _DropRetryWarnings(logging.Filter):
    """Drops urllib3's "Retrying (Retry(...)) after connection broken by ..." warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Retrying")


_RETRY_FILTER = _DropRetryWarnings()


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """While a Tracker talks to MLflow, silence urllib3's per-retry warnings (two per call to a
    dead server, before the Tracker's own warning): the user gets the one warning of the Tracker."""
    pool_log = logging.getLogger("urllib3.connectionpool")
    pool_log.addFilter(_RETRY_FILTER)
    try:
        yield
    finally:
        pool_log.removeFilter(_RETRY_FILTER)



class Tracker:
    """Logs runs of one process to MLflow; cheap, and never raises into the caller.

    ``Tracker(enabled, experiment, uri=None, pending_path=None)``: every method is a no-op when
    ``enabled`` is false (no mlflow import, no database). On the first MLflow error (server down,
    DB locked, store lost, ...) it logs one warning naming the URI and the error, marks itself
    ``failed`` and from then on appends what it could not send to ``pending_path`` (JSONL; None:
    dropped). An artifact upload that fails sets only ``artifacts_failed``: later artifacts are kept
    in the file, metrics still go to MLflow. While failed, ``start_run`` returns a placeholder id ``pending-<hex>`` that the other
    methods accept. Replay the file later with ``python -m ddpm.tracking import-pending FILE
    [--uri URI]`` (or :func:`import_pending`). Each run it creates is tagged with the sha256 of a random
    writer key that its pending records carry; records for runs it did not create are not kept.
    ``find_runs`` raises ValueError for a filter value outside :func:`eq_filter`'s pattern.
    """

    def __init__(self, enabled: bool, experiment: str, uri: str | None = None,
                 pending_path: str | os.PathLike | None = None) -> None:
        self.enabled = bool(enabled)
        self.experiment = experiment
        self.uri = (uri or default_tracking_uri()) if self.enabled else uri
        if self.enabled:
            install_log_redaction()
        self.pending_path = Path(pending_path) if pending_path is not None else None
        self.failed = False
        self.artifacts_failed = False  # the artifact store failed (the tracking store may still work)
        self._warned: set[str] = set()  # one warning per kind ("failed", "pending")
        self._client = None
        self._exp_id: str | None = None
        self._runs: dict[str, dict] = {}  # start records of runs created here (replayable on failure)
        self._keys: dict[str, str] = {}  # run id -> the writer key of a run created here (see WRITER_TAG)

    # ---- plumbing
    def _get_client(self):
        if self._client is None:
            self._client = _open_client(self.uri)
        return self._client

    def _get_exp_id(self) -> str:
        if self._exp_id is None:
            self._exp_id = _experiment_id(self._get_client(), self.uri, self.experiment)
        return self._exp_id

    def _warn(self, message: str, kind: str = "failed") -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            where = (f"unsent data goes to {self.pending_path} (replay: python -m ddpm.tracking "
                     f"import-pending {self.pending_path})" if self.pending_path else
                     "unsent data is dropped (no pending_path)")
            log.warning("MLflow tracking at %s: %s; %s", redact_uri(self.uri), redact(message, self.uri), where)

    def _fail(self, op: str, exc: BaseException) -> None:
        self.failed = True
        msg = " ".join(str(exc).split())
        self._warn(f"{op} failed: {type(exc).__name__}: {msg[:500]}; tracking is off for the rest "
                   f"of this process")
        # The runs created so far, so that the file can also be replayed into another store.
        for rec in self._runs.values():
            self._keep(rec)

    def _keep(self, record: dict | None) -> None:
        """Append ``record`` to the pending file, with the writer key of its run; a record for a run this
        process did not create is dropped (a replayed file may only touch the runs it created)."""
        if record is None or self.pending_path is None:
            return
        if record.get("run_id") not in self._keys:
            if "foreign" not in self._warned:
                self._warned.add("foreign")
                log.warning("MLflow tracking: %s for run %s, which another process created, is not kept in %s (a "
                            "pending file may only touch the runs it created)", record.get("op"),
                            record.get("run_id"), self.pending_path)
            return
        record = {**record, "key": self._keys[record["run_id"]]}
        try:
            self.pending_path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"uri": redact_uri(self.uri), **record}) + "\n"
            with open(self.pending_path, "a", encoding="utf-8") as fh:
                with contextlib.suppress(ImportError, OSError):
                    import fcntl
                    fcntl.flock(fh, fcntl.LOCK_EX)  # several processes may share one file
                fh.write(line)
        except Exception as exc:  # never raise, even for a full disk
            log.warning("could not write pending MLflow data to %s: %s", self.pending_path, redact(str(exc), self.uri))

    def _do(self, op: str, run_id: str | None, record: dict | None, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` against MLflow, or keep ``record`` for later when that is not possible."""
        if not self.enabled:
            return None
        if self.failed or (run_id or "").startswith(PENDING_PREFIX):
            if not self.failed:
                self._warn(f"{op} on run {run_id}, which is pending (its start never reached "
                           f"MLflow)", kind="pending")
            self._keep(record)
            return None
        try:
            with _quiet_retries():
                return fn()
        except Exception as exc:
            self._fail(op, exc)
            self._keep(record)
            return None

    # ---- API
    def start_run(self, name: str, params: dict | None = None, tags: dict | None = None,
                  parent_run_id: str | None = None) -> str | None:
        """Create a run (nested under ``parent_run_id`` if given); returns its id (None: disabled,
        or failed without a pending file; ``pending-<hex>``: failed, kept in the pending file)."""
        if not self.enabled:
            return None
        all_tags = {"git_commit": git_commit(), "dvc_exp_name": os.environ.get("DVC_EXP_NAME"),
                    "dvc_stage": os.environ.get("DVC_STAGE")}
        all_tags.update(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        key = secrets.token_hex(16)
        all_tags[WRITER_TAG] = _writer_hash(key)
        rec = {"op": "start_run", "experiment": self.experiment, "name": name,
               "params": _str_params(params), "tags": _str_tags(all_tags),
               "parent_run_id": parent_run_id, "start_time": _now_ms()}

        def create() -> str:
            client = self._get_client()
            run = client.create_run(self._get_exp_id(), start_time=rec["start_time"],
                                    tags=rec["tags"], run_name=name)
            self._runs[run.info.run_id] = {**rec, "run_id": run.info.run_id}
            self._keys[run.info.run_id] = key
            return run.info.run_id

        placeholder = PENDING_PREFIX + uuid.uuid4().hex
        self._keys[placeholder] = key
        rid = self._do("start_run", parent_run_id, {**rec, "run_id": placeholder}, create)
        if rid is None:  # failed: the start went to the pending file (if any)
            return placeholder if self.pending_path is not None else None
        self.log_params(rid, rec["params"])
        return rid

    def writer_key(self, run_id: str | None) -> str | None:
        """The writer key of a run this Tracker created (a secret: keep it only where the run's resume state
        is, e.g. a resume checkpoint, never in an output)."""
        return self._keys.get(run_id or "")

    def adopt(self, run_id: str | None, key: str | None) -> None:
        """Continue a run an earlier process created (a resumed training run) with its writer key, so that
        what this process cannot send is kept in the pending file and replays into that run."""
        if run_id and isinstance(key, str) and _KEY.fullmatch(key):
            self._keys[run_id] = key

    def log_metrics(self, run_id: str | None, rows: list[dict], step_key: str = "step") -> None:
        """Log rows ``{step_key: int, name: value, ...}`` in batches of <= 1000; NaN skipped."""
        if not self.enabled or run_id is None:
            return
        metrics = _rows_to_metrics(rows, step_key, _now_ms())
        if metrics:
            self._do("log_metrics", run_id, {"op": "metrics", "run_id": run_id, "metrics": metrics},
                     lambda: _send_metrics(self._get_client(), run_id, metrics))

    def log_params(self, run_id: str | None, params: dict) -> None:
        if not self.enabled or run_id is None or not params:
            return
        p = _str_params(params)
        self._do("log_params", run_id, {"op": "params", "run_id": run_id, "params": p},
                 lambda: _send_params(self._get_client(), run_id, p))

    def set_tags(self, run_id: str | None, tags: dict) -> None:
        if not self.enabled or run_id is None or not tags:
            return
        t = _str_tags(tags)
        self._do("set_tags", run_id, {"op": "tags", "run_id": run_id, "tags": t},
                 lambda: _send_tags(self._get_client(), run_id, t))

    def log_artifact(self, run_id: str | None, path: str | os.PathLike,
                     artifact_path: str | None = None) -> None:
        """Copy one file into the run's artifact store (a server's artifact root with a server)."""
        self._artifact(run_id, path, artifact_path, is_dir=False)

    def log_artifacts(self, run_id: str | None, dir: str | os.PathLike,
                      artifact_path: str | None = None) -> None:
        """Copy a directory's contents into the run's artifact store."""
        self._artifact(run_id, dir, artifact_path, is_dir=True)

    def _artifact(self, run_id, path, artifact_path, is_dir: bool) -> None:
        """Artifacts go to a store of their own (a server's artifact root, S3, ...): when that fails,
        one warning and the record is kept, but metrics and run states still go to the tracking store."""
        if not self.enabled or run_id is None:
            return
        p = str(Path(path).resolve())
        rec = {"op": "artifacts" if is_dir else "artifact", "run_id": run_id, "path": p,
               "artifact_path": artifact_path}

        def send() -> None:
            client = self._get_client()
            (client.log_artifacts if is_dir else client.log_artifact)(run_id, p, artifact_path)

        if self.artifacts_failed and not self.failed:
            self._keep(rec)
        elif self.failed or run_id.startswith(PENDING_PREFIX):
            self._do("log_artifact", run_id, rec, send)  # keeps the record
        else:
            try:
                with _quiet_retries():
                    send()
            except Exception as exc:
                self.artifacts_failed = True
                msg = " ".join(str(exc).split())
                self._warn(f"logging artifact {p} failed: {type(exc).__name__}: {msg[:500]}; artifacts "
                           f"are not sent for the rest of this process (metrics still are)", kind="artifact")
                self._keep(rec)

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        """Mark the run terminated: FINISHED, FAILED or KILLED."""
        if not self.enabled or run_id is None:
            return
        rec = {"op": "end_run", "run_id": run_id, "status": status, "end_time": _now_ms()}
        self._do("end_run", run_id, rec,
                 lambda: self._get_client().set_terminated(run_id, status, rec["end_time"]))

    def train_run(self, model_sha256: str | None) -> str | None:
        """The id of the training run that exported the model with this content hash (its tag), or None."""
        if not model_sha256 or any(c not in "0123456789abcdef" for c in model_sha256):
            return None
        found = self.find_runs(tags={"kind": "train", "model_sha256": model_sha256})
        return found[0] if found else None

    def find_runs(self, filter_string: str = "", parent_run_id: str | None = None, *,
                  tags: dict[str, str] | None = None) -> list[str]:
        """Ids of this experiment's runs whose tags equal ``tags`` (and ``filter_string``'s ``field = 'value'``
        clauses), e.g. ``find_runs(tags={"sample_key": key}, parent_run_id=pid)``; [] when disabled, failed
        or the experiment does not exist yet. The filter is built by :func:`eq_filter`: a value with a quote
        or a space raises ValueError before MLflow is asked."""
        if not self.enabled or self.failed or (parent_run_id or "").startswith(PENDING_PREFIX):
            return []
        pairs = filter_pairs(filter_string) + [(f"tags.{k}", v) for k, v in (tags or {}).items()]
        filt = eq_filter(pairs + ([("tags.mlflow.parentRunId", parent_run_id)] if parent_run_id else []))

        def search() -> list[str]:
            client = self._get_client()
            eid = self._exp_id or _experiment_id(client, self.uri, self.experiment, create=False)
            return [] if eid is None else _search_all(client, [eid], filt)

        return [r.info.run_id for r in self._do("find_runs", None, None, search) or []]


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# --------------------------------------------------------------------------- replay

MAX_PENDING_BYTES = 256 << 20  # what import-pending reads of a file: size, lines, and one line
MAX_PENDING_LINES = 1_000_000
MAX_PENDING_LINE = 16 << 20
# import-pending copies artifacts only from these folders of the project root (.dvc/cache: DVC's symlinked outputs)
ARTIFACT_FOLDERS = ("models", "samples", "reports", "featurizer", ".dvc/cache")


class PendingError(ValueError):
    """A pending file that import-pending refuses: one line naming the file, the line, what it holds and
    what is allowed; raised before anything is written."""


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


class TrackingError(RuntimeError):
    """An MLflow error from :func:`import_pending` or :func:`comparison_table`, its message redacted."""


def _redacted(fn: Callable) -> Callable:
    """Errors of ``fn(..., uri=...)`` come out as TrackingError with secrets redacted (the original
    exception, which may quote the URI, is not chained)."""
    import functools
    import inspect

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PendingError:
            raise  # names the file and line, quotes no URI
        except Exception as exc:
            uri = sig.bind_partial(*args, **kwargs).arguments.get("uri") or default_tracking_uri()
            raise TrackingError(redact(f"{type(exc).__name__}: {exc}", uri)) from None
    return wrapper


_NAME = re.compile(r"[A-Za-z0-9_\-. /]{1,250}")  # MLflow's metric, param and tag names
_ARTIFACT_DIR = re.compile(r"[A-Za-z0-9_.-]{1,100}(/[A-Za-z0-9_.-]{1,100}){0,8}")
_STATUSES = ("FINISHED", "FAILED", "KILLED")
_KEY = re.compile(r"[0-9a-f]{32}")


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


# --------------------------------------------------------------------------- comparison table

@_redacted
def experiments(uri: str | None = None) -> dict[str, str]:
    """{name: id} of the store's experiments, each given the :data:`EXPERIMENT_TAGS` it lacks; {} for a
    SQLite file that does not exist (none is created)."""
    uri = uri or default_tracking_uri()
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        return {}
    client = _open_client(uri)
    found = list(client.search_experiments(max_results=1000))
    for exp in found:
        _tag_experiment(client, exp)
    return {e.name: e.experiment_id for e in found}


def _empty_table():
    import pandas as pd
    dtypes = {"start_time": "datetime64[ns, UTC]", "eta": "float64",
              **{c: "Int64" for c in _INT_COLUMNS}, **{c: "float64" for c in _METRIC_COLUMNS}}
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "object")) for c in TABLE_COLUMNS})


@_redacted
def comparison_table(experiment: str | None = None, filter_string: str = "",
                     uri: str | None = None):
    """One row per ``sample`` run (schedule x sampler x steps x run), sorted by FID.

    Columns (:data:`TABLE_COLUMNS`): schedule, seed, sampler, eta, steps, spacing, fid, fid_lo,
    fid_hi (the 95% interval), kid, kid_std, fid_floor, n_samples, timesteps, features, then
    experiment, dvc_exp_name, git_commit, start_time, run_id, parent_run_id; a value the run did
    not log is empty. ``experiment`` None: all experiments.
    ``filter_string``: an MLflow filter ANDed with ``tags.kind = 'sample'``, e.g.
    ``"params.schedule = 'cosine'"``. A param missing on a sample run is taken from its parent
    (train) run. An empty or missing store gives an empty DataFrame with these columns."""
    import pandas as pd
    uri = uri or default_tracking_uri()
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        return _empty_table()  # don't create a database just to read it
    client = _open_client(uri)
    if experiment is not None:
        exps = [e for e in [client.get_experiment_by_name(experiment)] if e is not None]
    else:
        exps = list(client.search_experiments(max_results=1000))
    if not exps:
        return _empty_table()
    names = {e.experiment_id: e.name for e in exps}
    filt = " and ".join(f for f in ("tags.kind = 'sample'", filter_string.strip()) if f)
    runs = _search_all(client, list(names), filt)
    parents: dict[str, dict] = {}

    def parent_params(pid: str | None) -> dict:
        if pid and pid not in parents:
            try:
                parents[pid] = client.get_run(pid).data.params
            except Exception:
                parents[pid] = {}
        return parents.get(pid, {}) if pid else {}

    rows = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        pid = tags.get("mlflow.parentRunId")
        row = {"experiment": names.get(run.info.experiment_id), "run_id": run.info.run_id,
               "parent_run_id": pid, "dvc_exp_name": tags.get("dvc_exp_name"),
               "git_commit": tags.get("git_commit"), "start_time": run.info.start_time}
        for col in _PARAM_COLUMNS:
            row[col] = params[col] if col in params else parent_params(pid).get(col)
        row.update({m: run.data.metrics.get(m) for m in _METRIC_COLUMNS})
        rows.append(row)
    if not rows:
        return _empty_table()
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    df["start_time"] = pd.to_datetime(df["start_time"], unit="ms", utc=True)
    for col in ("eta", *_METRIC_COLUMNS):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in _INT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    return df.sort_values(["fid", "run_id"], na_position="last", kind="stable").reset_index(drop=True)


SEED_GROUP = ["schedule", "sampler", "eta", "steps", "spacing", "n_samples", "features"]


def seed_summary(df):
    """One row per configuration of :func:`comparison_table`'s rows (``SEED_GROUP``) over its
    training seeds: ``n_seeds``, ``fid_mean``, ``fid_sd`` (sample sd; empty for one seed), ``kid_mean``,
    ``kid_sd``, sorted by ``fid_mean``. With one seed per configuration, differences between rows
    have not been tested against training noise."""
    keys = [c for c in SEED_GROUP if c in df.columns]
    g = df.groupby(keys, dropna=False, sort=False)
    out = g.agg(n_seeds=("seed", "nunique"), fid_mean=("fid", "mean"), fid_sd=("fid", "std"),
                kid_mean=("kid", "mean"), kid_sd=("kid", "std")).reset_index()
    out["n_seeds"] = out["n_seeds"].where(out["n_seeds"] > 0, g.size().to_numpy()).astype("Int64")
    return out.sort_values(["fid_mean", *keys], na_position="last", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- questions, compare

COMPARISONS_ARTIFACT = "comparisons/comparisons.csv"


def log_comparisons(tracker: "Tracker", run_id: str | None, path: str | os.PathLike) -> None:
    """Attach a comparisons table (reports/comparisons.csv, ddpm.compare.COLUMNS) to ``run_id`` as the CSV
    artifact :data:`COMPARISONS_ARTIFACT` (the UI shows it as a table), and log ``questions`` and
    ``questions_resolved`` (main effects of the design, family-wise) as metrics."""
    import pandas as pd

    df = pd.read_csv(path)
    main = df[(df["family"] == "questions") & (df["kind"] != "interaction")]
    tracker.log_artifact(run_id, path, "comparisons")
    tracker.log_metrics(run_id, [{"step": 0, "questions": len(main),
                                  "questions_resolved": int((main["verdict"] != "tie").sum())}])


def read_rev_file(rev: str, path: str, repo: str | os.PathLike = ".") -> bytes:
    """``path`` as of ``rev`` (a commit, branch, tag or DVC experiment name; ``workspace``: the working
    tree): from git when git tracks it there, else from DVC's cache (``dvc.api.read``)."""
    if rev == "workspace":
        return (Path(repo) / path).read_bytes()
    git = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True, timeout=60)
    if git.returncode == 0:
        return git.stdout
    import dvc.api

    try:
        return dvc.api.read(path, repo=str(repo), rev=rev, mode="rb")
    except Exception as exc:
        raise FileNotFoundError(f"{path} at {rev!r}: not in git ({git.stderr.decode().strip()[:200]}) nor in "
                                f"DVC ({type(exc).__name__}: {exc}); run the fid stage there first") from exc


def compare_revs(rev_a: str, rev_b: str, repo: str | os.PathLike = ".", *, n_boot: int = 1000, seed: int = 0,
                 path: str = "reports/features.npz"):
    """B - A per configuration and pooled (ddpm.compare.cross_table) from each side's features file."""
    from ddpm import compare

    (ca, ra, sa), (cb, rb, sb) = (compare.load_features(read_rev_file(r, path, repo)) for r in (rev_a, rev_b))
    if sa != sb:
        raise ValueError(f"{path}: feature spaces differ ({rev_a}: {sa!r}, {rev_b}: {sb!r}); FIDs are comparable "
                         "only in one feature space")
    return compare.cross_table(ca, ra, cb, rb, n_boot=n_boot, seed=seed)


def _print_comparisons(df, columns: list[str]) -> None:
    import pandas as pd

    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 90,
                           "display.float_format", "{:.4g}".format):
        print(df[columns].to_string(index=False))


# --------------------------------------------------------------------------- CLI

def parser(prog: str = "python -m ddpm.tracking") -> argparse.ArgumentParser:
    """The CLI's parser; ``ddpm`` (ddpm/cli.py) offers each of its subcommands under its own name."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="compare sampling runs (sorted by FID)")
    t.add_argument("--experiment", default=None, help="experiment name (default: all)")
    t.add_argument("--filter", default="", help="MLflow filter, e.g. \"params.schedule = 'cosine'\"")
    t.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db at "
                   "$DVC_ROOT or the current directory)")
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
    p = sub.add_parser("import-pending", help="replay a Tracker's pending JSONL file")
    p.add_argument("file")
    p.add_argument("--uri", default=None)
    p.add_argument("--root", default=None, help="project root whose output folders artifacts may come from "
                   "(default: $DVC_ROOT or the current directory)")
    return ap


def main(argv: list[str] | None = None, prog: str = "python -m ddpm.tracking") -> int:
    args = parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    uri = getattr(args, "uri", None) or default_tracking_uri()
    try:
        return {"table": _table, "compare": _compare, "import-pending": _import}[args.cmd](args, uri)
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
    df = compare_revs(args.a, args.b, args.repo, n_boot=args.n_boot)
    if args.csv:
        sys.stdout.write(df.to_csv(index=False))
        return 0
    _print_comparisons(df, ["question", "effect", "lo", "hi", "p", "p_holm", "verdict"])
    pooled = df[df["kind"] == "pooled"].iloc[0]
    print(f"B = {args.b}, A = {args.a}: FID(B) - FID(A) pooled over {len(df) - 1} configurations = "
          f"{pooled['effect']:.4g} [{pooled['lo']:.4g}, {pooled['hi']:.4g}], {pooled['verdict']} (Holm over "
          f"{len(df)} comparisons; {pooled['method']})")
    return 0


def _import(args: argparse.Namespace, uri: str) -> int:
    mapping = import_pending(args.file, uri=uri, root=args.root)
    print(f"imported {len(mapping)} run(s) from {args.file} into {redact_uri(uri)}")
    for old, new in mapping.items():
        print(f"  {old} -> {new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
