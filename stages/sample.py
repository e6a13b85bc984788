"""sample: one fixed-size sample set from a schedule's EMA model with one sampler and step count.

`python -m stages.sample <schedule> <seed> <sample set>` (one DVC matrix item, run through `stages.item`; the
set as params.yaml spells it, e.g. `dpmpp_2m-eta0.0-10`) reads the exported model
models/<schedule>/seed<seed>/model.pt and writes samples/<schedule>/seed<seed>/<sample set>.npz (uint8 images)
and a .json beside it. The sampler noise comes from the top-level `seed`, not the training seed: every
training seed's model is sampled with the same noise (common random numbers).

With `sample.nproc_per_node: N` (> 1) it re-executes itself under
`python -m torch.distributed.run --standalone --nproc_per_node N -m stages.sample ...`: chunk k of
sample.batch_size images is drawn by rank k % N from its own (seed, k) generator and rank 0 merges the
chunks in order, so the file is the same as a one-process run's. Launched by torchrun already (several
GPUs or nodes), it runs as the rank it is given.
"""
from __future__ import annotations

import argparse
import sys

from ddpm.training import distributed as dist
from ddpm.nn import kernels
from ddpm.training.checkpoint import load_model
from ddpm.app.config import ConfigError, load_params, resolve_device
from ddpm.data.convert import model_to_uint8
from ddpm.io import remove_stale_temps
from ddpm.app.paths import model_dir, sample_path, save_arrays, setup_logging, timed, write_json
from ddpm.io import file_sha256
from ddpm.diffusion.samplers import StepRule
from ddpm.nn.speed import Speed, sampling_model, set_up_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("schedule")
    parser.add_argument("seed", type=int)
    parser.add_argument("set")
    args = parser.parse_args()
    log = setup_logging()
    p = load_params()
    sets = {s.key: s for s in p.sample.samplers}
    if args.set not in sets or args.schedule not in p.diffusion.schedules or args.seed not in p.seeds:
        raise ConfigError([f"sample item {args.schedule} {args.seed} {args.set} is not in "
                           "diffusion.schedules x seeds x sample.samplers"])
    args.sampler, args.eta, args.steps = sets[args.set].name, sets[args.set].eta, sets[args.set].steps
    if p.sample.nproc_per_node > 1 and not dist.launched_by_torchrun():
        raise SystemExit(dist.relaunch("stages.sample", sys.argv[1:], p.sample.nproc_per_node))
    device = dist.init(resolve_device(p.device))
    try:
        run(args, p, device, log)
    finally:
        dist.destroy()


def run(args: argparse.Namespace, p, device, log) -> None:
    """This rank's chunks of the sample set; rank 0 gathers them and writes the files."""
    out = sample_path(args.schedule, args.seed, args.sampler, args.eta, args.steps)
    if dist.is_main():
        remove_stale_temps(out, out.with_suffix(".json"))  # left by a killed earlier run of this stage
    rule = StepRule(args.sampler, args.eta, p.sample.spacing)
    model, process, ckpt = load_model(model_dir(args.schedule, args.seed) / "model.pt", device=device)
    shape = tuple(ckpt["image_shape"])
    s = p.sample
    speed = Speed.resolve(p.fast, device)
    set_up_process(p.fast)  # the allocator and subnormals with fast: true, else PyTorch's ops (ddpm.nn.speed)
    net = sampling_model(model, speed)
    log.info("sample %s: %d images, %s, %d steps, on %s x %d processes", args.schedule, s.n_samples, rule.label,
             args.steps, device, dist.world_size())
    with timed() as t:
        images = dist.sample_images_sharded(net, process, s.n_samples, shape, args.steps, rule, seed=p.seed,
                                            batch_size=s.batch_size, post=model_to_uint8, device=device,
                                            clip_denoised=ckpt["diffusion"]["clip_denoised"],
                                            autocast_dtype=speed.autocast_dtype, progress=dist.is_main())
    if not dist.is_main():
        return
    save_arrays(out, images=images.numpy())
    write_json(out.with_suffix(".json"), {
        "schedule": args.schedule, "seed": args.seed, "sampler": args.sampler, "eta": args.eta, "steps": args.steps,
        "spacing": p.sample.spacing, "n_samples": s.n_samples, "world_size": dist.world_size(),
        "model_sha256": file_sha256(model_dir(args.schedule, args.seed) / "model.pt"),  # finds the training run
        "kernels": kernels.kernel_record(device),  # whether the fused CPU kernels drew these bits (ddpm.nn.kernels)
    })
    log.info("sample %s: %s x%d done in %.1f s", args.schedule, rule.label, args.steps, t["seconds"])


if __name__ == "__main__":
    main()
