"""train: one model per beta schedule (`python -m stages.train <schedule>`), with its loss and FID curves.

Writes models/<schedule>/model.pt (a self-describing checkpoint), loss.csv, fid_curve.csv and
train.json; resumes from checkpoints/<schedule>/ after an interruption. That folder is not a DVC output
(DVC leaves undeclared files alone, so they survive a failed run) and is removed once training is done.

Data parallel: with `train.nproc_per_node: N` (> 1) the stage re-executes itself as
`python -m torch.distributed.run --standalone --nproc_per_node N -m stages.train <schedule>`
(DistributedDataParallel; gloo on the CPU, NCCL on CUDA with rank r on cuda:LOCAL_RANK; the global batch
stays train.batch_size). Launched by torchrun already, it runs as the rank it is given, e.g. on two
machines with 8 GPUs each (run on both, NODE_RANK 0 and 1, HOST = node 0's address):

    torchrun --nnodes 2 --node_rank NODE_RANK --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint HOST:29500 --rdzv_id ddpm-linear -m stages.train linear

Then the launch decides the world size (nnodes x nproc_per_node), not params.yaml. Only rank 0 logs to
MLflow and writes checkpoints and outputs, which must be on storage that every node sees for a resume.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import pandas as pd
import torch

from ddpm import distributed as dist
from ddpm.config import load_params, resolve_device
from ddpm.data import model_to_uint8
from ddpm.diffusion import GaussianProcess
from ddpm.fid import extract_features, feature_statistics, frechet_distance, load_featurizer
from ddpm.io import atomic_path
from ddpm.pipeline import CHECKPOINTS, FEATURIZER, PREPARED, load_arrays, model_dir, setup_logging, write_json
from ddpm.samplers import StepRule, sample_images
from ddpm.schedules import get_beta_schedule
from ddpm.speed import Speed
from ddpm.tracking import Tracker
from ddpm.train import TrainSettings, latest_valid_checkpoint, model_metadata, train
from ddpm.unet import Unet

# the params a trained model depends on (declared for this stage in dvc.yaml): a checkpoint made with
# other values of these is never resumed from
TRAIN_KEYS = ("seed", "timesteps", "fast", "model", "diffusion.objective", "diffusion.zero_terminal_snr",
              "diffusion.min_snr_gamma", "diffusion.clip_denoised", "train")
CODE = [Path("stages/train.py"), *Path("ddpm").glob("*.py")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("schedule")
    args = parser.parse_args()
    log = setup_logging()
    p = load_params()
    schedule = args.schedule
    if schedule not in p.diffusion.schedules:
        raise SystemExit(f"schedule {schedule!r} is not in diffusion.schedules={list(p.diffusion.schedules)}")
    if p.train.nproc_per_node > 1 and not dist.launched_by_torchrun():
        raise SystemExit(dist.relaunch("stages.train", [schedule], p.train.nproc_per_node))
    device = dist.init(resolve_device(p.device))
    try:
        run(schedule, p, device, log)
    finally:
        dist.destroy()


def run(schedule: str, p, device: torch.device, log) -> None:
    """One rank's share of training ``schedule``; rank 0 also tracks, evaluates and writes the outputs."""
    main, world = dist.is_main(), dist.world_size()
    speed = Speed.resolve(p.fast, device)
    if world != p.train.nproc_per_node and main:
        log.warning("train.nproc_per_node=%d but torchrun started %d processes: the launch decides",
                    p.train.nproc_per_node, world)
    images = torch.from_numpy(load_arrays(PREPARED / "train.npz")["images"])
    shape = tuple(images.shape[1:])
    m, d, t = p.model, p.diffusion, p.train
    with torch.random.fork_rng(devices=[]):  # initial weights from `seed`, the global RNG untouched
        torch.manual_seed(p.seed)
        model = Unet(dim=m.dim, dim_mults=tuple(m.dim_mults), channels=shape[0], dropout=m.dropout,
                     attn_heads=m.attn_heads, attn_dim_head=m.attn_dim_head)
    model.check_image_size(shape[1:])
    betas = get_beta_schedule(schedule, p.timesteps, d.zero_terminal_snr)
    process = GaussianProcess(betas, d.objective, d.min_snr_gamma)
    params = p.to_dict()
    meta = model_metadata(model, process, schedule, shape, d.clip_denoised, d.zero_terminal_snr, params)
    # resume only a run interrupted with the same params and the same code
    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(CODE))).hexdigest()[:16]
    run_key = f"{schedule}-{p.params_hash(TRAIN_KEYS)}-{code}"
    settings = TrainSettings(
        steps=t.steps, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
        grad_accum=t.grad_accum, max_grad_norm=t.max_grad_norm, ema_decay=t.ema_decay, ema_warmup=t.ema_warmup,
        ema_every=t.ema_every, amp=t.amp or speed.autocast_dtype is not None, horizontal_flip=t.horizontal_flip,
        log_every=t.log_every, checkpoint_every=t.checkpoint_every, keep_checkpoints=t.keep_checkpoints,
        eval_every=t.fid_every,
        channels_last=speed.train_channels_last,
        compile=speed.compile_training(device, t.steps * t.batch_size),
    )

    tracker = run_id = on_eval = None
    if main:  # the other ranks only train: no FID, no MLflow, no files
        # FID of the EMA model over training, in the featurizer's space, against the train-split statistics
        featurizer = load_featurizer(FEATURIZER / "featurizer.pt", device=str(device))
        ref = load_arrays(FEATURIZER / "reference.npz")
        fid_rule = StepRule("ddim", 0.0)

        def fid_eval(step: int, ema_model: torch.nn.Module) -> dict[str, float]:
            x = sample_images(ema_model, process, t.fid_samples, shape, t.fid_sampling_steps, fid_rule, seed=p.seed,
                              batch_size=t.fid_samples, clip_denoised=d.clip_denoised, device=device,
                              autocast_dtype=speed.autocast_dtype)
            feats = extract_features(featurizer, model_to_uint8(x), device=device)
            fid = frechet_distance(*feature_statistics(feats), ref["mu"], ref["sigma"])
            tracker.log_metrics(run_id, [{"step": step, "fid_train": fid}])
            log.info("train %s: step %d, FID %.3f (%d samples, DDIM %d steps)", schedule, step, fid,
                     t.fid_samples, t.fid_sampling_steps)
            return {"fid": fid}

        on_eval = fid_eval

        tracker = Tracker(enabled=p.tracking.enabled, experiment=p.tracking.experiment,
                          pending_path=model_dir(schedule) / "mlflow-pending.jsonl")
        # an interrupted run continues its MLflow run too, so its loss curve stays in one place
        previous = latest_valid_checkpoint(CHECKPOINTS / schedule, run_key)
        run_id = previous.get("mlflow_run_id") if previous else None
        if run_id is None or run_id.startswith("pending-"):
            run_id = tracker.start_run(
                f"train-{schedule}",
                params={**p.flat(), "schedule": schedule, "world_size": world},
                tags={"kind": "train", "schedule": schedule},
            )
        meta["mlflow_run_id"] = run_id
        log.info("train %s: %d steps of %d images, T=%d, %s, on %s x %d processes", schedule, t.steps,
                 t.batch_size, p.timesteps, d.objective, device, world)
    try:
        result = train(model, process, images, settings, seed=p.seed, device=device,
                       checkpoint_dir=CHECKPOINTS / schedule, metadata=meta, run_key=run_key,
                       on_log=lambda rows: tracker.log_metrics(run_id, rows), on_eval=on_eval, progress=main)
    except BaseException:
        if main:
            tracker.end_run(run_id, status="FAILED")
        raise
    if not main:
        return

    out = model_dir(schedule)
    # the final checkpoint, copied from the last one written by the loop (self-describing, with EMA weights)
    with atomic_path(out / "model.pt") as tmp:
        shutil.copyfile(CHECKPOINTS / schedule / f"ckpt-{result.step:08d}.pt", tmp)
    losses = pd.DataFrame(result.history)
    fid_curve = pd.DataFrame(result.extra.get("eval", []), columns=["step", "fid"])
    for name, df in (("loss.csv", losses), ("fid_curve.csv", fid_curve)):
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
        tracker.log_artifact(run_id, out / name)
    tail = losses["loss"].iloc[-max(1, len(losses) // 10):]
    summary = {"schedule": schedule, "steps": result.step, "final_loss": float(tail.mean()),
               "seconds": round(result.seconds, 3), "images_per_second": round(result.images_per_second, 1),
               "resumed_from": result.resumed_from, "mlflow_run_id": run_id,
               "skipped_steps": result.extra.get("skipped_steps", 0), "world_size": world}
    write_json(out / "train.json", summary)
    tracker.log_metrics(run_id, [{"step": result.step, "final_loss": summary["final_loss"],
                                  "train_seconds": result.seconds, "skipped_steps": summary["skipped_steps"]}])
    tracker.end_run(run_id)
    # finished: models/<schedule>/model.pt holds the final state; the checkpoints served only a resume
    shutil.rmtree(CHECKPOINTS / schedule, ignore_errors=True)
    log.info("train %s: final loss %.4f, %.1f img/s", schedule, summary["final_loss"], result.images_per_second)


if __name__ == "__main__":
    main()
