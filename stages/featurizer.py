"""featurizer: the FID ruler (feature network) and the reference statistics of real (train split) images.

The default digits use the ruler shipped in ddpm/metrics/rulers/ (sha256-checked; see benchmarks/ruler.py for
why). Other datasets or recipes train a classifier with `seed` and once more with `seed + 1`, and
record how far the FID floor moves between the two (`seed_stability` in featurizer/metrics.json).
"""
from __future__ import annotations

import shutil

import numpy as np
import torch

from ddpm.app.config import load_params, resolve_device
from ddpm.metrics.features import (InceptionFeaturizer, extract_features, feature_space_id, load_ruler,
                                   resolve_inception_weights, save_featurizer, shipped_ruler, train_classifier)
from ddpm.io import file_sha256
from ddpm.metrics.fid import feature_statistics, fid_from_images
from ddpm.io import atomic_path
from ddpm.app.paths import FEATURIZER, FEATURIZER_METRICS, HOLDOUT, PREPARED, load_arrays, read_json, save_arrays, setup_logging, write_json


def _train(p, train, holdout, seed, device):
    f = p.featurizer
    return train_classifier(train["images"], train["labels"], holdout["images"], holdout["labels"],
                            feature_dim=f.feature_dim, epochs=f.epochs, batch_size=f.batch_size, lr=f.lr, seed=seed,
                            device=str(device), progress=False)


def _floor(net, train, holdout, device) -> float:
    ref = feature_statistics(extract_features(net, train["images"], device=device))
    return fid_from_images(net, holdout["images"], *ref, device=str(device))


def _trained_classifier(p, train, holdout, device, log):
    if "labels" not in train:
        raise SystemExit(f"featurizer.kind: got 'classifier' but data.name={read_json(PREPARED / 'meta.json')['dataset']!r} "
                         "has no labels (a folder without class subfolders); allowed here: inception")
    log.info("featurizer: training the classifier with seeds %d and %d (stability check)", p.seed, p.seed + 1)
    net, m = _train(p, train, holdout, p.seed, device)
    other, _ = _train(p, train, holdout, p.seed + 1, device)
    floors = [_floor(net, train, holdout, device), _floor(other, train, holdout, device)]
    save_featurizer(FEATURIZER / "featurizer.pt", net)
    stability = {"seeds": [p.seed, p.seed + 1], "floors": floors,
                 "floor_rel_diff": abs(floors[0] - floors[1]) / max(floors[0], 1e-12)}
    return net, {"ruler": "trained", "val_accuracy": m["val_accuracy"], "train_accuracy": m["train_accuracy"],
                 "seed_stability": stability}


def main() -> None:
    log = setup_logging()
    p = load_params()
    f, d = p.featurizer, p.data
    device = resolve_device(p.device)
    train, holdout = load_arrays(PREPARED / "train.npz"), load_arrays(HOLDOUT)
    recipe = {"kind": f.kind, "feature_dim": f.feature_dim, "epochs": f.epochs, "batch_size": f.batch_size,
              "lr": f.lr, "image_size": d.image_size, "channels": d.channels}
    shipped = shipped_ruler(d.name, recipe)
    if shipped is not None:
        path, sha = shipped
        log.info("featurizer: the shipped ruler %s (sha256 %s...)", path.name, sha[:8])
        net = load_ruler(path, sha, device=str(device))
        with atomic_path(FEATURIZER / "featurizer.pt") as tmp:
            shutil.copyfile(path, tmp)
        metrics = {"ruler": "shipped", "sha256": sha}
    elif f.kind == "classifier":
        net, metrics = _trained_classifier(p, train, holdout, device, log)
        metrics["sha256"] = file_sha256(FEATURIZER / "featurizer.pt")
    else:
        log.info("featurizer: pytorch-fid InceptionV3 (pool3, 2048-d)")
        net = InceptionFeaturizer(f.inception_weights)
        save_featurizer(FEATURIZER / "featurizer.pt", net)
        metrics = {"ruler": "shipped", "sha256": file_sha256(resolve_inception_weights(f.inception_weights))}
    features = feature_space_id(f.kind, net.feature_dim, metrics["sha256"])
    with torch.inference_mode():
        feats = extract_features(net, train["images"], device=device)
        held = extract_features(net, holdout["images"], device=device)
    mu, sigma = feature_statistics(feats)
    save_arrays(FEATURIZER / "reference.npz", mu=mu, sigma=sigma, train_features=feats, holdout_features=held,
                features=np.array(features))
    write_json(FEATURIZER_METRICS, {"kind": f.kind, "features": features, "feature_dim": net.feature_dim,
                                             **metrics})
    log.info("featurizer: %s, reference statistics of %d real images", features, len(feats))


if __name__ == "__main__":
    main()
