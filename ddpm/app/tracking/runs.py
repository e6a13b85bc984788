"""MLflow runs for the pipeline: the Tracker, its store (URIs, SQLite, locks) and filters.

ddpm.app.tracking is the only package of the project that imports mlflow.

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
sorted by FID; ``ddpm table`` prints it; ``table --questions`` prints the question table
of ``reports/comparisons.csv`` (or of a run's artifact, logged by :func:`log_comparisons`), and
``ddpm compare A B`` pairs two experiments or commits (:func:`compare_revs`).

Where the data goes (:func:`default_tracking_uri`): ``$MLFLOW_TRACKING_URI`` if set (e.g. an
``mlflow server``), else ``sqlite:///<root>/mlflow.db`` with ``root = $DVC_ROOT`` (the real repo,
also when ``dvc exp run`` works in a temporary copy) or the current directory. SQLite databases are
put in WAL mode (and MLflow sets a 20 s busy timeout per session), so several processes can log at
once; local artifacts go to ``<root>/mlruns/<experiment>`` next to the database.

Failures never reach the caller: on the first MLflow error a :class:`Tracker` logs one warning,
stops talking to MLflow for the rest of the process, and appends everything it could not send to a
JSONL file (``pending_path``); a failed artifact upload only stops further uploads (the artifact
store is often separate, e.g. S3 behind a server). Replay it later, into the same or another store, with::

    ddpm import-pending PENDING.jsonl [--uri URI]

or ``import_pending(path, uri)``. Replaying is idempotent (imported runs carry a ``pending_id``
tag, metrics already there are not duplicated by the SQL store). A pending file is data: it is checked
whole before anything is written, creates only the runs it describes, touches an existing run only with
that run's writer key (:data:`WRITER_TAG`), and copies artifacts only from the project's output folders.
Filters are built only from checked values (:func:`eq_filter`).
"""
from __future__ import annotations

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
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
from ddpm.app.tracking.uris import default_tracking_uri, install_log_redaction, redact, redact_uri, sqlite_path


MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch call
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
PENDING_PREFIX = "pending-"  # run ids handed out while the store is unreachable
RUN_ID = re.compile(r"(pending-)?[0-9a-f]{32}")  # MLflow's run ids (uuid4 hex) and our placeholders
# Each run a Tracker creates is tagged with the sha256 of a random key that only its pending records carry:
# a replayed file may touch an existing run only when it holds that run's key (see import_pending).
WRITER_TAG = "ddpm.writer_sha256"
_KEY = re.compile(r"[0-9a-f]{32}")  # a writer key (uuid4 hex)


# The experiment type MLflow's UI offers for classic training runs (its "experiment kind" selector
# writes this tag). MLflow 3.17's UI opens pages by its sidebar switch instead (checked in headless
# Chromium): `#/experiments/<id>/runs?workflowType=machine_learning` opens the runs table.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


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
    """A kernel record (:func:`ddpm.nn.kernels.kernel_record`, kept in model files, train.json and sample .json files)
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
    methods accept. Replay the file later with ``ddpm import-pending FILE
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
            where = (f"unsent data goes to {self.pending_path} (replay: ddpm "
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
        except Exception as exc:
            if getattr(exc, "quotes_no_uri", False):  # e.g. PendingError: names the file and line only
                raise
            uri = sig.bind_partial(*args, **kwargs).arguments.get("uri") or default_tracking_uri()
            raise TrackingError(redact(f"{type(exc).__name__}: {exc}", uri)) from None
    return wrapper
