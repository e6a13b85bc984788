"""nll: bits/dim of one trained model on the held-out images (the variational bound, Ho et al. 2020 eq. 5).

`python -m stages.nll <schedule> <seed>` (one DVC matrix item, run through `stages.item`) reads
models/<schedule>/seed<seed>/model.pt and the first `nll.images` held-out images, and writes
nll/<schedule>/seed<seed>/nll.npz: per image `bpd`, `prior`, `decoder`, `diffusion` (bits/dim), the drawn `t`
and their `terms`, the stratum sizes `weights`; and `levels`, `bin_width`, `estimator`, `n_t` and
`holdout_sha256` (the scored images, so that `ddpm compare A B --nll` pairs only the same images). A pure function
of its inputs (no timings): the draws come from the top-level `seed`, the same for every model, so models compare
by paired per-image differences (stages/nll_table.py). The decoder's bins are the data's: `levels` is read from
data/prepared (meta.json's `levels`, else the train arrays' values), never assumed.
"""
from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import torch

from ddpm.app.config import ConfigError, load_params, resolve_device
from ddpm.app.paths import HOLDOUT, PREPARED, load_arrays, model_dir, nll_path, read_json, save_arrays, setup_logging
from ddpm.diffusion.likelihood import bin_width
from ddpm.metrics.nll import data_levels, exact_bound, stratified_bound, summarize, to_grid
from ddpm.nn.speed import Speed, sampling_model, set_up_process
from ddpm.training.checkpoint import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("schedule")
    parser.add_argument("seed", type=int)
    args = parser.parse_args()
    log = setup_logging()
    p = load_params()
    if args.schedule not in p.diffusion.schedules or args.seed not in p.seeds:
        raise ConfigError([f"nll item {args.schedule} {args.seed} is not in diffusion.schedules x seeds"])
    device = resolve_device(p.device)
    levels = data_levels(load_arrays(PREPARED / "train.npz", ("images",))["images"], read_json(PREPARED / "meta.json"))
    held = load_arrays(HOLDOUT, ("images",))["images"]
    if len(held) < p.nll.images:
        raise ConfigError([f"nll.images: got {p.nll.images}; allowed: at most {len(held)} (the held-out images)"])
    model, process, _ = load_model(model_dir(args.schedule, args.seed) / "model.pt", device=device)
    set_up_process(p.fast)  # the allocator and subnormals with fast: true, else PyTorch's ops (ddpm.nn.speed)
    net = sampling_model(model, Speed.resolve(p.fast, device))
    scored = np.ascontiguousarray(held[:p.nll.images])
    images_sha256 = hashlib.sha256(scored.tobytes()).hexdigest()
    x0 = to_grid(scored, levels).to(device=device, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(p.seed)
    start = time.perf_counter()
    if p.nll.estimator == "exact":
        out = exact_bound(net, process, x0, bin_width=bin_width(levels), generator=gen)
    else:
        out = stratified_bound(net, process, x0, bin_width=bin_width(levels), n_t=p.nll.n_t, generator=gen)
    s = summarize(out)
    log.info("nll %s seed %d: %.4f bits/dim [%.4f, %.4f] (%s, n_t %d, %d images, %d levels) in %.1f s", args.schedule,
             args.seed, s["bpd"], s["bpd_lo"], s["bpd_hi"], p.nll.estimator, p.nll.n_t, s["images"], levels,
             time.perf_counter() - start)  # the time goes to the log only, never into the output
    save_arrays(nll_path(args.schedule, args.seed), **out, levels=np.int64(levels),
                bin_width=np.float64(bin_width(levels)), estimator=np.str_(p.nll.estimator),
                n_t=np.int64(p.nll.n_t if p.nll.estimator == "stratified" else process.num_timesteps - 1),
                holdout_sha256=np.str_(images_sha256))  # the scored images: per-image pairing across experiments


if __name__ == "__main__":
    main()
