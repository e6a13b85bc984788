"""Sample count as a knob (issue 26): resolving power against n, the A/A check, training noise, emulation flips.

Subcommands (each prints what it measured; `--out FILE` also writes it there, headed by the command line):

  draw     sample every (schedule, sample set) of params.yaml from MODELS/<schedule>/seed<k>/model.pt at n_max
           images (the pipeline's sampler: per-index noise, batch sample.batch_size, params' seed and `fast`),
           extract features with FEATURIZER/featurizer.pt, save them (ddpm.metrics.compare.save_features) and the
           seconds per 400-image chunk, per-set feature time and the matmul rate in a .json beside them.
           Larger n only appends images, so the first n of an n_max set ARE the set drawn at n.
  power    from one or more draw files: for each n, the paired bootstrap + question table (ddpm.metrics.compare, as the
           fid stage runs it) and how many of the 18 main effects resolve family-wise; cost of sampling + FID at
           each n, measured and scaled to 137 GFLOP/s by the matmul rate.
  aa       A/A: one model, one sample set, 2 x PAIRS sets with different sampler seeds, each pair compared by the
           paired machinery (they share no noise: independent index draws; one shared reference); the rate
           declared different at 95% with its Clopper-Pearson interval.
  seeds    question tables of one training seed (seed 0) and of all seeds (t over seeds, ddpm.metrics.compare.estimate);
           how many single-seed verdicts survive. Also reads a pipeline's reports/features.npz (e.g. of
           `dvc exp run -S 'seeds=[0,1,2]'`).
  flips    question tables of two draw files (e.g. one drawn under ATEN_CPU_CAPABILITY=default
           ONEDNN_MAX_CPU_ISA=SSE41) at one n: verdicts that differ.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.default_path import matmul_gflops
from ddpm.metrics import compare
from ddpm.training.checkpoint import load_model
from ddpm.app.config import load_params
from ddpm.data.convert import model_to_uint8
from ddpm.metrics.features import extract_features, load_featurizer
from ddpm.metrics.fid import fid_infinity, fid_interval, kid
from ddpm.app.names import sampler_label
from ddpm.diffusion.samplers import StepRule, sample_images
from ddpm.nn.speed import Speed, sampling_model, tune_allocator

SLOWEST = 137.0  # GFLOP/s: the slowest machine the default run must fit in 10 minutes (issue 26)
CHUNK = 400


def _sets(p):
    return [(s, compare.set_label(sampler_label(s.name, s.eta), s.steps)) for s in p.sample.samplers]


def draw_sets(p, models: Path, featurizer, seed_model: int, n: int, sampler_seed: int, only=None,
              schedules=None) -> tuple[dict, dict]:
    """features {(schedule, seed_model, set): [n, D]} and timings {set key: [seconds per chunk]}."""
    speed = Speed.resolve(p.fast, "cpu")
    if p.fast:
        tune_allocator()
    cells, times, feat_s = {}, {}, 0.0
    for schedule in schedules or p.diffusion.schedules:
        model, process, ckpt = load_model(models / schedule / f"seed{seed_model}" / "model.pt")
        net = sampling_model(model, speed)
        for s, label in _sets(p):
            if only and label != only:
                continue
            rule, chunks, key = StepRule(s.name, s.eta, p.sample.spacing), [], (schedule, seed_model, label)
            for k in range(-(-n // CHUNK)):
                m = min(CHUNK, n - k * CHUNK)
                t = time.perf_counter()
                x = sample_images(net, process, k * CHUNK + m, tuple(ckpt["image_shape"]), s.steps, rule,
                                  seed=sampler_seed, batch_size=CHUNK, chunks=[k],
                                  clip_denoised=ckpt["diffusion"]["clip_denoised"],
                                  autocast_dtype=speed.autocast_dtype)
                chunks.append((m, time.perf_counter() - t))
                cells.setdefault(key, []).append(model_to_uint8(x).numpy())
            t = time.perf_counter()
            cells[key] = extract_features(featurizer, np.concatenate(cells[key]))
            feat_s += time.perf_counter() - t
            times["|".join(map(str, key))] = chunks
            print(f"  {schedule} seed{seed_model} {label}: {n} images, {sum(c[1] for c in chunks):.1f} s", flush=True)
    return cells, {"chunks": times, "features_s": feat_s, "n": n}


def cmd_draw(a, p) -> str:
    featurizer = load_featurizer(a.featurizer / "featurizer.pt")
    ref = np.load(a.featurizer / "reference.npz")["train_features"]
    rate = matmul_gflops()
    cells = {}
    timing = {"matmul_gflops_before": rate, "runs": []}
    for k in a.seed_models:
        c, t = draw_sets(p, a.models, featurizer, k, a.n, p.seed, schedules=a.schedules)
        cells.update(c)
        timing["runs"].append(t)
    timing["matmul_gflops_after"] = matmul_gflops()
    compare.save_features(a.save, cells, ref)
    Path(a.save).with_suffix(".json").write_text(json.dumps(timing, indent=1))
    total = sum(s for r in timing["runs"] for ch in r["chunks"].values() for _, s in ch)
    return (f"drew {len(cells)} sets x {a.n} images in {total:.1f} s (matmul {rate:.0f} -> "
            f"{timing['matmul_gflops_after']:.0f} GFLOP/s) -> {a.save}")


def _load(files) -> tuple[dict, np.ndarray, dict]:
    """Cells, reference and timings merged over draw files (e.g. one per schedule, drawn in parallel)."""
    cells, ref, timing = {}, None, {"chunks": {}, "features_s": 0.0, "rates": []}
    for f in files:
        c, r, _ = compare.load_features(f)
        if ref is not None and not np.array_equal(ref, r):
            raise SystemExit(f"{f}: another reference set")
        cells.update(c)
        ref = r
        side = Path(f).with_suffix(".json")  # a draw's timings; a pipeline's reports/features.npz has none
        if not side.is_file():
            continue
        t = json.loads(side.read_text())
        timing["rates"] += [t["matmul_gflops_before"], t["matmul_gflops_after"]]
        for run in t["runs"]:
            timing["chunks"].update(run["chunks"])
            timing["features_s"] += run["features_s"]
            timing["n"] = run["n"]
    order = {s: i for i, s in enumerate(load_params().diffusion.schedules)}
    cells = dict(sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])))
    return cells, ref, timing


def _main_effects(table):
    q = table[(table["family"] == "questions") & (table["kind"] != "interaction")].copy()
    q["holm18"] = compare.holm(q["p"].to_numpy())  # plain Holm over the 18 main effects alone
    return q


def _sampling_seconds(timing: dict, n: int) -> float:
    """Seconds to draw the first n images of every set: whole chunks, and the partial one pro rata."""
    total = 0.0
    for chunks in timing["chunks"].values():
        left = n
        for m, s in chunks:
            take = min(left, m)
            total += s * take / m
            left -= take
            if left <= 0:
                break
    return total


def cmd_power(a, p) -> str:
    cells, ref, run = _load(a.features)
    if not run["rates"]:
        raise SystemExit("power needs the timings of a draw (the .json `draw` writes beside its features file)")
    rate = float(np.mean(run["rates"]))
    lines = [f"matmul rate during the draws (before / after each): {', '.join(f'{r:.0f}' for r in run['rates'])} "
             f"GFLOP/s (mean {rate:.0f}); costs scaled to {SLOWEST:.0f} GFLOP/s by x {rate / SLOWEST:.2f}",
             "| n | main effects resolved (report: weighted Holm over 36) | (Holm over the 18 alone) | unadjusted 95% | "
             "sampling s | features s | FID stage maths s | total s | total s at 137 GFLOP/s |", "|" + "---|" * 9]
    verdicts = {}
    for n in a.n:
        sub = {k: v[:n] for k, v in cells.items()}
        t = time.perf_counter()
        for v in sub.values() if a.stage_maths else ():  # what the fid stage computes per cell besides comparisons
            fid_interval(v, ref), kid(v, ref), fid_infinity(v, ref)
        table = compare.grid_comparisons(sub, ref, n_boot=1000, seed=p.seed)
        maths = time.perf_counter() - t
        q = _main_effects(table)
        verdicts[n] = q
        samp = _sampling_seconds(run, n)
        feat = run["features_s"] * n / run["n"]
        total = samp + feat + maths
        lines.append(f"| {n} | {(q['verdict'] != 'tie').sum()} of {len(q)} | {(q['holm18'] <= 0.05).sum()} | "
                     f"{(q['p'] <= 0.05).sum()} | {samp:.1f} | {feat:.1f} | {maths:.1f} | {total:.1f} | "
                     f"{total * rate / SLOWEST:.1f} |")
    lines += ["", _projection(verdicts[max(verdicts)], max(verdicts), a.project), ""]
    for n, q in verdicts.items():
        lines.append(f"n = {n}: question table (main effects; effect = FID(a) - FID(b))")
        for r in q.itertuples():
            lines.append(f"  {r.a:>20} vs {r.b:<20} {r.effect:+8.3f} [{r.lo:+8.3f}, {r.hi:+8.3f}] p={r.p:.2g} "
                         f"p_holm={r.p_holm:.2g} {r.verdict}")
    return "\n".join(lines)


def _projection(q, n: int, targets) -> str:
    """NOT a measurement: the main effects measured at n with their standard errors shrunk by sqrt(n / n'),
    effects held fixed; Holm over the 18 at 0.05, and at 0.04 (the report's 80% share for the main effects,
    without the share recycled from the interaction checks: conservative)."""
    from scipy.stats import norm

    se = (q["hi"] - q["lo"]).to_numpy() / (2 * norm.ppf(0.975))
    rows = [f"projection from n = {n} (standard errors x sqrt({n} / n'), effects fixed; not a measurement):"]
    for t in targets:
        pp = 2 * norm.sf(np.abs(q["effect"].to_numpy()) / (se * np.sqrt(n / t)))
        adj = compare.holm(pp)
        rows.append(f"  n' = {t}: Holm over the 18 at 0.05: {(adj <= 0.05).sum()}; at 0.04: {(adj <= 0.04).sum()}")
    return "\n".join(rows)


def cmd_aa(a, p) -> str:
    from scipy.stats import beta

    featurizer = load_featurizer(a.featurizer / "featurizer.pt")
    ref = np.load(a.featurizer / "reference.npz")["train_features"]
    feats = []
    t = time.perf_counter()
    for i in range(2 * a.pairs):
        c, _ = draw_sets(p, a.models, featurizer, 0, a.n, a.first_seed + i, only=a.set, schedules=[a.schedule])
        feats.append(next(iter(c.values())))
    draw_s = time.perf_counter() - t
    rows, hits = [], 0
    for j in range(a.pairs):
        x, y = feats[2 * j], feats[2 * j + 1]
        # they share nothing: each its own noise group (independent index draws), the reference shared
        boot = compare.paired_bootstrap({"x": x, "y": y}, ref, groups={"x": "x", "y": "y"}, n_boot=1000, seed=j)
        e = boot.contrast({"x": 1.0, "y": -1.0})
        hit = e.p <= 0.05
        hits += hit
        rows.append(f"  pair {j:2d} (sampler seeds {a.first_seed + 2 * j}, {a.first_seed + 2 * j + 1}): "
                    f"{e.effect:+.3f} [{e.lo:+.3f}, {e.hi:+.3f}] p={e.p:.3f}{'  DIFFERENT' if hit else ''}")
    k, m = hits, a.pairs
    lo = beta.ppf(0.025, k, m - k + 1) if k > 0 else 0.0
    hi = beta.ppf(0.975, k + 1, m - k) if k < m else 1.0
    return "\n".join([f"A/A: {a.schedule} seed0, {a.set}, n = {a.n}, {m} pairs of sampler seeds "
                      f"({a.first_seed}..{a.first_seed + 2 * m - 1}); paired bootstrap (1000 replicates, normal), "
                      f"independent index draws per set, one shared reference draw; drawing took {draw_s:.0f} s",
                      f"declared different at 95%: {k} of {m} = {k / m:.1%}, Clopper-Pearson 95% interval "
                      f"[{lo:.1%}, {hi:.1%}]", *rows])


def cmd_seeds(a, p) -> str:
    cells, ref, _ = _load(a.features)
    cells = {k: v[:a.n] for k, v in cells.items()}
    seeds = sorted({k[1] for k in cells})
    one = _main_effects(compare.grid_comparisons({k: v for k, v in cells.items() if k[1] == 0}, ref, seed=p.seed))
    allq = _main_effects(compare.grid_comparisons(cells, ref, seed=p.seed))
    lines = [f"training noise: seeds {seeds}, n = {a.n}; one seed (0): paired bootstrap; all seeds: t interval over the "
             f"{len(seeds)} per-seed contrasts (ddpm.metrics.compare.estimate), weighted Holm as in the report",
             f"resolved with seed 0 alone: {(one['verdict'] != 'tie').sum()} of {len(one)}; with seeds {seeds}: "
             f"{(allq['verdict'] != 'tie').sum()} of {len(allq)}"]
    kept = 0
    for (_, r1), (_, r3) in zip(one.iterrows(), allq.iterrows()):
        same = r1["verdict"] != "tie" and r1["verdict"] == r3["verdict"]
        kept += same
        lines.append(f"  {r1['a']:>20} vs {r1['b']:<20} seed0 {r1['effect']:+7.3f} {r1['verdict']:<22} | seeds "
                     f"{r3['effect']:+7.3f} [{r3['lo']:+7.3f}, {r3['hi']:+7.3f}] {r3['verdict']}")
    lines.insert(2, f"single-seed verdicts that survive with the seed-to-seed variation in the interval: {kept} of "
                    f"{(one['verdict'] != 'tie').sum()}")
    return "\n".join(lines)


def cmd_flips(a, p) -> str:
    qs = []
    for group in (a.features, a.other):
        cells, ref, _ = _load(group)
        qs.append(_main_effects(compare.grid_comparisons({k: v[:a.n] for k, v in cells.items()}, ref, seed=p.seed)))
    x, y = qs
    flips = [f"  {r1['a']} vs {r1['b']}: {r1['verdict']} -> {r2['verdict']}"
             for (_, r1), (_, r2) in zip(x.iterrows(), y.iterrows()) if r1["verdict"] != r2["verdict"]]
    diff = np.abs(x["effect"].to_numpy() - y["effect"].to_numpy())
    return "\n".join([f"n = {a.n}: resolved {(x['verdict'] != 'tie').sum()} of {len(x)} (--features) vs "
                      f"{(y['verdict'] != 'tie').sum()} of {len(y)} (--other); verdicts that differ: {len(flips)}; "
                      f"largest |effect difference| {diff.max():.4f}", *flips])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("draw")
    d.add_argument("--seed-models", type=int, nargs="+", default=[0])
    d.add_argument("--save", type=Path, required=True)
    d.add_argument("--schedules", nargs="+", help="a subset of diffusion.schedules (draw them in parallel processes)")
    pw = sub.add_parser("power")
    pw.add_argument("--features", type=Path, nargs="+", required=True)
    pw.add_argument("--n", type=int, nargs="+", default=[400, 1000, 2000])
    pw.add_argument("--project", type=int, nargs="*", default=[2000, 4000, 8000])
    pw.add_argument("--no-stage-maths", dest="stage_maths", action="store_false",
                    help="time only the comparisons, not the per-cell interval, KID and FID-infinity")
    aa = sub.add_parser("aa")
    aa.add_argument("--schedule", default="cosine")
    aa.add_argument("--set", default="ddim-eta0-10")
    aa.add_argument("--pairs", type=int, default=20)
    aa.add_argument("--first-seed", type=int, default=1000)
    sd = sub.add_parser("seeds")
    fl = sub.add_parser("flips")
    for s in (sd, fl):
        s.add_argument("--features", type=Path, nargs="+", required=True)
    fl.add_argument("--other", type=Path, nargs="+", required=True, help="the draw files to compare against")
    for s in (d, aa, sd, fl):
        s.add_argument("--n", type=int, default=400)
    for s in (d, aa):
        s.add_argument("--models", type=Path, default=Path("models"))
        s.add_argument("--featurizer", type=Path, default=Path("featurizer"))
    for s in (d, pw, aa, sd, fl):
        s.add_argument("--out", type=Path)
    a = ap.parse_args()
    p = load_params()
    text = {"draw": cmd_draw, "power": cmd_power, "aa": cmd_aa, "seeds": cmd_seeds, "flips": cmd_flips}[a.cmd](a, p)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(f"$ python3 benchmarks/resolving_power.py {shlex.join(sys.argv[1:])}\n"
                         f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads\n\n{text}\n")


if __name__ == "__main__":
    main()
