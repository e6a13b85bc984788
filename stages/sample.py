"""sample: one fixed-size sample set from a schedule's EMA model with one sampler and step count.

`python -m stages.sample <schedule> <sampler> <eta> <steps>` (one DVC matrix item) writes
samples/<schedule>/<sampler label>-<steps>.npz (uint8 images) and a .json beside it.
"""
from __future__ import annotations

import argparse

from ddpm.config import ConfigError, load_params, resolve_device
from ddpm.data import model_to_uint8
from ddpm.pipeline import model_dir, sample_path, save_arrays, setup_logging, timed, write_json
from ddpm.samplers import StepRule, sample_images
from ddpm.speed import Speed, sampling_model
from ddpm.train import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("schedule")
    parser.add_argument("sampler")
    parser.add_argument("eta", type=float)
    parser.add_argument("steps", type=int)
    args = parser.parse_args()
    log = setup_logging()
    p = load_params()
    if (args.sampler, args.eta) not in [(s.name, s.eta) for s in p.sample.samplers] or \
            args.steps not in p.sample.steps or args.schedule not in p.diffusion.schedules:
        raise ConfigError([f"sample item {args.schedule}/{args.sampler}(eta={args.eta:g})/{args.steps} is not in "
                           "diffusion.schedules x sample.samplers x sample.steps"])
    device = resolve_device(p.device)
    rule = StepRule(args.sampler, args.eta)
    model, process, ckpt = load_model(model_dir(args.schedule) / "model.pt", device=device)
    shape = tuple(ckpt["image_shape"])
    s = p.sample
    speed = Speed.resolve(p.fast, device)
    net = sampling_model(model, speed, s.n_samples * args.steps, device)
    log.info("sample %s: %d images, %s, %d steps, on %s", args.schedule, s.n_samples, rule.label, args.steps, device)
    with timed() as t:
        x = sample_images(net, process, s.n_samples, shape, args.steps, rule, seed=p.seed, batch_size=s.batch_size,
                          clip_denoised=ckpt["diffusion"]["clip_denoised"], device=device,
                          autocast_dtype=speed.autocast_dtype, progress=True)
    out = sample_path(args.schedule, args.sampler, args.eta, args.steps)
    save_arrays(out, images=model_to_uint8(x).numpy())
    write_json(out.with_suffix(".json"), {
        "schedule": args.schedule, "sampler": args.sampler, "eta": args.eta, "steps": args.steps,
        "n_samples": s.n_samples, "seconds": t["seconds"], "image_steps_per_second":
        round(s.n_samples * args.steps / t["seconds"], 1) if t["seconds"] else None,
    })
    log.info("sample %s: %s x%d done in %.1f s", args.schedule, rule.label, args.steps, t["seconds"])


if __name__ == "__main__":
    main()
