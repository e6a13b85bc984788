"""train: one model per beta schedule and training seed (`python -m stages.train <schedule> <seed>`).

Writes models/<schedule>/seed<k>/model.pt (the exported inference model: description and EMA weights),
loss.csv, fid_curve.csv (step, fid, floor: what a perfect model scores at the curve's own sample count) and
train.json (no timings: those go to MLflow); resumes from checkpoints/<schedule>/seed<k>/ after an
interruption. That folder is not a DVC output (DVC leaves undeclared files alone, so they survive a
failed run); once training is done the run deletes its own checkpoints there and keeps other runs'.
The seed sets the initial weights, the data order and the training noise.

Data parallel: with `train.nproc_per_node: N` (> 1) the stage re-executes itself as
`python -m torch.distributed.run --standalone --nproc_per_node N -m stages.train <schedule> <seed>`
(DistributedDataParallel; gloo on the CPU, NCCL on CUDA with rank r on cuda:LOCAL_RANK; the global batch
stays train.batch_size). On several machines, one command per node (docs/scaling.md):

    python -m stages.train --nnodes 2 --node-rank R --rdzv HOST:29500 [--max-restarts 1] linear 0

Node 0 (at HOST) runs it through `dvc repro --force --single-item train@linear-0` (the layout travels in
DDPM_* environment variables), so DVC records the model; every node then starts its torchrun agent
(ddpm.training.distributed.launch_nodes). Rank 0 is on node 0; only it logs to MLflow and writes checkpoints and
outputs. Launched by a torchrun of your own, the stage runs as the rank it is given.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
from pathlib import Path

import pandas as pd
import torch

from ddpm.training import distributed as dist
from ddpm.nn import kernels
from ddpm.training.checkpoint import (build, latest_valid_checkpoint, remove_run_checkpoints, save_model,
                                      spec_from_params)
from ddpm.app.config import load_params, resolve_device
from ddpm.data.convert import model_to_uint8
from ddpm.metrics.features import load_featurizer
from ddpm.metrics.nll import data_levels
from ddpm.metrics.fid import fid_from_images, perfect_model_fid
from ddpm.io import atomic_path
from ddpm.app.paths import (FEATURIZER, FID_CURVE_CSV, LOSS_CSV, PREPARED, TRAIN_JSON, checkpoint_dir, load_arrays,
                            model_dir, read_json, setup_logging, write_json)
from ddpm.io import file_sha256
from ddpm.diffusion.samplers import StepRule, sample_images
from ddpm.nn.speed import Speed, set_up_process
from ddpm.app.tracking.runs import Tracker, kernel_tags, pending_file
from ddpm.training.loop import TrainResult, TrainSettings, train

# the params a trained model depends on (declared for this stage in dvc.yaml): a checkpoint made with
# other values of these is never resumed from
TRAIN_KEYS = ("seed", "timesteps", "fast", "model", "diffusion.objective", "diffusion.zero_terminal_snr",
              "diffusion.min_snr_gamma", "diffusion.clip_denoised", "diffusion.variance", "train")
CODE = [Path("stages/train.py"), *Path("ddpm").glob("*.py")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("schedule")
    parser.add_argument("seed", type=int)
    parser.add_argument("--nnodes", type=int, default=1, help="machines in the run (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nnodes-1 (0: HOST)")
    parser.add_argument("--rdzv", metavar="HOST:PORT", help="node 0's address and a free port: the rendezvous")
    parser.add_argument("--max-restarts", type=int, default=0, help="elastic restarts after a worker fails")
    parser.add_argument("--rdzv-timeout", type=int, default=600, metavar="S",
                        help="seconds a node waits for the others to (re)join before the job fails")
    args = parser.parse_args()
    log = setup_logging()
    p = load_params()
    if args.schedule not in p.diffusion.schedules:
        raise SystemExit(f"schedule {args.schedule!r} is not in diffusion.schedules={list(p.diffusion.schedules)}")
    if args.seed not in p.seeds:
        raise SystemExit(f"seed {args.seed} is not in seeds={list(p.seeds)}")
    item = [args.schedule, str(args.seed)]
    nodes = node_layout(args)
    if nodes is not None and not dist.launched_by_torchrun():
        if nodes.node_rank == 0 and "DVC_STAGE" not in os.environ and Path(".dvc").is_dir():
            raise SystemExit(repro_on_node0(args.schedule, args.seed, p, nodes, log))
        raise SystemExit(dist.launch_nodes("stages.train", item, nodes, p.train.nproc_per_node,
                                           f"ddpm-train-{args.schedule}-seed{args.seed}"))
    if p.train.nproc_per_node > 1 and not dist.launched_by_torchrun():
        raise SystemExit(dist.relaunch("stages.train", item, p.train.nproc_per_node))
    device = dist.init(resolve_device(p.device))
    try:
        run(args.schedule, args.seed, p, device, log)
    finally:
        dist.destroy()


def node_layout(args) -> "dist.Nodes | None":
    """The multi-node layout from the flags, else from the environment (``dvc repro`` passes it so); None
    for one machine. Never a params.yaml key: where a model trains does not change it."""
    if args.rdzv is None and args.nnodes == 1:
        return dist.Nodes.from_env() if not dist.launched_by_torchrun() else None
    if args.rdzv is None:
        raise SystemExit(f"--nnodes {args.nnodes} needs --rdzv HOST:PORT (node 0's address and a free port)")
    try:
        return dist.Nodes(args.nnodes, args.node_rank, args.rdzv, args.max_restarts, args.rdzv_timeout)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def repro_on_node0(schedule: str, seed: int, p, nodes: "dist.Nodes", log) -> int:
    """Node 0 trains through ``dvc repro --force --single-item train@<schedule>-<seed>``, the layout in the
    environment: DVC then records the model in dvc.lock as for any run (no ``dvc commit -f``), and a later
    ``dvc repro`` finds the stage up to date. ``--force``: the other nodes wait for this one, so it trains
    even when DVC finds the stage up to date; ``--single-item``: prepare and featurizer are not rerun here
    (the other nodes pulled their outputs)."""
    from stages.item import items

    stage = next(name for name, it in items("train", p).items() if it == {"schedule": schedule, "seed": seed})
    cmd = ["dvc", "repro", "--force", "--single-item", stage]
    log.info("node 0 of %d: %s (rendezvous at %s)", nodes.nnodes, " ".join(cmd), nodes.endpoint)
    code = subprocess.run(cmd, env={**os.environ, **nodes.to_env()}).returncode
    if code:
        log.error("%s failed (exit %d): nothing recorded in dvc.lock; a node that did not (re)join within "
                  "--rdzv-timeout=%d s shows as a RendezvousTimeoutError above", stage, code, nodes.rdzv_timeout)
    return code


class FidCurve:
    """``on_eval``: FID of the EMA model during training, in the featurizer's space, against the train-split
    statistics, from ``train.fid_samples`` images; ``floor`` is what a perfect model scores at that count
    (ddpm.metrics.fid.perfect_model_fid)."""

    def __init__(self, p, process, shape, device, speed, tracker: Tracker, run_id: str, log) -> None:
        self.p, self.process, self.shape, self.device, self.speed = p, process, shape, device, speed
        self.tracker, self.run_id, self.log = tracker, run_id, log
        self.featurizer = load_featurizer(FEATURIZER / "featurizer.pt", device=str(device))
        self.ref = load_arrays(FEATURIZER / "reference.npz")
        self.floor = float("nan")
        if p.train.fid_every:  # what a perfect model scores at the curve's sample count (ddpm.metrics.fid)
            try:
                self.floor = perfect_model_fid(self.ref["holdout_features"], self.ref["train_features"],
                                               p.train.fid_samples)["fid"]
            except ValueError as e:
                raise SystemExit(f"train.fid_samples={p.train.fid_samples}: {e} "
                                 "(raise data.holdout_fraction)") from None

    def __call__(self, step: int, ema_model: torch.nn.Module) -> dict[str, float]:
        t, d = self.p.train, self.p.diffusion
        x = sample_images(ema_model, self.process, t.fid_samples, self.shape, t.fid_sampling_steps, StepRule("ddim", 0.0),
                          seed=self.p.seed, batch_size=t.fid_samples, clip_denoised=d.clip_denoised,
                          device=self.device, autocast_dtype=self.speed.autocast_dtype)
        fid = fid_from_images(self.featurizer, model_to_uint8(x), self.ref["mu"], self.ref["sigma"],
                              device=str(self.device))
        self.tracker.log_metrics(self.run_id, [{"step": step, "fid_train": fid}])
        self.log.info("train: step %d, FID %.3f (floor %.3f; %d samples, DDIM %d steps)", step, fid, self.floor,
                      t.fid_samples, t.fid_sampling_steps)
        return {"fid": fid, "floor": self.floor}


def run_key(schedule: str, seed: int, p) -> str:
    """Resume only a run interrupted with the same schedule, seed, params and code."""
    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(CODE))).hexdigest()[:16]
    return f"{schedule}-seed{seed}-{p.params_hash(TRAIN_KEYS)}-{code}"


def start_tracking(schedule: str, seed: int, p, key: str, log, restart: int = 0) -> tuple[Tracker, str]:
    """The MLflow run; an interrupted run continues its own (its id is in the checkpoints), so its loss curve
    stays in one place, also after torchrun's elastic restart (tagged ``elastic_restarts``)."""
    tracker = Tracker(enabled=p.tracking.enabled, experiment=p.tracking.experiment,
                      pending_path=pending_file(f"train-{schedule}-seed{seed}"))
    previous = latest_valid_checkpoint(checkpoint_dir(schedule, seed), key)
    run_id = previous.get("mlflow_run_id") if previous else None
    tracker.adopt(run_id, previous.get("mlflow_writer_key") if previous else None)
    if run_id is None or run_id.startswith("pending-"):
        run_id = tracker.start_run(
            f"train-{schedule}-seed{seed}",
            params={**p.flat(), "schedule": schedule, "train_seed": seed, "world_size": dist.world_size()},
            tags={"kind": "train", "schedule": schedule, "seed": str(seed)},
        )
    if restart:
        step = previous["step"] if previous else 0
        log.info("train %s seed %d: elastic restart %d, resuming at step %d in MLflow run %s", schedule, seed,
                 restart, step, run_id)
        tracker.set_tags(run_id, {"elastic_restarts": restart})
        tracker.log_metrics(run_id, [{"step": step, "elastic_restart": restart}])
    return tracker, run_id


def check_nodes_agree(key: str) -> int:
    """Every process trains the same thing: the same run key (params.yaml, code) and training images,
    which each node reads from its own checkout. Returns torchrun's elastic restart count: the most over
    the nodes (the agent whose worker failed counts a restart; the others restart theirs uncounted)."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if dist.world_size() == 1:
        return restart
    seen = dist.all_gather_object((key, file_sha256(PREPARED / "train.npz"), restart))
    for what, i in (("params.yaml or code (the same git commit and params everywhere)", 0),
                    ("data/prepared/train.npz (pull the prepare stage's outputs)", 1)):
        odd = [r for r, v in enumerate(seen) if v[i] != seen[0][i]]
        if odd:
            raise SystemExit(f"train: rank(s) {odd} differ from rank 0 in {what}: {seen[odd[0]][i]} vs {seen[0][i]}")
    return max(v[2] for v in seen)


def run(schedule: str, seed: int, p, device: torch.device, log) -> None:
    """One rank's share of training ``schedule`` from ``seed``; rank 0 also tracks, evaluates and writes."""
    main, world = dist.is_main(), dist.world_size()
    speed = Speed.resolve(p.fast, device)
    set_up_process(p.fast)  # the allocator and subnormals with fast: true, else PyTorch's ops (ddpm.nn.speed)
    if world != p.train.nproc_per_node and main:
        log.warning("train.nproc_per_node=%d but torchrun started %d processes: the launch decides",
                    p.train.nproc_per_node, world)
    images = torch.from_numpy(load_arrays(PREPARED / "train.npz")["images"])
    shape = tuple(images.shape[1:])
    levels = data_levels(images.numpy(), read_json(PREPARED / "meta.json"))  # L_vlb's decoder bins (learned variances)
    meta = spec_from_params(p, schedule, shape, seed, levels)
    with torch.random.fork_rng(devices=[]):  # initial weights from the training seed, the global RNG untouched
        torch.manual_seed(seed)
        model, process = build(meta)
    model.check_image_size(shape[1:])
    meta["model_config"] = model.config
    key, t = run_key(schedule, seed, p), p.train
    settings = TrainSettings.from_config(t, amp=t.amp or speed.autocast_dtype is not None,
                                         channels_last=speed.train_channels_last,
                                         compile=speed.compile)
    restart = check_nodes_agree(key)
    tracker = run_id = on_eval = None
    if main:  # the other ranks only train: no FID, no MLflow, no files
        tracker, run_id = start_tracking(schedule, seed, p, key, log, restart)
        on_eval = FidCurve(p, process, shape, device, speed, tracker, run_id, log)
        meta["mlflow_run_id"], meta["mlflow_writer_key"] = run_id, tracker.writer_key(run_id)  # resume only
        log.info("train %s seed %d: %d steps of %d images, T=%d, %s, on %s x %d processes", schedule, seed,
                 t.steps, t.batch_size, p.timesteps, p.diffusion.objective, device, world)
    try:
        result = train(model, process, images, settings, seed=seed, device=device,
                       checkpoint_dir=checkpoint_dir(schedule, seed), metadata=meta, run_key=key,
                       on_log=lambda rows: tracker.log_metrics(run_id, rows), on_eval=on_eval, progress=main)
    except BaseException:
        if main:
            tracker.end_run(run_id, status="FAILED")
        raise
    if main:
        write_outputs(schedule, seed, result, meta, tracker, run_id, log)
        remove_run_checkpoints(checkpoint_dir(schedule, seed), key)  # model.pt holds what inference needs
        folder = checkpoint_dir(schedule, seed).parent
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def write_outputs(schedule: str, seed: int, result: TrainResult, meta: dict, tracker: Tracker, run_id: str,
                  log) -> None:
    """model.pt (exported: description + EMA weights), loss.csv, fid_curve.csv, train.json; timings to MLflow."""
    out = model_dir(schedule, seed)
    # the exported model is a DVC output: no run-varying values (the MLflow run id stays in the resume checkpoints)
    meta["kernels"] = kernels.kernel_record(next(result.ema.parameters()).device)  # they change the bits: recorded
    save_model(out / "model.pt", {k: v for k, v in meta.items() if not k.startswith("mlflow_")}, result.ema,
               result.step)
    losses = pd.DataFrame(result.history)
    fid_curve = pd.DataFrame(result.extra.get("eval", []), columns=["step", "fid", "floor"])
    for name, df in ((LOSS_CSV, losses), (FID_CURVE_CSV, fid_curve)):
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
        tracker.log_artifact(run_id, out / name)
    tail = losses["loss"].iloc[-max(1, len(losses) // 10):]
    summary = {"schedule": schedule, "seed": seed, "steps": result.step, "final_loss": float(tail.mean()),
               "skipped_steps": result.extra.get("skipped_steps", 0), "world_size": dist.world_size(),
               "kernels": meta["kernels"]}
    write_json(out / TRAIN_JSON, summary)  # a pure function of the inputs: run ids and resumes go to MLflow
    # the fid and report stages find this run by the model's content hash (sample .json files record it)
    resumed = "none" if result.resumed_from is None else result.resumed_from
    tracker.set_tags(run_id, {"model_sha256": file_sha256(out / "model.pt"), "resumed_from": resumed,
                              **kernel_tags(meta["kernels"])})
    tracker.log_metrics(run_id, [{"step": result.step, "final_loss": summary["final_loss"],
                                  "train_seconds": result.seconds, "images_per_second": result.images_per_second,
                                  "skipped_steps": summary["skipped_steps"]}])
    tracker.end_run(run_id)
    log.info("train %s seed %d: final loss %.4f, %.1f img/s", schedule, seed, summary["final_loss"],
             result.images_per_second)


if __name__ == "__main__":
    main()
