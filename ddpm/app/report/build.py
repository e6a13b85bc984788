"""The experiment report: a :class:`ddpm.app.results.Results` -> one document structure -> Markdown + HTML + PNGs.

:func:`build_report` writes, under ``out_dir``:

* ``report.md``: Markdown that references the PNG figures in ``figures/`` by relative path;
* ``report.html``: one self-contained page (CSS inline, every image a base64 ``data:`` URI, no
  script, no network), to open straight from disk or an artifact store;
* ``figures/*.png``: from :mod:`ddpm.app.report.figures`, and one pixel-exact sample grid per (schedule, sampler,
  steps) of the first training seed.

Both files are rendered by Jinja2 (:mod:`ddpm.app.report.templates`) from the same :class:`Document`:
a title, a summary of :class:`Span` s, and sections of blocks (paragraph, note, table, figure, gallery).
The HTML template autoescapes every string; the Markdown one escapes through the ``md`` filter. Every
file is written atomically (:mod:`ddpm.io`) and the output is deterministic (no timestamps, no timings).

:func:`summary_metrics` gives the flat dict for ``dvc exp show`` / ``metrics.json``.
"""
from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd

from ddpm.app.report import figures as F
from ddpm.data.convert import make_image_grid
from ddpm.app.report.figures import fmt_num
from ddpm.io import atomic_write_bytes, atomic_write_text
from ddpm.app.paths import grid_name, slug
from ddpm.app.results import TIE_RULE, Results, final_loss, winners_by_steps

__all__ = ["build_report", "summary_metrics", "build_document", "Document"]


# ------------------------------------------------------------------------------------------------
# The document structure (rendered by both templates)
# ------------------------------------------------------------------------------------------------
@dataclass
class Span:
    text: str
    strong: bool = False


@dataclass
class Block:
    """kind: ``paragraph`` (spans) | ``note`` (text) | ``table`` | ``figure`` | ``gallery``."""

    kind: str
    text: str = ""
    spans: list[Span] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # per row: "", "floor", "best", "tie"
    align: list[str] = field(default_factory=list)  # per column: l, r, c
    css: str = ""
    name: str = ""  # figure file name
    alt: str = ""
    caption: str = ""
    pixel: bool = False
    steps: list[int] = field(default_factory=list)  # gallery columns
    cells: list[tuple[str, list[Optional["Block"]]]] = field(default_factory=list)  # gallery rows


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[Block]


@dataclass
class Document:
    title: str
    summary: list[Span]
    hero: Optional[Block]
    sections: list[Section]


def note(text: str) -> Block:
    return Block("note", text=text)


def figure(name: str | None, alt: str, caption: str, pixel: bool = False) -> Block | None:
    return Block("figure", name=name, alt=alt, caption=caption, pixel=pixel) if name else None


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------

def fmt_interval(lo: float, hi: float) -> str:
    return f"[{fmt_num(lo)}, {fmt_num(hi)}]"


def fmt_pm(mean: float, sd: float) -> str:
    return fmt_num(mean) if not math.isfinite(sd) else f"{fmt_num(mean)} ± {fmt_num(sd, 2)}"


def fmt_pct(x: Any) -> str:
    try:
        return f"{100 * float(x):.1f}%"
    except (TypeError, ValueError):
        return str(x)


def compact(v: Any) -> str:
    """A short, YAML-like rendering of a parameter value."""
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {compact(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(compact(x) for x in v) + "]"
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    return f"{v:g}" if isinstance(v, float) else str(v)


def md_escape(text: Any) -> str:
    """Escape Markdown inline syntax (and table pipes) in plain text."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", str(text)).replace("\n", " ")


def config_name(c: pd.Series) -> str:
    return f"{c['schedule']} / {c['label']} / {int(c['steps'])} steps"


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------
def _scope(r: Results) -> list[Span]:
    n_sched, fl = len(r.schedules), r.floor
    out = [Span(f"{len(r.configs)} sampling configurations ({n_sched} noise schedule{'s' * (n_sched != 1)}, "
                f"T = {r.timesteps}{', zero terminal SNR' if r.zero_terminal_snr else ''}) were scored by FID and "
                f"KID on {fl.n_samples} samples in the {fl.features} feature space. Intervals: {fl.interval}. ")]
    if len(r.seeds) == 1:
        out.append(Span(f"Each configuration was trained with one seed (seed {r.seeds[0]}): differences between "
                        "schedules have not been tested against training noise. "))
    else:
        out.append(Span(f"Each configuration was trained with {len(r.seeds)} seeds "
                        f"({', '.join(str(s) for s in r.seeds)}): FIDs are the mean ± sd over seeds, and intervals "
                        "the 95% Student-t interval of that mean. "))
    return out


def _best(r: Results) -> list[Span]:
    best, fl = r.best, r.floor
    if best is None:
        return [Span(f"No finite FID was recorded; the floor (a perfect model's expected FID) is {fmt_num(fl.fid)}. ")]
    ratio = f"{best['fid'] / fl.fid:.2f}x" if fl.fid > 0 else "n/a"
    out = [Span("The best configuration is "), Span(config_name(best), strong=True), Span(" with FID "),
           Span(fmt_pm(best["fid"], best["fid_sd"]), strong=True),
           Span(f" {fmt_interval(best['fid_lo'], best['fid_hi'])}, {ratio} the floor of "
                f"{fmt_num(fl.fid)} {fmt_interval(fl.lo, fl.hi)} (what a perfect model, {fl.n_samples} i.i.d. "
                "draws of the data, is expected to score; estimated from the held-out real images). ")]
    ties = r.configs[r.configs["tie"]]
    if len(ties):
        out.append(Span(f"Indistinguishable from it ({TIE_RULE}): {'; '.join(config_name(t) for _, t in ties.iterrows())}. "))
    else:
        out.append(Span(f"No other configuration is indistinguishable from it ({TIE_RULE}). "))
    return out


def _winners(r: Results) -> list[Span]:
    parts = []
    for steps, win, tied in winners_by_steps(r.configs, r.comparisons):
        tie_txt = f", tied with {', '.join(tied)}" if tied else ", ahead of every other sampler"
        parts.append(f"at {steps} steps {win['label']} ({win['schedule']}, FID {fmt_num(win['fid'])} "
                     f"{fmt_interval(win['fid_lo'], win['fid_hi'])}){tie_txt}")
    if not parts:
        return []
    return [Span("Best sampler per step count (same tie rule): " + "; ".join(parts) + ". ")]


def _training(r: Results) -> list[Span]:
    out = []
    f = r.featurizer
    acc = f", {fmt_pct(f['val_accuracy'])} validation accuracy" if f.get("val_accuracy") is not None else ""
    out.append(Span(f"Ruler: the {f['ruler']} featurizer {f['features']} (sha256 {str(f['sha256'])[:16]}…{acc}). "))
    final = {}
    for s in r.schedules:
        vals = [v for k, d in r.losses.items() if k[0] == s and (v := final_loss(d)) is not None]
        if vals:
            final[s] = float(np.mean(vals))
    if final:
        seeds = "" if len(r.seeds) == 1 else f", mean over {len(r.seeds)} seeds"
        out.append(Span(f"Final training loss (mean of the last 10% of steps{seeds}): "
                        + ", ".join(f"{s} {fmt_num(v)}" for s, v in final.items()) + "."))
    return out


def _questions(r: Results) -> list[Span]:
    q = main_questions(r)
    if not len(q):
        return []
    resolved = int((q["verdict"] != "tie").sum())
    return [Span(f"Questions of the design: {resolved} of {len(q)} main effects resolved at 95% family-wise "
                 f"({int(q['family_size'].iloc[0])} verdicts, Holm). ")]


def summary(r: Results) -> list[Span]:
    return _scope(r) + _best(r) + _winners(r) + _questions(r) + _training(r)


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
FID_HEADER = ["#", "schedule", "sampler", "eta", "spacing", "steps", "seeds", "FID", "95% interval", "FID / floor",
              "KID", "FID − best [95%]", "vs best"]


def fid_table(r: Results) -> Block:
    fl = r.floor
    rows = [["", "perfect model (floor)", "", "", "", "", "", fmt_num(fl.fid), fmt_interval(fl.lo, fl.hi), "1.00",
             fmt_pm(fl.kid, fl.kid_std), "", ""]]
    classes = ["floor"]
    for _, c in r.configs.iterrows():
        ratio = f"{c['fid'] / fl.fid:.2f}" if fl.fid > 0 and math.isfinite(c["fid"]) else "n/a"
        mark = "best" if c["rank"] == 1 and math.isfinite(c["fid"]) else "tie" if c["tie"] else ""
        diff = (f"{fmt_num(c['vs_best'])} {fmt_interval(c['vs_best_lo'], c['vs_best_hi'])}"
                if math.isfinite(c["vs_best"]) else "")
        rows.append([str(c["rank"]), c["schedule"], c["label"], f"{float(c['eta']):g}", c["spacing"],
                     str(int(c["steps"])), str(c["n_seeds"]), fmt_pm(c["fid"], c["fid_sd"]),
                     fmt_interval(c["fid_lo"], c["fid_hi"]), ratio, fmt_pm(c["kid"], c["kid_sd"]), diff, mark])
        classes.append(mark)
    return Block("table", header=FID_HEADER, rows=rows, classes=classes, css="fid",
                 align=["r", "l", "l", "r", "l", "r", "r", "r", "r", "r", "r", "r", "l"])


def main_questions(r: Results) -> pd.DataFrame:
    q = r.comparisons[r.comparisons["family"] == "questions"]
    return q[q["kind"] != "interaction"]


def _interaction_text(r: Results, a: str, b: str) -> str:
    q = r.comparisons
    row = q[(q["family"] == "questions") & (q["kind"] == "interaction") & (q["a"] == a) & (q["b"] == b)]
    if not len(row) or row["verdict"].iloc[0] == "tie":
        return "no"
    i = row.iloc[0]
    return f"yes: at {i['question'].rsplit(' at ', 1)[-1]}, {fmt_num(i['effect'])} {fmt_interval(i['lo'], i['hi'])}"


QUESTION_HEADER = ["question", "effect (FID a − b)", "95% interval", "verdict", "interaction"]


def questions_table(r: Results) -> Block:
    rows = [[c["question"], fmt_num(c["effect"]), fmt_interval(c["lo"], c["hi"]), c["verdict"],
             _interaction_text(r, c["a"], c["b"])] for _, c in main_questions(r).iterrows()]
    return Block("table", header=QUESTION_HEADER, rows=rows, classes=[""] * len(rows),
                 align=["l", "r", "r", "l", "l"], css="questions")


def questions_note(r: Results) -> str:
    q = r.comparisons[r.comparisons["family"] == "questions"]
    n_main = len(main_questions(r))
    seeds = (f"One training seed (seed {r.seeds[0]}): the intervals hold the noise of sampling and of the reference "
             "set, not of training; a verdict says these models differ, not that the schedules would with other "
             "seeds." if len(r.seeds) == 1 else
             f"{len(r.seeds)} training seeds: each interval is a Student-t interval over the per-seed differences, "
             "so it holds training noise as well as sampling noise.")
    return (f"Each effect is a paired difference of FID, a − b (negative: a better), averaged over the other factor "
            f"({main_questions(r)['method'].iloc[0]}: every sample set shares its starting noise x_T per sample index, "
            "so one resample of the indices is applied to all sets together, and the shared reference is resampled "
            f"once per replicate for all of them). The table states {len(q)} verdicts: {n_main} main effects and "
            f"{len(q) - n_main} interaction checks (does a per-level difference depart from the main effect?). The "
            "family-wise error over all of them is held at 5% by a weighted Holm correction (80% of the budget to "
            "the main effects); 'tie' means not resolved after it, even where the unadjusted interval excludes 0. "
            f"{seeds} See docs/statistics.md.")


def _questions_section(r: Results) -> Section:
    if not len(main_questions(r)):
        return Section("questions", "Questions of the design", [note("One schedule and one sample set: no "
                                                                     "question to ask.")])
    return Section("questions", "Questions of the design", [questions_table(r), note(questions_note(r))])


def featurizer_table(f: Mapping[str, Any]) -> Block:
    first = [k for k in ("features", "ruler", "sha256", "seed_stability") if k in f]
    rows = []
    for k in first + [k for k in f if k not in first and "seconds" not in k]:
        v = f[k]
        rows.append([k, fmt_pct(v) if "accuracy" in k and v is not None
                     else compact(v) if isinstance(v, (Mapping, list, tuple, type(None), bool, str)) else fmt_num(v)])
    return Block("table", header=["featurizer", "value"], rows=rows, classes=[""] * len(rows), align=["l", "l"])


def params_table(params: Mapping[str, Any]) -> Block | None:
    if not params:
        return None
    top = {k: v for k, v in params.items() if not isinstance(v, Mapping)}
    rows = [["(top level)", ", ".join(f"{k}={compact(v)}" for k, v in top.items())]] if top else []
    rows += [[str(k), ", ".join(f"{kk}={compact(vv)}" for kk, vv in v.items())]
             for k, v in params.items() if isinstance(v, Mapping)]
    return Block("table", header=["section", "settings"], rows=rows, classes=[""] * len(rows), align=["l", "l"],
                 css="params")


# ------------------------------------------------------------------------------------------------
# Sample grids
# ------------------------------------------------------------------------------------------------
def draw_grids(r: Results, grid_images: int, grid_scale: int) -> dict[tuple[str, str, int], tuple[str, bytes]]:
    out = {}
    for key, imgs in r.samples.items():
        imgs = np.asarray(imgs)
        if imgs.ndim == 4 and len(imgs):
            grid = make_image_grid(imgs[: max(1, grid_images)], nrow=None, scale=int(grid_scale), pad=1, pad_value=0)
            out[key] = (grid_name(*key), F.grid_png(grid))
    return out


def galleries(r: Results, grids: Mapping[tuple[str, str, int], tuple[str, bytes]]) -> list[Block]:
    blocks = []
    for sched in r.schedules:
        keys = [k for k in grids if k[0] == sched]
        if not keys:
            continue
        labels = list(dict.fromkeys(k[1] for k in keys))
        steps = sorted(set(k[2] for k in keys))
        rows = []
        for lab in labels:
            cells = []
            for st in steps:
                c = r.configs[(r.configs["schedule"] == sched) & (r.configs["label"] == lab) & (r.configs["steps"] == st)]
                cap = f"FID {fmt_num(c['fid'].iloc[0])} {fmt_interval(c['fid_lo'].iloc[0], c['fid_hi'].iloc[0])}" \
                    if len(c) else ""
                name = grids[(sched, lab, st)][0] if (sched, lab, st) in grids else None
                cells.append(figure(name, f"{sched} / {lab} / {st} steps", cap, pixel=True))
            rows.append((lab, cells))
        blocks.append(Block("gallery", text=sched, steps=steps, cells=rows))
    return blocks


# ------------------------------------------------------------------------------------------------
# The document
# ------------------------------------------------------------------------------------------------
def _fid_section(r: Results, figs: Mapping[str, bytes]) -> Section:
    fl = r.floor
    n_rank = int((r.comparisons["family"] == "ranking").sum())
    blocks = [fid_table(r), note(
        f"Sorted by FID ({fl.features} features, {fl.n_samples} samples per set). 'FID − best': the paired "
        f"difference to the best configuration with its 95% interval; 'vs best': tie = {TIE_RULE}; {n_rank} "
        "comparisons in that family (the best against every other, and each step count's best against the other "
        "samplers there). The floor row is what a perfect model (i.i.d. draws of the data) is expected to "
        "score at this sample count, estimated from the held-out real images, with its interval; 'FID / floor' = "
        "how many times the floor a configuration scores; KID ± its sd.")]
    blocks.append(figure("fid_vs_steps.png" if "fid_vs_steps.png" in figs else None, "FID vs sampling steps",
                         "FID vs number of sampling steps (log scale) per schedule (colour) and sampler (marker and "
                         "line style), with 95% intervals as error bars; dashed with a grey band: the "
                         "floor and its interval."))
    blocks.append(figure("fidelity_diversity.png" if "fidelity_diversity.png" in figs else None,
                         "Fidelity vs diversity", "FID folds fidelity and diversity into one number; these separate "
                         "them (same features and reference). Left: improved precision (samples inside the real "
                         "data's k-NN balls) against recall (real images inside the samples' balls), Kynkäänniemi "
                         "et al. 2019. Right: density (real balls per sample / k; dashed: 1, a set drawn like the "
                         "reference) against coverage (real balls holding a sample), Naeem et al. 2020. k = 5; "
                         "error bars: 95% intervals from FID's bootstrap."))
    return Section("fid", "FID", [b for b in blocks if b])


def _nll_section(r: Results, figs: Mapping[str, bytes]) -> Section | None:
    """Bits/dim per model with its interval and parts; the schedules' paired per-image differences; the terms."""
    if r.nll is None:
        return None
    t, pairs = r.nll["table"], r.nll["pairs"]
    rows = [[x["schedule"], str(int(x["seed"])), fmt_num(x["bpd"]), fmt_interval(x["bpd_lo"], x["bpd_hi"]),
             fmt_num(x["prior"]), fmt_num(x["decoder"]), fmt_num(x["diffusion"])] for _, x in t.iterrows()]
    est = t.iloc[0]
    blocks = [Block("table", header=["schedule", "seed", "bits/dim", "95% interval", "prior L_T", "decoder L_0",
                                     "diffusion L_1..L_T-1"], rows=rows, classes=[""] * len(rows),
                    align=["l", "r", "r", "r", "r", "r", "r"]),
              note(f"Negative log-likelihood bound (Ho et al. 2020, eq. 5) on the same {int(est['images'])} held-out "
                   f"images, {int(est['levels'])}-level decoder bins; estimator: {est['estimator']}"
                   + (f" ({int(est['n_t'])} geometric strata of t, one draw each; prior and decoder exact)"
                      if est["estimator"] == "stratified" else " (all T terms)")
                   + "; interval: Student-t over images (holds the estimator's noise).")]
    if len(pairs):
        prow = [[p["a"], p["b"], str(int(p["seed"])), f"{fmt_num(p['effect'])} {fmt_interval(p['lo'], p['hi'])}",
                 fmt_num(p["p_holm"]), p["verdict"]] for _, p in pairs.iterrows()]
        blocks += [Block("table", header=["a", "b", "seed", "bpd(a) − bpd(b)", "p (Holm)", "lower"], rows=prow,
                         classes=[""] * len(prow), align=["l", "l", "r", "r", "r", "l"]),
                   note("Paired per-image differences (same images, same t and noise draws), 95% t-intervals, Holm "
                        "over each seed's schedule pairs; 'tie' when not resolved at 5%.")]
    blocks.append(figure("nll_terms.png" if "nll_terms.png" in figs else None, "Bound terms against t",
                         "Mean term L_t of the bound (bits/dim) per stratum of t: the bits are spent at small t "
                         "(compare Nichol & Dhariwal 2021, Fig. 2)."))
    return Section("nll", "Likelihood (bits/dim)", [b for b in blocks if b])


def _samples_section(r: Results, grids: Mapping, grid_images: int, grid_scale: int) -> Section:
    blocks = galleries(r, grids)
    if not blocks:
        return Section("samples", "Samples", [note("No samples.")])
    shown = min(grid_images, max(len(np.asarray(v)) for v in r.samples.values()))
    seed = f" (training seed {r.seeds[0]})" if len(r.seeds) > 1 else ""
    return Section("samples", "Samples", [note(f"The first {shown} samples of each set{seed}, upscaled "
                                               f"{grid_scale}x (nearest neighbour). Rows: samplers; columns: "
                                               f"sampling steps.")] + blocks)


def _training_section(r: Results, figs: Mapping[str, bytes]) -> Section:
    n = max([len(d) for d in r.losses.values()] or [1])
    seeds = "" if len(r.seeds) == 1 else " (one line per training seed)"
    blocks = [
        figure("loss.png" if "loss.png" in figs else None, "Training loss",
               f"Training loss per schedule{seeds}, rolling mean over {F.loss_window(n)} logged steps (log scale "
               "when positive)."),
        figure("loss_quarters.png" if "loss_quarters.png" in figs else None, "Training loss per quarter of t",
               f"Training loss split by the quarter of t the batch elements were drawn from (seed {r.seeds[0]}, same "
               "smoothing): small t is the hardest to denoise exactly, large t the easiest."),
        figure("fid_over_training.png" if "fid_over_training.png" in figs else None, "FID over training",
               "FID of the EMA model over training; dashed: the floor (a perfect model's expected FID) at the curve's "
               "own sample count "
               "(fewer samples than the final FID: both are higher than at the final sample count)."),
    ]
    if "fid_over_training.png" not in figs:
        blocks.append(note("No FID over training was recorded (train.fid_every = 0)."))
    return Section("training", "Training", [b for b in blocks if b])


def _schedules_section(r: Results, figs: Mapping[str, bytes]) -> Section:
    ztxt = (" Rescaled to zero terminal SNR (Lin et al. 2023): alpha_bar at t = T-1 is 0, so its log-SNR (-inf) is "
            "not drawn.") if r.zero_terminal_snr else ""
    blocks = [
        figure("schedules.png" if "schedules.png" in figs else None, "alpha_bar and log-SNR vs t",
               f"Cumulative signal alpha_bar_t and log-SNR per schedule, T = {r.timesteps}.{ztxt}"),
        figure("forward_process.png" if "forward_process.png" in figs else None, "Forward process",
               "Forward process x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps on real images (rows), at "
               f"t = {', '.join(str(t) for t in F.forward_ts(r.timesteps))} (columns), one panel per schedule; eps "
               f"is drawn once (torch.Generator seed {F.FORWARD_SEED})."),
    ]
    blocks = [b for b in blocks if b] or [note("No schedule figures (no registered schedule names).")]
    return Section("schedules", "Noise schedules", blocks)


def build_document(r: Results, figs: Mapping[str, bytes], grids: Mapping, grid_images: int = 64,
                   grid_scale: int = 4) -> Document:
    data = r.params.get("data")
    name = str(data["name"]) if isinstance(data, Mapping) and data.get("name") else ""
    hero = None
    if r.best is not None:
        key = (r.best["schedule"], r.best["label"], int(r.best["steps"]))
        hero = figure(grids[key][0] if key in grids else None, "best configuration samples",
                      f"Samples of the best configuration ({config_name(r.best)}).", pixel=True)
    params = params_table(r.params)
    sections = [_fid_section(r, figs), _questions_section(r), _nll_section(r, figs),
                _samples_section(r, grids, grid_images, grid_scale),
                _training_section(r, figs), _schedules_section(r, figs),
                Section("featurizer", "Featurizer", [featurizer_table(r.featurizer)]),
                Section("params", "Parameters", [params] if params else [note("No parameters.")])]
    return Document("DDPM experiment report" + (f": {name}" if name else ""), summary(r), hero,
                    [x for x in sections if x is not None])


# ------------------------------------------------------------------------------------------------
# Rendering and writing
# ------------------------------------------------------------------------------------------------
def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def render(doc: Document, pngs: Mapping[str, bytes]) -> tuple[str, str]:
    """(Markdown, HTML) of ``doc``; ``pngs``: figure file name -> PNG bytes (the HTML's data URIs)."""
    from jinja2 import Environment, StrictUndefined

    from ddpm.app.report.templates import CSS, HTML, MARKDOWN

    def env(autoescape: bool) -> Environment:
        e = Environment(autoescape=autoescape, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                        keep_trailing_newline=True)
        e.filters["md"] = md_escape
        return e

    uris = {name: _data_uri(png) for name, png in pngs.items()}
    md = env(False).from_string(MARKDOWN).render(doc=doc)
    page = env(True).from_string(HTML).render(doc=doc, uri=uris, css=CSS)
    return re.sub(r"\n{3,}", "\n\n", md).rstrip("\n") + "\n", page


def build_report(out_dir: str | Path, results: Results, *, grid_images: int = 64, grid_scale: int = 4) -> dict:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` under ``out_dir``.

    Returns ``{"markdown": Path, "html": Path, "figures": [Path, ...], "grids": {(schedule, label, steps): Path}}``
    (figures in report order; ``grids``: the sample grid PNG of each sample set)."""
    out_dir = Path(out_dir)
    figs = F.draw_figures(results)
    grids = draw_grids(results, int(grid_images), int(grid_scale))
    pngs = {**figs, **dict(grids.values())}
    for name, png in pngs.items():
        atomic_write_bytes(out_dir / "figures" / name, png)
    doc = build_document(results, figs, grids, int(grid_images), int(grid_scale))
    md, page = render(doc, pngs)
    atomic_write_text(out_dir / "report.md", md)
    atomic_write_text(out_dir / "report.html", page)
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html",
            "figures": [out_dir / "figures" / n for n in pngs],
            "grids": {k: out_dir / "figures" / v[0] for k, v in grids.items()}}


# ------------------------------------------------------------------------------------------------
# Metrics for `dvc exp show`
# ------------------------------------------------------------------------------------------------
def _py(x: Any) -> Any:
    """numpy scalar -> python scalar; NaN/inf -> None (valid JSON for DVC)."""
    x = x.item() if isinstance(x, np.generic) else x
    return None if isinstance(x, float) and not math.isfinite(x) else x


def summary_metrics(r: Results) -> dict[str, Any]:
    """Flat metrics (python scalars; NaN -> None): ``fid_floor`` (+ ``_lo``, ``_hi``), ``n_seeds``; ``best_fid``
    (+ ``_lo``, ``_hi``, ``_ratio`` to the floor), ``best_schedule``, ``best_sampler`` (its label),
    ``best_eta``, ``best_steps``, ``n_tied_with_best``; ``questions`` (main effects of the design) and
    ``questions_resolved`` (family-wise); ``featurizer_val_accuracy`` when given;
    ``final_loss_<schedule>`` (mean over seeds); ``fid_<schedule>_<label>_<steps>`` (mean over seeds);
    ``nll_bpd_<schedule>`` (bits/dim, mean over seeds) when the nll stage ran."""
    fl = r.floor
    out: dict[str, Any] = {"fid_floor": _py(fl.fid), "fid_floor_lo": _py(fl.lo), "fid_floor_hi": _py(fl.hi),
                           "n_seeds": len(r.seeds)}
    b = r.best
    if b is not None:
        out.update(best_fid=_py(float(b["fid"])), best_fid_lo=_py(float(b["fid_lo"])),
                   best_fid_hi=_py(float(b["fid_hi"])),
                   best_fid_ratio=_py(float(b["fid"]) / fl.fid) if fl.fid > 0 else None,
                   best_schedule=str(b["schedule"]), best_sampler=str(b["label"]), best_eta=_py(float(b["eta"])),
                   best_steps=int(b["steps"]), n_tied_with_best=int(r.configs["tie"].sum()))
    q = main_questions(r)
    out.update(questions=len(q), questions_resolved=int((q["verdict"] != "tie").sum()))
    if r.featurizer.get("val_accuracy") is not None:
        out["featurizer_val_accuracy"] = _py(float(r.featurizer["val_accuracy"]))
    for s in r.schedules:
        vals = [v for k, d in r.losses.items() if k[0] == s and (v := final_loss(d)) is not None]
        out[f"final_loss_{slug(s)}"] = _py(float(np.mean(vals))) if vals else None
    for _, c in r.configs.iterrows():
        out[f"fid_{slug(c['schedule'])}_{slug(c['label'])}_{int(c['steps'])}"] = _py(float(c["fid"]))
    if r.nll is not None:  # bits/dim per schedule (mean over seeds), for `dvc exp show` and `dvc metrics diff`
        for s, g in r.nll["table"].groupby("schedule", sort=False):
            out[f"nll_bpd_{slug(s)}"] = _py(float(g["bpd"].mean()))
    return out
