"""DVC outputs are pure functions of their inputs: `dvc repro --force` twice leaves dvc.lock unchanged.

Runs the stages up to the featurizer (prepare, then the shipped ruler or a trained featurizer with its
seed-stability retrain) on the tiny config of test_pipeline.py; the whole pipeline, train, sample, fid
and report included, is checked by test_pipeline.py::test_force_repro_is_reproducible.
"""
from __future__ import annotations

import json

import pytest

from ddpm.metrics.features import SHIPPED_RULERS
from test_pipeline import TINY, make_repo, run

SHIPPED_RECIPE = {"kind": "classifier", "feature_dim": 32, "epochs": 15, "batch_size": 64, "lr": 0.01,
                  "inception_weights": None}


@pytest.mark.parametrize("ruler", ["trained", "shipped"])
def test_repro_force_twice_keeps_dvc_lock(tmp_path, ruler):
    params = TINY if ruler == "trained" else {**TINY, "featurizer": SHIPPED_RECIPE}
    path, env = make_repo(tmp_path, params)
    run(["dvc", "repro", "--force", "featurizer"], path, env)
    first = (path / "dvc.lock").read_text()
    run(["dvc", "repro", "--force", "featurizer"], path, env)
    assert (path / "dvc.lock").read_text() == first
    assert "seconds" not in (path / "data" / "prepared" / "meta.json").read_text()
    metrics = json.loads((path / "featurizer" / "metrics.json").read_text())
    assert metrics["ruler"] == ruler and "seconds" not in metrics
    if ruler == "trained":
        assert metrics["features"].startswith("classifier-8d-")
        assert set(metrics["seed_stability"]) == {"seeds", "floors", "floor_rel_diff"}
    else:
        assert metrics["sha256"] == SHIPPED_RULERS["digits"]["sha256"]
        assert metrics["features"] == f"classifier-32d-{metrics['sha256'][:8]}"
