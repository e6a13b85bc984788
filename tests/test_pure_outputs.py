"""DVC outputs are pure functions of their inputs: `dvc repro --force` twice leaves dvc.lock unchanged.

Runs the stages up to the featurizer (prepare, and a trained featurizer with its seed-stability retrain) on the
tiny config of test_pipeline.py; the train and sample stages are not covered here (their timings belong to
their owners' branches).
"""
from __future__ import annotations

import json

from test_pipeline import TINY, make_repo, run


def test_repro_force_twice_keeps_dvc_lock(tmp_path):
    path, env = make_repo(tmp_path, TINY)
    run(["dvc", "repro", "--force", "featurizer"], path, env)
    first = (path / "dvc.lock").read_text()
    run(["dvc", "repro", "--force", "featurizer"], path, env)
    assert (path / "dvc.lock").read_text() == first
    assert "seconds" not in (path / "data" / "prepared" / "meta.json").read_text()
    metrics = json.loads((path / "featurizer" / "metrics.json").read_text())
    assert metrics["ruler"] == "trained" and metrics["features"].startswith("classifier-8d-")
    assert set(metrics["seed_stability"]) == {"seeds", "floors", "floor_rel_diff"} and "seconds" not in metrics
