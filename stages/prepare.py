"""prepare: the dataset -> uint8 arrays with a train / held-out split (data/prepared/)."""
from __future__ import annotations

from ddpm.app.config import load_params
from ddpm.data.datasets import load_dataset, split_holdout
from ddpm.app.paths import PREPARED, save_arrays, setup_logging, write_json


def main() -> None:
    log = setup_logging()
    p = load_params()
    d = p.data
    log.info("prepare: loading %s", d.name)
    data = load_dataset(d.name, root=d.root, image_size=d.image_size, channels=d.channels)
    train_idx, holdout_idx = split_holdout(data.labels if data.labels is not None else len(data),
                                           d.holdout_fraction, p.seed)
    for name, idx in (("train", train_idx), ("holdout", holdout_idx)):
        labels = data.labels[idx] if data.labels is not None else None
        save_arrays(PREPARED / f"{name}.npz", images=data.images[idx],
                    **({"labels": labels} if labels is not None else {}))
    meta = {"dataset": d.name, "n_train": int(len(train_idx)), "n_holdout": int(len(holdout_idx)),
            "image_shape": list(data.images.shape[1:]), "labelled": data.labels is not None,
            }  # no timings: data/prepared is a DVC output, a pure function of params and code
    write_json(PREPARED / "meta.json", meta)
    log.info("prepare: %s, %d train / %d held-out images of shape %s", d.name, meta["n_train"], meta["n_holdout"],
             meta["image_shape"])


if __name__ == "__main__":
    main()
