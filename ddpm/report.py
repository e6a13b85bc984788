"""The experiment report: pipeline outputs (already loaded as python objects) -> Markdown + HTML + PNGs.

:func:`build_report` writes, under ``out_dir``:

* ``report.md``: Markdown that references the PNG figures in ``figures/`` by relative path;
* ``report.html``: one self-contained page (CSS inline, every image a base64 ``data:`` URI, no
  script, no network), to open straight from disk or an artifact store;
* ``figures/*.png``: FID vs sampling steps, training losses (total and per quarter of t), FID over
  training, alpha_bar and log-SNR of each schedule, the forward process on real images, and one
  pixel-exact sample grid per (schedule, sampler, steps).

Every file is written atomically (:mod:`ddpm.io`) and the output is deterministic: the same inputs
give the same bytes (no timestamps; PNGs are saved without the ``Software`` tag; the forward-process
noise comes from a fixed ``torch.Generator`` seed).

:func:`summary_metrics` gives the flat dict for ``dvc exp show`` / ``metrics.json``.

Sampler labels: the FID table has ``sampler`` and ``eta`` columns. A configuration is labelled by its
``sampler`` name, unless that name occurs with several ``eta`` values in the table, in which case
the label is ``"<sampler>:<eta>"`` (e.g. ``ddim:0`` and ``ddim:1``) -- see :func:`sampler_labels`.
Keys of ``samples`` are matched to FID rows by that label, by ``"<sampler>:<eta>"`` or by ``sampler``.
"""
from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .data import make_image_grid, model_to_uint8, uint8_to_model
from .diffusion import GaussianProcess
from .io import atomic_write_bytes, atomic_write_text
from .schedules import get_beta_schedule

__all__ = ["build_report", "summary_metrics", "sampler_labels"]

FORWARD_SEED = 0  # torch.Generator seed of the forward-process noise
MAX_FORWARD_IMAGES = 8  # rows of the forward-process figure per schedule
MAX_CURVE_POINTS = 2000  # loss curves are smoothed, then thinned to at most this many points
DPI = 100

# Matplotlib settings for every figure: fixed font (bundled with matplotlib), no hash salt.
_RC = {
    "svg.hashsalt": "ddpm-report",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "mathtext.fontset": "dejavusans",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.title_fontsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "path.simplify": True,
}

QUARTER_COLS = ("loss_q0", "loss_q1", "loss_q2", "loss_q3")
QUARTER_NAMES = ("t in [0, T/4)", "t in [T/4, T/2)", "t in [T/2, 3T/4)", "t in [3T/4, T)")


# =============================================================================================
# Small helpers
# =============================================================================================
def _slug(text: Any) -> str:
    """A file-name / metric-key safe token: ``ddim:0.5`` -> ``ddim-0p5``."""
    s = str(text).replace(".", "p")
    s = re.sub(r"[^A-Za-z0-9_-]+", "-", s).strip("-")
    return s or "x"


def _fmt_num(x: Any, digits: int = 4) -> str:
    """Numbers for tables: ``digits`` significant digits, integers as integers, NaN as ``n/a``."""
    if x is None:
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(xf):
        return "n/a" if math.isnan(xf) else ("inf" if xf > 0 else "-inf")
    if abs(xf) >= 10 ** digits:
        return f"{xf:.0f}"
    return f"{xf:.{digits}g}"


def _fmt_eta(eta: Any) -> str:
    try:
        return f"{float(eta):g}"
    except (TypeError, ValueError):
        return str(eta)


def _fmt_seconds(s: float) -> str:
    s = float(s)
    if not math.isfinite(s):
        return "n/a"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _fmt_pct(x: Any) -> str:
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f"{100 * xf:.1f}%" if math.isfinite(xf) else "n/a"


def _md(text: str) -> str:
    """Escape Markdown inline syntax (and table pipes) in plain text."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", str(text)).replace("\n", " ")


def _compact(v: Any) -> str:
    """A short, YAML-like rendering of a parameter value."""
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_compact(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_compact(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _py(x: Any) -> Any:
    """numpy scalar -> python scalar; NaN/inf -> None (valid JSON for DVC)."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _unique(seq: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for x in seq:
        if x not in out:
            out.append(x)
    return out


# =============================================================================================
# FID table and summary metrics
# =============================================================================================
def sampler_labels(fid: pd.DataFrame) -> pd.Series:
    """One label per FID row: ``sampler``, or ``"<sampler>:<eta>"`` where the sampler name occurs
    with several eta values in ``fid``."""
    if len(fid) == 0:
        return pd.Series([], dtype=object, index=fid.index)
    names = fid["sampler"].astype(str)
    if "eta" not in fid.columns:
        return names
    etas = fid["eta"].map(_fmt_eta)
    multi = etas.groupby(names).transform("nunique") > 1
    return pd.Series(
        [f"{n}:{e}" if m else n for n, e, m in zip(names, etas, multi)], index=fid.index, dtype=object
    )


def _sorted_fid(fid: pd.DataFrame) -> pd.DataFrame:
    """FID rows sorted by FID (NaN last), ties by schedule/sampler/steps; adds ``label``."""
    df = fid.copy()
    df["label"] = sampler_labels(df)
    df["fid"] = pd.to_numeric(df["fid"], errors="coerce")
    keys = [c for c in ("fid", "schedule", "label", "steps") if c in df.columns]
    return df.sort_values(keys, kind="mergesort", na_position="last").reset_index(drop=True)


def _final_loss(df: pd.DataFrame) -> float | None:
    """Mean ``loss`` over the last 10% of logged steps (at least one row)."""
    if df is None or len(df) == 0 or "loss" not in df.columns:
        return None
    d = df.sort_values("step", kind="mergesort") if "step" in df.columns else df
    n = max(1, int(math.ceil(0.1 * len(d))))
    vals = pd.to_numeric(d["loss"].iloc[-n:], errors="coerce").to_numpy(dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if len(vals) else None


def summary_metrics(
    fid: pd.DataFrame, fid_floor: float, losses: Mapping[str, pd.DataFrame], featurizer: Mapping[str, Any]
) -> dict[str, Any]:
    """Flat metrics for ``dvc exp show`` (python scalars only; NaN -> None).

    Keys: ``fid_floor``; ``best_fid``, ``best_fid_ratio`` (best / floor), ``best_schedule``,
    ``best_sampler`` (the sampler label, see :func:`sampler_labels`), ``best_eta`` (if the table
    has ``eta``), ``best_steps`` (all omitted when no finite FID); ``featurizer_val_accuracy`` (and
    ``featurizer_train_accuracy``) when given; ``final_loss_<schedule>`` (mean loss over the last 10%
    of steps); ``fid_<schedule>_<sampler>_<steps>`` for every FID row.
    """
    out: dict[str, Any] = {"fid_floor": _py(float(fid_floor))}
    df = _sorted_fid(fid) if len(fid) else None
    if df is not None and np.isfinite(df["fid"].iloc[0]):
        best = df.iloc[0]
        out["best_fid"] = _py(float(best["fid"]))
        out["best_fid_ratio"] = _py(float(best["fid"]) / float(fid_floor)) if float(fid_floor) > 0 else None
        out["best_schedule"] = str(best["schedule"])
        out["best_sampler"] = str(best["label"])
        if "eta" in df.columns:
            out["best_eta"] = _py(float(best["eta"]))
        out["best_steps"] = int(best["steps"])
    for key in ("val_accuracy", "train_accuracy"):
        if featurizer.get(key) is not None:
            out[f"featurizer_{key}"] = _py(float(featurizer[key]))
    for schedule, ldf in losses.items():
        out[f"final_loss_{_slug(schedule)}"] = _py(_final_loss(ldf))
    if df is not None:
        for _, row in df.iterrows():
            key = f"fid_{_slug(row['schedule'])}_{_slug(row['label'])}_{int(row['steps'])}"
            out[key] = _py(float(row["fid"]))
    return out


# =============================================================================================
# Images and figures
# =============================================================================================
def _png_from_grid(grid: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 grey, 3 RGB) -> PNG bytes (PIL, no metadata: deterministic)."""
    from PIL import Image

    if grid.shape[0] == 1:
        img = Image.fromarray(np.ascontiguousarray(grid[0]), mode="L")
    else:
        img = Image.fromarray(np.ascontiguousarray(grid.transpose(1, 2, 0)), mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _fig_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.1)
    return buf.getvalue()


def _new_figure(w: float, h: float, nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Any, Any]:
    """A pyplot-free Agg figure (no global state, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout=kw.pop("layout", None))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _show_grid(ax: Any, grid: np.ndarray) -> None:
    if grid.shape[0] == 1:
        ax.imshow(grid[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(grid.transpose(1, 2, 0), interpolation="nearest")


def _smooth(x: pd.Series, window: int) -> pd.Series:
    return pd.to_numeric(x, errors="coerce").rolling(window, min_periods=1).mean()


def _thin(n: int) -> np.ndarray:
    if n <= MAX_CURVE_POINTS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, MAX_CURVE_POINTS).round().astype(np.int64))


def _loss_window(n: int) -> int:
    return max(1, int(round(n / 100)))


def _log_y(ax: Any) -> None:
    """Log-scale y with plain-number tick labels (0.05, 0.1, 0.2, ... rather than 10^-1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt_num(v, 3)))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _steps_x(ax: Any) -> None:
    """Training-step x axis: 20k rather than 20000."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def f(v: float, _: Any) -> str:
        if abs(v) >= 1e6:
            return f"{v / 1e6:g}M"
        if abs(v) >= 1e3:
            return f"{v / 1e3:g}k"
        return f"{v:g}"

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(f))


def _positive_log(ax: Any, values: Iterable[np.ndarray]) -> None:
    """Log-scale y when every finite value is positive."""
    vals = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values] or [np.zeros(0)])
    vals = vals[np.isfinite(vals)]
    if len(vals) and (vals > 0).all():
        _log_y(ax)


def _fig_fid_vs_steps(df: pd.DataFrame, fid_floor: float, schedules: list[str], label_order: list[str]) -> bytes:
    import seaborn as sns

    fig, axes = _new_figure(7.5, 4.2)
    ax = axes[0, 0]
    d = df[np.isfinite(df["fid"])].copy()
    d["steps"] = d["steps"].astype(float)
    d = d.drop(columns=["sampler"]).rename(columns={"label": "sampler"})
    hue_order = [s for s in schedules if s in set(d["schedule"])]
    present = set(d["sampler"])
    style_order = [x for x in label_order if x in present] + sorted(present - set(label_order))
    sns.lineplot(
        data=d, x="steps", y="fid", hue="schedule", hue_order=hue_order, style="sampler",
        style_order=style_order, markers=True, dashes=True, errorbar=None, ax=ax, markersize=7,
    )
    ax.axhline(fid_floor, ls="--", color="black", lw=1.2, label=f"real-vs-real floor ({_fmt_num(fid_floor)})")
    ax.set_xscale("log")
    steps = sorted(set(int(s) for s in d["steps"]))
    if steps:
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps])
        ax.minorticks_off()
    vals = np.concatenate([d["fid"].to_numpy(np.float64), [fid_floor]])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if len(vals) and vals.max() / vals.min() > 20:
        _log_y(ax)
    ax.set_xlabel("sampling steps (log scale)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID vs sampling steps")
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _fig_png(fig)


def _fig_losses(losses: Mapping[str, pd.DataFrame], schedules: list[str]) -> tuple[bytes, int]:
    fig, axes = _new_figure(7.5, 4.0)
    ax = axes[0, 0]
    plotted, windows = [], []
    for i, s in enumerate(schedules):
        d = losses.get(s)
        if d is None or len(d) == 0 or "loss" not in d.columns:
            continue
        d = d.sort_values("step", kind="mergesort")
        w = _loss_window(len(d))
        windows.append(w)
        y = _smooth(d["loss"], w).to_numpy(np.float64)
        idx = _thin(len(d))
        ax.plot(d["step"].to_numpy()[idx], y[idx], color=f"C{i}", lw=1.5, label=s)
        plotted.append(y)
    _positive_log(ax, plotted)
    _steps_x(ax)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (rolling mean)")
    ax.set_title("Training loss")
    ax.grid(True, which="major", alpha=0.4)
    if plotted:
        ax.legend(title="schedule", frameon=False)
    return _fig_png(fig), max(windows or [1])


def _fig_loss_quarters(losses: Mapping[str, pd.DataFrame], schedules: list[str]) -> bytes | None:
    names = [s for s in schedules if s in losses and len(losses[s]) and any(c in losses[s] for c in QUARTER_COLS)]
    if not names:
        return None
    n = len(names)
    fig, axes = _new_figure(min(4.2 * n, 13.0), 3.8, 1, n, sharey=True, layout="constrained")
    plotted = []
    for j, s in enumerate(names):
        ax = axes[0, j]
        d = losses[s].sort_values("step", kind="mergesort")
        w = _loss_window(len(d))
        idx = _thin(len(d))
        for q, (col, label) in enumerate(zip(QUARTER_COLS, QUARTER_NAMES)):
            if col not in d.columns:
                continue
            y = _smooth(d[col], w).to_numpy(np.float64)
            ax.plot(d["step"].to_numpy()[idx], y[idx], color=f"C{q}", lw=1.3, label=label)
            plotted.append(y)
        ax.set_title(s)
        _steps_x(ax)
        ax.set_xlabel("training step")
        ax.grid(True, which="major", alpha=0.4)
    _positive_log(axes[0, 0], plotted)
    axes[0, 0].set_ylabel("loss (rolling mean)")
    axes[0, n - 1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="quarter of t")
    fig.suptitle("Training loss per quarter of the diffusion time t")
    return _fig_png(fig)


def _fig_fid_curves(fid_curves: Mapping[str, pd.DataFrame], schedules: list[str], fid_floor: float) -> bytes | None:
    names = [s for s in schedules if s in fid_curves and fid_curves[s] is not None and len(fid_curves[s])]
    if not names:
        return None
    fig, axes = _new_figure(7.5, 4.0)
    ax = axes[0, 0]
    vals = [np.array([fid_floor])]
    for i, s in enumerate(schedules):
        if s not in names:
            continue
        d = fid_curves[s].sort_values("step", kind="mergesort")
        y = pd.to_numeric(d["fid"], errors="coerce").to_numpy(np.float64)
        ax.plot(d["step"].to_numpy(), y, marker="o", ms=4, color=f"C{i}", lw=1.5, label=s)
        vals.append(y)
    ax.axhline(fid_floor, ls="--", color="black", lw=1.2, label=f"real-vs-real floor ({_fmt_num(fid_floor)})")
    _positive_log(ax, vals)
    _steps_x(ax)
    ax.set_xlabel("training step")
    ax.set_ylabel("FID of the EMA model")
    ax.set_title("FID over training")
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _fig_png(fig)


def _alpha_bars(schedules: list[str], timesteps: int, zero_terminal_snr: bool) -> dict[str, np.ndarray]:
    out = {}
    for s in schedules:
        try:
            betas = get_beta_schedule(s, int(timesteps), zero_terminal_snr=zero_terminal_snr)
        except ValueError:  # a label that is no registered schedule: leave it out of these figures
            continue
        if not bool(((betas > 0) & (betas <= 1)).all()):  # e.g. "linear" at a tiny T: betas > 1
            continue
        out[s] = torch.cumprod(1 - betas, dim=0).numpy()
    return out


def _fig_schedules(alpha_bars: Mapping[str, np.ndarray], schedules: list[str]) -> bytes | None:
    if not alpha_bars:
        return None
    fig, axes = _new_figure(11.0, 3.8, 1, 2)
    for i, s in enumerate(schedules):
        if s not in alpha_bars:
            continue
        ab = alpha_bars[s]
        t = np.arange(len(ab))
        axes[0, 0].plot(t, ab, color=f"C{i}", lw=1.6, label=s)
        with np.errstate(divide="ignore", invalid="ignore"):
            lsnr = np.log(ab) - np.log1p(-ab)
        ok = np.isfinite(lsnr)
        axes[0, 1].plot(t[ok], lsnr[ok], color=f"C{i}", lw=1.6, label=s)
    axes[0, 0].set_title(r"$\bar\alpha_t$ (signal kept)")
    axes[0, 0].set_ylabel(r"$\bar\alpha_t$")
    axes[0, 1].set_title(r"log-SNR $= \log\,\bar\alpha_t / (1 - \bar\alpha_t)$")
    axes[0, 1].set_ylabel("log-SNR")
    for ax in axes[0]:
        ax.set_xlabel("t")
        ax.grid(True, alpha=0.4)
    axes[0, 1].axhline(0, color="grey", lw=0.8)
    axes[0, 0].legend(title="schedule", frameon=False)
    return _fig_png(fig)


def _forward_ts(timesteps: int) -> list[int]:
    T = int(timesteps)
    return sorted(set(min(max(v, 0), T - 1) for v in (0, T // 8, T // 4, T // 2, (3 * T) // 4, T - 1)))


def _fig_forward(real_images: np.ndarray, alpha_bars: Mapping[str, np.ndarray], schedules: list[str],
                 timesteps: int, zero_terminal_snr: bool) -> bytes | None:
    names = [s for s in schedules if s in alpha_bars]
    if not names or real_images is None or len(real_images) == 0:
        return None
    x0 = uint8_to_model(torch.from_numpy(np.ascontiguousarray(real_images[:MAX_FORWARD_IMAGES])))
    n = x0.shape[0]
    ts = _forward_ts(timesteps)
    gen = torch.Generator().manual_seed(FORWARD_SEED)
    noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)  # the same eps for every t and schedule
    grids = []
    for s in names:
        # pred_v: q_sample does not depend on the objective, and pred_noise refuses zero terminal SNR
        proc = GaussianProcess(get_beta_schedule(s, int(timesteps), zero_terminal_snr=zero_terminal_snr),
                               objective="pred_v")
        cols = [proc.q_sample(x0, torch.full((n,), t, dtype=torch.long), noise) for t in ts]
        xt = torch.stack(cols, dim=1).reshape(n * len(ts), *x0.shape[1:])  # rows = images, cols = t
        grids.append(make_image_grid(model_to_uint8(xt.clamp(-1, 1)), nrow=len(ts), scale=1, pad=1, pad_value=255))
    h, w = grids[0].shape[1:]
    k = len(names)
    panel_w = 3.6 if k > 1 else 5.0
    fig, axes = _new_figure(panel_w * k, panel_w * h / w + 0.9, 1, k, layout="constrained")
    for ax, s, g in zip(axes[0], names, grids):
        _show_grid(ax, g)
        ax.grid(False)
        cw = (g.shape[2] - 1) / len(ts)
        ax.set_xticks([cw * (c + 0.5) for c in range(len(ts))])
        ax.set_xticklabels([str(t) for t in ts], fontsize=8)
        ax.set_yticks([])
        ax.set_title(s)
        ax.set_xlabel("t")
        ax.tick_params(length=0)
        for sp in ax.spines.values():
            sp.set_visible(False)
    fig.suptitle(r"Forward process $q(x_t \mid x_0)$, same noise for every t and schedule")
    return _fig_png(fig)


# =============================================================================================
# Tables (Markdown and HTML from the same cells)
# =============================================================================================
class _Table:
    def __init__(self, header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] | None = None,
                 align: Sequence[str] | None = None) -> None:
        self.header = [str(h) for h in header]
        self.rows = [[str(c) for c in r] for r in rows]
        self.classes = list(classes) if classes is not None else [""] * len(self.rows)
        self.align = list(align) if align is not None else ["l"] * len(self.header)

    def markdown(self) -> str:
        def cell(c: str) -> str:
            return _md(c)

        sep = {"l": ":---", "r": "---:", "c": ":---:"}
        lines = ["| " + " | ".join(cell(h) for h in self.header) + " |",
                 "| " + " | ".join(sep[a] for a in self.align) + " |"]
        for r, cls in zip(self.rows, self.classes):
            cells = [cell(c) for c in r]
            if cls == "floor":
                cells = [f"*{c}*" if c else c for c in cells]
            elif cls == "best":
                cells = [f"**{c}**" if c else c for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def html(self, css_class: str = "") -> str:
        al = {"l": "", "r": ' class="num"', "c": ' class="c"'}
        out = [f'<table class="{css_class}">' if css_class else "<table>", "<thead><tr>"]
        out += [f"<th{al[a]}>{html.escape(h)}</th>" for h, a in zip(self.header, self.align)]
        out.append("</tr></thead><tbody>")
        for r, cls in zip(self.rows, self.classes):
            out.append(f'<tr class="{cls}">' if cls else "<tr>")
            out += [f"<td{al[a]}>{html.escape(c)}</td>" for c, a in zip(r, self.align)]
            out.append("</tr>")
        out.append("</tbody></table>")
        return "".join(out)


def _fid_table(df: pd.DataFrame, fid_floor: float, n_samples: int, features: str) -> _Table:
    has_eta = "eta" in df.columns
    header = ["#", "schedule", "sampler"] + (["eta"] if has_eta else []) + ["steps", "FID", "FID / floor", "samples"]
    rows, classes = [], []
    floor_row = ["", "real vs real (floor)", ""] + ([""] if has_eta else []) + [
        "", _fmt_num(fid_floor), "1.00", str(int(n_samples))]
    rows.append(floor_row)
    classes.append("floor")
    for i, r in df.iterrows():
        ratio = float(r["fid"]) / fid_floor if fid_floor > 0 and np.isfinite(r["fid"]) else float("nan")
        ns = r["n_samples"] if "n_samples" in df.columns else n_samples
        row = [str(i + 1), str(r["schedule"]), str(r["label"])] + ([_fmt_eta(r["eta"])] if has_eta else []) + [
            str(int(r["steps"])), _fmt_num(r["fid"]), f"{ratio:.2f}" if np.isfinite(ratio) else "n/a", _fmt_num(ns)]
        rows.append(row)
        classes.append("best" if i == 0 and np.isfinite(r["fid"]) else "")
    align = ["r", "l", "l"] + (["r"] if has_eta else []) + ["r", "r", "r", "r"]
    return _Table(header, rows, classes, align)


def _timings_table(timings: pd.DataFrame) -> _Table | None:
    if timings is None or len(timings) == 0:
        return None
    rows = []
    for _, r in timings.iterrows():
        rows.append([str(r.get("stage", "")), str(r.get("item", "")), _fmt_seconds(r["seconds"])])
    total = pd.to_numeric(timings["seconds"], errors="coerce").sum()
    rows.append(["total", "", _fmt_seconds(total)])
    return _Table(["stage", "item", "run time"], rows, [""] * (len(rows) - 1) + ["total"], ["l", "l", "r"])


def _params_table(params: Mapping[str, Any]) -> _Table | None:
    if not params:
        return None
    top = {k: v for k, v in params.items() if not isinstance(v, Mapping)}
    rows = []
    if top:
        rows.append(["(top level)", ", ".join(f"{k}={_compact(v)}" for k, v in top.items())])
    for k, v in params.items():
        if isinstance(v, Mapping):
            rows.append([str(k), ", ".join(f"{kk}={_compact(vv)}" for kk, vv in v.items())])
    return _Table(["section", "settings"], rows)


def _featurizer_table(featurizer: Mapping[str, Any]) -> _Table | None:
    if not featurizer:
        return None
    rows = []
    for k, v in featurizer.items():
        rows.append([str(k), _fmt_pct(v) if "accuracy" in str(k) and v is not None else _compact(v)
                     if isinstance(v, (Mapping, list, tuple, type(None), bool)) else _fmt_num(v)])
    return _Table(["featurizer", "value"], rows, align=["l", "r"])


# =============================================================================================
# Report assembly
# =============================================================================================
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;color:#1f2328;
 background:#fff;margin:0;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.9em;margin:.2em 0 .4em;border-bottom:2px solid #d0d7de;padding-bottom:.25em}
h2{font-size:1.35em;margin:1.8em 0 .5em;border-bottom:1px solid #d0d7de;padding-bottom:.2em}
h3{font-size:1.1em;margin:1.2em 0 .4em}
p.summary{font-size:1.05em;background:#f6f8fa;border-left:4px solid #0969da;padding:10px 14px}
nav{font-size:.92em;margin:.6em 0 1em}
nav a{margin-right:14px;color:#0969da;text-decoration:none}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.c,th.c{text-align:center}
tr.floor td{background:#fff8c5;font-style:italic}
tr.best td{background:#dafbe1;font-weight:600}
tr.total td{font-weight:600;background:#f6f8fa}
figure{margin:.6em 0 1.4em}
figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:.88em;color:#57606a;margin-top:.3em}
img.px{image-rendering:pixelated;image-rendering:crisp-edges}
table.gallery{table-layout:fixed;width:100%}
table.gallery td{text-align:center;padding:6px}
table.gallery img{max-width:100%;height:auto}
table.gallery .cap{font-size:.85em;color:#57606a}
table.params td:first-child{white-space:nowrap;font-weight:600}
table.params td{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.88em}
.note{color:#57606a;font-size:.9em}
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def build_report(
    out_dir: str | Path,
    *,
    fid: pd.DataFrame,
    fid_floor: float,
    n_samples: int,
    features: str,
    losses: Mapping[str, pd.DataFrame],
    fid_curves: Mapping[str, pd.DataFrame],
    timesteps: int,
    zero_terminal_snr: bool,
    samples: Mapping[tuple[str, str, int], np.ndarray],
    real_images: np.ndarray,
    featurizer: Mapping[str, Any],
    timings: pd.DataFrame,
    params: Mapping[str, Any],
    grid_images: int = 64,
    grid_scale: int = 4,
) -> dict[str, Any]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` under ``out_dir``.

    Returns ``{"markdown": Path, "html": Path, "figures": [Path, ...], "grids": {(schedule, label, steps):
    Path}}`` (figures in report order; ``grids``: the sample grid PNG of each key of ``samples``).
    See the module docstring for what the page shows.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fid_floor = float(fid_floor)
    fid = fid if fid is not None else pd.DataFrame(columns=["schedule", "sampler", "eta", "steps", "fid"])
    df = _sorted_fid(fid) if len(fid) else fid.assign(label=pd.Series(dtype=object))
    schedules = _unique([str(s) for s in fid["schedule"]] if len(fid) else [])
    label_order = _unique([str(k[1]) for k in samples] + (list(sampler_labels(fid)) if len(fid) else []))
    schedules = _unique(schedules + [str(s) for s in losses] + [str(k[0]) for k in samples]
                        + [str(s) for s in (fid_curves or {})])

    figures: list[Path] = []
    pngs: dict[str, bytes] = {}  # file name -> bytes (for the HTML data URIs)

    def emit(name: str, data: bytes | None) -> str | None:
        if data is None:
            return None
        atomic_write_bytes(fig_dir / name, data)
        figures.append(fig_dir / name)
        pngs[name] = data
        return name

    import matplotlib
    import seaborn as sns

    # seaborn's style first, then _RC on top: its font list starts with Arial, which would make the PNG bytes
    # depend on the fonts a machine has installed; _RC pins the font bundled with matplotlib
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"), matplotlib.rc_context(_RC):
        f_fid = emit("fid_vs_steps.png", _fig_fid_vs_steps(df, fid_floor, schedules, label_order) if len(df) else None)
        loss_png, loss_window = _fig_losses(losses, schedules) if losses else (None, 1)
        f_loss = emit("loss.png", loss_png)
        f_lossq = emit("loss_quarters.png", _fig_loss_quarters(losses, schedules) if losses else None)
        f_fidc = emit("fid_over_training.png", _fig_fid_curves(fid_curves or {}, schedules, fid_floor))
        abars = _alpha_bars(schedules, timesteps, zero_terminal_snr)
        f_sched = emit("schedules.png", _fig_schedules(abars, schedules))
        f_fwd = emit("forward_process.png", _fig_forward(real_images, abars, schedules, timesteps, zero_terminal_snr))

    # --- sample grids: one pixel-exact PNG per (schedule, sampler, steps) --------------------------
    fid_lookup: dict[tuple[str, str, int], float] = {}
    for _, r in df.iterrows():
        aliases = [str(r["label"]), str(r["sampler"])]
        if "eta" in df.columns:
            aliases.append(f"{r['sampler']}:{_fmt_eta(r['eta'])}")
        for a in aliases:
            fid_lookup.setdefault((str(r["schedule"]), a, int(r["steps"])), float(r["fid"]))
    gallery: dict[str, dict[tuple[str, int], str]] = {}
    grids: dict[tuple[str, str, int], Path] = {}
    for (sched, label, steps) in samples:
        imgs = np.asarray(samples[(sched, label, steps)])
        if imgs.ndim != 4 or len(imgs) == 0:
            continue
        imgs = imgs[: max(1, int(grid_images))]
        grid = make_image_grid(imgs, nrow=None, scale=int(grid_scale), pad=1, pad_value=0)
        name = f"samples_{_slug(sched)}_{_slug(label)}_{int(steps)}.png"
        emit(name, _png_from_grid(grid))
        gallery.setdefault(str(sched), {})[(str(label), int(steps))] = name
        grids[(sched, label, steps)] = fig_dir / name

    # --- text -------------------------------------------------------------------------------------
    data_name = ""
    if isinstance(params.get("data"), Mapping) and params["data"].get("name"):
        data_name = str(params["data"]["name"])
    title = "DDPM experiment report" + (f": {data_name}" if data_name else "")
    finite = df[np.isfinite(pd.to_numeric(df["fid"], errors="coerce"))] if len(df) else df
    best = finite.iloc[0] if len(finite) else None
    best_img, best_desc = None, ""
    summary_parts: list[tuple[str, str]] = []  # (markdown, html) sentence pairs

    def sent(md: str, ht: str | None = None) -> None:
        summary_parts.append((md, ht) if ht is not None else (_md(md), html.escape(md)))

    n_sched = len(schedules)
    n_cfg = len(df)
    sent(f"{n_cfg} sampling configurations ({n_sched} noise schedule{'s' if n_sched != 1 else ''}, "
         f"T = {int(timesteps)}{', zero terminal SNR' if zero_terminal_snr else ''}) were scored by FID "
         f"on {int(n_samples)} samples in the {features} feature space.")
    if best is not None:
        show_eta = "eta" in df.columns and str(best["sampler"]) == "ddim" and ":" not in str(best["label"])
        eta_txt = f", eta = {_fmt_eta(best['eta'])}" if show_eta else ""
        ratio = float(best["fid"]) / fid_floor if fid_floor > 0 else float("nan")
        b = (f"schedule {best['schedule']}, sampler {best['label']}{eta_txt}, {int(best['steps'])} steps")
        best_desc = f"{best['schedule']} / {best['label']} / {int(best['steps'])} steps"
        rtxt = f"{ratio:.2f}x" if math.isfinite(ratio) else "n/a"
        md = (f"The best configuration is **{_md(b)}** with FID **{_fmt_num(best['fid'])}**, {rtxt} the "
              f"real-vs-real floor of {_fmt_num(fid_floor)} (the FID between two sets of {int(n_samples)} "
              f"real images: what a perfect model would score at this sample count).")
        ht = (f"The best configuration is <b>{html.escape(b)}</b> with FID "
              f"<b>{html.escape(_fmt_num(best['fid']))}</b>, "
              f"{rtxt} the real-vs-real floor of {html.escape(_fmt_num(fid_floor))} (the FID between two sets of "
              f"{int(n_samples)} real images: what a perfect model would score at this sample count).")
        sent(md, ht)
        worst = finite.iloc[-1]
        if len(finite) > 1:
            sent(f"The worst is {worst['schedule']} / {worst['label']} / {int(worst['steps'])} steps "
                 f"with FID {_fmt_num(worst['fid'])}.")
        best_img = gallery.get(str(best["schedule"]), {}).get((str(best["label"]), int(best["steps"])))
        if best_img is None:
            alt = f"{best['sampler']}:{_fmt_eta(best['eta'])}" if "eta" in df.columns else str(best["sampler"])
            for lab in (str(best["sampler"]), alt):
                best_img = best_img or gallery.get(str(best["schedule"]), {}).get((lab, int(best["steps"])))
    else:
        sent(f"No finite FID was recorded; the real-vs-real floor is {_fmt_num(fid_floor)}.")
    if featurizer.get("val_accuracy") is not None:
        sent(f"The {featurizer.get('kind', '')} featurizer reaches {_fmt_pct(featurizer['val_accuracy'])} "
             f"validation accuracy.".replace("The  ", "The "))
    final = {s: _final_loss(losses[s]) for s in schedules if s in losses}
    final = {s: v for s, v in final.items() if v is not None}
    if final:
        sent("Final training loss (mean of the last 10% of steps): "
             + ", ".join(f"{s} {_fmt_num(v)}" for s, v in final.items()) + ".")

    sections: list[tuple[str, str, list[tuple[str, str]]]] = []  # (anchor, title, [(md, html) blocks])

    def fig_block(name: str | None, alt: str, caption: str, pixel: bool = False) -> tuple[str, str]:
        if name is None:
            return "", ""
        md = f"![{_md(alt)}](figures/{name})\n\n*{_md(caption)}*\n"
        cls = ' class="px"' if pixel else ""
        ht = (f'<figure><img{cls} src="{_data_uri(pngs[name])}" alt="{html.escape(alt)}">'
              f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return md, ht

    def note(text: str) -> tuple[str, str]:
        return f"*{_md(text)}*\n", f'<p class="note">{html.escape(text)}</p>'

    # FID
    blocks = []
    if len(df):
        t = _fid_table(df, fid_floor, n_samples, features)
        blocks.append((t.markdown(), t.html("fid")))
        blocks.append(note(f"Sorted by FID ({features} features, {int(n_samples)} samples per set). "
                           f"The floor row is the FID between two disjoint sets of real images of the same size; "
                           f"'FID / floor' = how many times the floor a configuration scores."))
    else:
        blocks.append(note("No FID results."))
    blocks.append(fig_block(f_fid, "FID vs sampling steps",
                            "FID vs number of sampling steps (log scale) per schedule (colour) and "
                                   "sampler (line style); dashed: the real-vs-real floor."))
    sections.append(("fid", "FID", blocks))

    # Samples
    blocks = []
    if gallery:
        shown = min(int(grid_images), max(len(np.asarray(v)) for v in samples.values()))
        blocks.append(note(f"The first {shown} samples of each set, upscaled {int(grid_scale)}x "
                           f"(nearest neighbour). Rows: samplers; columns: sampling steps."))
    for sched in [s for s in schedules if s in gallery] + [s for s in gallery if s not in schedules]:
        cells = gallery[sched]
        labels = _unique(k[0] for k in cells)  # the order of ``samples`` (the configured order)
        steps_list = sorted(_unique(k[1] for k in cells))
        md_lines = [f"### {_md(sched)}\n", "| sampler | " + " | ".join(f"{s} steps" for s in steps_list) + " |",
                    "| :--- |" + " :---: |" * len(steps_list)]
        ht = [f"<h3>{html.escape(sched)}</h3><table class=\"gallery\"><colgroup><col style=\"width:9em\">"
              + "<col>" * len(steps_list) + "</colgroup><thead><tr><th>sampler</th>"
              + "".join(f"<th class=\"c\">{s} steps</th>" for s in steps_list) + "</tr></thead><tbody>"]
        for lab in labels:
            md_row, ht_row = [_md(lab)], [f"<tr><th>{html.escape(lab)}</th>"]
            for st in steps_list:
                name = cells.get((lab, st))
                if name is None:
                    md_row.append("")
                    ht_row.append("<td></td>")
                    continue
                f = fid_lookup.get((sched, lab, st))
                cap = f"FID {_fmt_num(f)}" if f is not None else ""
                alt = f"{sched} / {lab} / {st} steps"
                md_row.append(f"![{_md(alt)}](figures/{name})" + (f"<br>{cap}" if cap else ""))
                ht_row.append(f'<td><img class="px" src="{_data_uri(pngs[name])}" alt="{html.escape(alt)}">'
                              f'<div class="cap">{html.escape(cap)}</div></td>')
            md_lines.append("| " + " | ".join(md_row) + " |")
            ht.append("".join(ht_row) + "</tr>")
        ht.append("</tbody></table>")
        blocks.append(("\n".join(md_lines) + "\n", "".join(ht)))
    if not gallery:
        blocks.append(note("No samples."))
    sections.append(("samples", "Samples", blocks))

    # Training
    blocks = [
        fig_block(f_loss, "Training loss", f"Training loss per schedule, rolling mean over {loss_window} logged steps "
                          f"(log scale when positive)."),
        fig_block(f_lossq, "Training loss per quarter of t",
                  "Training loss split by the quarter of t the batch elements were drawn from (same smoothing): "
                  "small t is the hardest to denoise exactly, large t the easiest."),
    ]
    if f_fidc:
        blocks.append(fig_block(f_fidc, "FID over training",
                                "FID of the EMA model over training (few samples: noisier and higher "
                                        "than the final FID); dashed: the real-vs-real floor at the final "
                                        "sample count."))
    else:
        blocks.append(note("No FID over training was recorded (train.fid_every = 0)."))
    if not losses:
        blocks.insert(0, note("No training losses."))
    sections.append(("training", "Training", [b for b in blocks if b[0] or b[1]]))

    # Schedules
    ztxt = (" Rescaled to zero terminal SNR (Lin et al. 2023): alpha_bar at t = T-1 is 0, so its log-SNR "
            "(-inf) is not drawn.") if zero_terminal_snr else ""
    blocks = [
        fig_block(f_sched, "alpha_bar and log-SNR vs t",
                  f"Cumulative signal alpha_bar_t and log-SNR per schedule, T = {int(timesteps)}.{ztxt}"),
        fig_block(f_fwd, "Forward process",
                  f"Forward process x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps on real images (rows), "
                  f"at t = {', '.join(str(t) for t in _forward_ts(timesteps))} (columns), one panel per schedule; "
                  f"eps is drawn once (torch.Generator seed {FORWARD_SEED})."),
    ]
    blocks = [b for b in blocks if b[0] or b[1]] or [note("No schedule figures (no registered schedule names).")]
    sections.append(("schedules", "Noise schedules", blocks))

    # Featurizer, timings, params
    t = _featurizer_table(featurizer)
    sections.append(("featurizer", "Featurizer", [(t.markdown(), t.html()) if t else note("No featurizer info.")]))
    t = _timings_table(timings)
    sections.append(("timings", "Run times", [(t.markdown(), t.html()) if t else note("No run times.")]))
    t = _params_table(params)
    sections.append(("params", "Parameters", [(t.markdown(), t.html("params")) if t else note("No parameters.")]))

    # --- Markdown ---------------------------------------------------------------------------------
    md = [f"# {title}\n", " ".join(m for m, _ in summary_parts) + "\n"]
    if best_img:
        md.append(f"![best configuration samples](figures/{best_img})\n\n*Samples of the best configuration "
                  f"({_md(best_desc)}).*\n")
    for anchor, sec_title, blks in sections:
        md.append(f"## {sec_title}\n")
        md.extend(b[0] for b in blks if b[0])
    md_text = "\n".join(md).rstrip("\n") + "\n"

    # --- HTML -------------------------------------------------------------------------------------
    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
         f"<h1>{html.escape(title)}</h1>",
         '<p class="summary">' + " ".join(x for _, x in summary_parts) + "</p>"]
    if best_img:
        h.append(f'<figure><img class="px" src="{_data_uri(pngs[best_img])}" alt="best configuration samples">'
                 f"<figcaption>Samples of the best configuration ({html.escape(best_desc)}).</figcaption></figure>")
    h.append("<nav>" + "".join(f'<a href="#{a}">{html.escape(ti)}</a>' for a, ti, _ in sections) + "</nav>")
    for anchor, sec_title, blks in sections:
        h.append(f'<section id="{anchor}"><h2>{html.escape(sec_title)}</h2>')
        h.extend(b[1] for b in blks if b[1])
        h.append("</section>")
    h.append('<p class="note">Generated by ddpm.report.</p></main></body></html>')
    html_text = "\n".join(h) + "\n"

    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, md_text)
    atomic_write_text(html_path, html_text)
    return {"markdown": md_path, "html": html_path, "figures": figures, "grids": grids}

