"""Tracking URIs: where the store is (:func:`default_tracking_uri`, :func:`sqlite_path`), and their secrets never
printed: URIs and messages with their credentials redacted, and a log filter that redacts every record.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- secrets

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
