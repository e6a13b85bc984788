"""featurizer: the FID feature network and the reference statistics of real (train split) images."""
from __future__ import annotations

import torch

from ddpm.config import resolve_device, load_params
from ddpm.fid import InceptionFeaturizer, extract_features, feature_statistics, save_featurizer, train_classifier
from ddpm.pipeline import FEATURIZER, PREPARED, load_arrays, read_json, save_arrays, setup_logging, timed, write_json


def main() -> None:
    log = setup_logging()
    p = load_params()
    f = p.featurizer
    device = resolve_device(p.device)
    train, holdout = load_arrays(PREPARED / "train.npz"), load_arrays(PREPARED / "holdout.npz")
    metrics: dict = {"kind": f.kind}
    with timed() as t:
        if f.kind == "classifier":
            if "labels" not in train:
                raise SystemExit(
                    f"featurizer.kind: got 'classifier' but data.name={read_json(PREPARED / 'meta.json')['dataset']!r} "
                    "has no labels (a folder without class subfolders); allowed here: inception"
                )
            log.info("featurizer: training the in-domain classifier (%d epochs)", f.epochs)
            net, m = train_classifier(train["images"], train["labels"], holdout["images"], holdout["labels"],
                                      feature_dim=f.feature_dim, epochs=f.epochs, batch_size=f.batch_size, lr=f.lr,
                                      seed=p.seed, device=str(device))
            metrics.update(val_accuracy=m["val_accuracy"], train_accuracy=m["train_accuracy"],
                           feature_dim=f.feature_dim, epochs=f.epochs)
            log.info("featurizer: held-out accuracy %.4f", m["val_accuracy"])
        else:
            log.info("featurizer: pytorch-fid InceptionV3 (pool3, 2048-d)")
            net = InceptionFeaturizer(f.inception_weights)
            metrics.update(feature_dim=2048)
        save_featurizer(FEATURIZER / "featurizer.pt", net)
        log.info("featurizer: reference statistics of %d real images", len(train["images"]))
        with torch.inference_mode():
            feats = extract_features(net, train["images"], device=device, progress=True)
            held = extract_features(net, holdout["images"], device=device)
        mu, sigma = feature_statistics(feats)
        save_arrays(FEATURIZER / "reference.npz", mu=mu, sigma=sigma, holdout_features=held)
    metrics["seconds"] = t["seconds"]
    write_json(FEATURIZER / "metrics.json", metrics)


if __name__ == "__main__":
    main()
