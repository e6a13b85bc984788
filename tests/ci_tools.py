"""The programs the tests drive (dvc, chromium, g++, a C compiler, ip), found the same way by the tests and by `.ci/run`.

`need(tool)` returns the program's path; when it is missing the test is skipped on a developer's
machine, but fails under `CI=true`, so a CI image without chromium cannot pass by skipping the
browser tests. `python3 tests/ci_tools.py` prints the apt packages of the missing tools (`.ci/run`
installs them).
"""
from __future__ import annotations

import os
import shutil
import sys
import urllib.request

TOOLS = {"dvc": ("dvc",), "chromium": ("chromium", "chromium-browser"), "g++": ("g++",),
         "cc": ("cc", "gcc", "clang"),  # cc: ddpm/nn/kernels.c (the names ddpm.nn.kernels looks for, after $CC)
         "ip": ("ip",)}  # ip netns: tests/test_multinode.py's two nodes on their own network
APT = {"chromium": "chromium", "g++": "g++", "cc": "gcc", "ip": "iproute2"}  # dvc comes with requirements.txt


def find(tool: str) -> str | None:
    """The first of the tool's names on PATH (shutil.which, as `command -v`), or None."""
    return next((p for p in map(shutil.which, TOOLS[tool]) if p), None)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def need(tool: str) -> str:
    """The tool's path; skip the test without it, or fail it under CI=true."""
    import pytest

    path = find(tool)
    if path:
        return path
    msg = f"{tool} not found on PATH (looked for {', '.join(TOOLS[tool])})"
    if in_ci():
        pytest.fail(f"{msg}; CI=true, so a missing tool is a failure, not a skip")
    pytest.skip(f"{msg}; install it ({'pip install -r requirements.txt' if tool == 'dvc' else 'apt-get install -y ' + APT[tool]})")


if __name__ == "__main__":
    print(" ".join(APT[t] for t in APT if find(t) is None))
    sys.exit(0)


def server_healthy(url: str) -> bool:
    """True when an MLflow server (``mlflow server`` or ``mlflow ui``) at ``url`` answers its /health page."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
