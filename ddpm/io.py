"""Atomic file writes: a reader never sees a half-written checkpoint, array or report.

Every writer goes through a temporary file in the target's folder, ``fsync`` and ``os.replace``
(atomic on POSIX), so a crash leaves either the old file or the new one, never a truncated mix.
A kill -9 can leave the temporary file, ``.<name>.<random>.ddpm-tmp``: DVC never records it (the
repository's ``.dvcignore`` lists ``*.ddpm-tmp``, which DVC honours when it hashes a folder), and
:func:`remove_stale_temps` deletes it when the stage that writes ``<name>`` starts again.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


TMP_SUFFIX = ".ddpm-tmp"  # in .dvcignore and .gitignore: a temp file is never part of an output


def remove_stale_temps(*paths: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted writer of each ``path`` left beside it; returns them.
    Call it where nothing else writes ``path`` (at the start of the stage that owns it)."""
    gone = []
    for path in map(Path, paths):
        pattern = str(path.parent / f".{glob.escape(path.name)}.*{TMP_SUFFIX}")
        for tmp in map(Path, glob.glob(pattern)):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink()
                gone.append(tmp)
    return gone


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # persist the rename itself
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """Like ``np.savez``, but byte-reproducible: zip entries get a fixed date (np.savez stamps the
    current time, which would change DVC's hash of an unchanged output and rerun everything below it)."""
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks: names a ruler, and links an exported model to
    its MLflow training run without putting run ids into DVC outputs (the run is tagged with it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
