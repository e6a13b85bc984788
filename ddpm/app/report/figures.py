"""The report's figures: a :class:`ddpm.app.results.Results` -> matplotlib figures -> PNG bytes, deterministic (no pyplot state, fixed
font, no ``Software`` tag, the forward-process noise from a fixed ``torch.Generator`` seed).

:func:`draw_figures` returns ``{file name: PNG bytes}`` in report order; :func:`grid_png` renders one sample
grid pixel-exact.
"""
from __future__ import annotations

import io
import math
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from ddpm.data.convert import make_image_grid, model_to_uint8, uint8_to_model
from ddpm.diffusion.process import GaussianProcess
from ddpm.app.results import Floor, Results
from ddpm.diffusion.schedules import get_beta_schedule

FORWARD_SEED = 0  # torch.Generator seed of the forward-process noise
MAX_FORWARD_IMAGES = 8  # rows of the forward-process figure per schedule
MAX_CURVE_POINTS = 2000  # loss curves are smoothed, then thinned to at most this many points
DPI = 100
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

# Matplotlib settings for every figure: fixed font (bundled with matplotlib), no hash salt.
RC = {
    "svg.hashsalt": "ddpm-report", "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"],
    "mathtext.fontset": "dejavusans", "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
    "legend.fontsize": 9, "legend.title_fontsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "figure.dpi": DPI, "savefig.dpi": DPI, "path.simplify": True,
}
QUARTER_COLS = ("loss_q0", "loss_q1", "loss_q2", "loss_q3")
QUARTER_NAMES = ("t in [0, T/4)", "t in [T/4, T/2)", "t in [T/2, 3T/4)", "t in [3T/4, T)")


def fmt_num(x: Any, digits: int = 4) -> str:
    """``digits`` significant digits, integers as integers, NaN as ``n/a``."""
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(xf):
        return "n/a" if math.isnan(xf) else ("inf" if xf > 0 else "-inf")
    return f"{xf:.0f}" if abs(xf) >= 10 ** digits else f"{xf:.{digits}g}"


# ------------------------------------------------------------------------------------------------
# Plumbing
# ------------------------------------------------------------------------------------------------
def grid_png(grid: np.ndarray) -> bytes:
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
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _smooth(x: pd.Series, window: int) -> pd.Series:
    return pd.to_numeric(x, errors="coerce").rolling(window, min_periods=1).mean()


def _thin(n: int) -> np.ndarray:
    if n <= MAX_CURVE_POINTS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, MAX_CURVE_POINTS).round().astype(np.int64))


def loss_window(n: int) -> int:
    """The rolling-mean window of a loss curve of ``n`` logged steps."""
    return max(1, int(round(n / 100)))


def _log_y(ax: Any) -> None:
    """Log-scale y with plain-number tick labels (0.05, 0.1, 0.2, ... rather than 10^-1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_num(v, 3)))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _steps_x(ax: Any) -> None:
    """Training-step x axis: 20k rather than 20000."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    def f(v: float, _: Any) -> str:
        return f"{v / 1e6:g}M" if abs(v) >= 1e6 else f"{v / 1e3:g}k" if abs(v) >= 1e3 else f"{v:g}"

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(f))


def _positive_log(ax: Any, values: Iterable[np.ndarray]) -> None:
    """Log-scale y when every finite value is positive."""
    vals = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values] or [np.zeros(0)])
    vals = vals[np.isfinite(vals)]
    if len(vals) and (vals > 0).all():
        _log_y(ax)


def _finish(ax: Any, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.4)
    if legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


# ------------------------------------------------------------------------------------------------
# FID
# ------------------------------------------------------------------------------------------------
def _floor_band(ax: Any, floor: Floor) -> None:
    ax.axhspan(floor.lo, floor.hi, color="black", alpha=0.12, lw=0)
    ax.axhline(floor.fid, ls="--", color="black", lw=1.2,
               label=f"floor (perfect model) {fmt_num(floor.fid)} [{fmt_num(floor.lo)}, {fmt_num(floor.hi)}]")


def _steps_axis(ax: Any, steps: list[int]) -> None:
    ax.set_xscale("log")
    if steps:
        ax.set_xticks(steps)
        ax.set_xticklabels([str(s) for s in steps])
        ax.minorticks_off()


def fid_vs_steps(configs: pd.DataFrame, floor: Floor, schedules: tuple[str, ...]) -> Any:
    """FID (mean over seeds) against sampling steps with 95% intervals as error bars: colour = schedule,
    marker and line style = sampler (every sampler in fid.csv); the floor with its interval as a band."""
    d = configs[np.isfinite(configs["fid"])]
    if not len(d):
        return None
    fig, axes = _new_figure(7.5, 4.4)
    ax = axes[0, 0]
    labels = list(dict.fromkeys(d["label"]))
    for i, s in enumerate(schedules):
        for j, lab in enumerate(labels):
            g = d[(d["schedule"] == s) & (d["label"] == lab)].sort_values("steps")
            if not len(g):
                continue
            x = g["steps"].to_numpy(np.float64) * 1.04 ** (j - (len(labels) - 1) / 2)  # dodge overlapping bars
            y = g["fid"].to_numpy(np.float64)
            err = np.stack([y - g["fid_lo"].to_numpy(np.float64), g["fid_hi"].to_numpy(np.float64) - y])
            ax.errorbar(x, y, yerr=np.clip(err, 0, None), color=f"C{i}", ls=LINESTYLES[j % len(LINESTYLES)],
                        marker=MARKERS[j % len(MARKERS)], ms=5, lw=1.4, capsize=3, label=f"{s} / {lab}")
    _floor_band(ax, floor)
    _steps_axis(ax, sorted(set(int(s) for s in d["steps"])))
    vals = np.concatenate([d["fid_hi"].to_numpy(np.float64), d["fid_lo"].to_numpy(np.float64), [floor.lo]])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if len(vals) and vals.max() / vals.min() > 20:
        _log_y(ax)
    _finish(ax, "sampling steps (log scale)", "FID (lower is better)", "FID vs sampling steps (95% intervals)")
    return fig


FIDELITY_DIVERSITY = (("recall", "precision", "improved precision and recall"), ("coverage", "density", "density and coverage"))


def fidelity_diversity(rows: pd.DataFrame, schedules: tuple[str, ...], seed: int) -> Any:
    """Fidelity (y: precision, density) against diversity (x: recall, coverage) of every sample set of training
    seed ``seed``, 95% intervals as error bars: colour = schedule, marker = sampler and steps. None when fid.csv
    has no such columns (an older fid stage)."""
    cols = [c for pair in FIDELITY_DIVERSITY for c in pair[:2]]
    if not set(cols) <= set(rows.columns):
        return None
    d = rows[rows["seed"] == seed]
    sets = list(dict.fromkeys(zip(d["label"], d["steps"])))
    fig, axes = _new_figure(10.5, 4.4, 1, 2, layout="constrained")
    for ax, (x, y, title) in zip(axes[0], FIDELITY_DIVERSITY):
        for r in d.itertuples(index=False):
            i, j = schedules.index(r.schedule) if r.schedule in schedules else 0, sets.index((r.label, r.steps))
            xv, yv = getattr(r, x), getattr(r, y)
            xerr = np.clip([[xv - getattr(r, f"{x}_lo")], [getattr(r, f"{x}_hi") - xv]], 0, None)
            yerr = np.clip([[yv - getattr(r, f"{y}_lo")], [getattr(r, f"{y}_hi") - yv]], 0, None)
            ax.errorbar([xv], [yv], xerr=xerr, yerr=yerr, color=f"C{i}", marker=MARKERS[j % len(MARKERS)], ms=5,
                        lw=1.0, capsize=2, ls="none", label=f"{r.schedule} / {r.label}-{r.steps}")
        if y == "density":
            ax.axhline(1.0, ls="--", color="black", lw=1.0)  # density of a set drawn like the reference
        _finish(ax, f"{x} (diversity)", f"{y} (fidelity)", title, legend=False)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", frameon=False)
    fig.suptitle(f"Fidelity vs diversity (k = 5 nearest neighbours, 95% intervals; training seed {seed})")
    return fig


def nll_terms(terms: pd.DataFrame | None, schedules: tuple[str, ...], seed: int) -> Any:
    """The bound's terms L_t (bits/dim, mean over held-out images and each stratum's t) against t, log-log, one line
    per schedule (training seed ``seed``): where the bits are spent (Nichol & Dhariwal 2021, Fig. 2)."""
    if terms is None or not len(terms):
        return None
    fig, axes = _new_figure(7.5, 4.2)
    ax = axes[0, 0]
    for i, s in enumerate(schedules):
        g = terms[(terms["schedule"] == s) & (terms["seed"] == seed)].sort_values("t_lo")
        if len(g):
            mid = np.sqrt(g["t_lo"].to_numpy(np.float64) * g["t_hi"].to_numpy(np.float64))  # stratum centre (log)
            ax.plot(mid, g["term"].to_numpy(np.float64), color=f"C{i}", marker="o", ms=3, lw=1.4, label=s)
    ax.set_xscale("log")
    _positive_log(ax, [terms["term"].to_numpy(np.float64)])
    _finish(ax, "t (log scale)", "L_t, bits/dim", "Terms of the variational bound against t")
    return fig


def fid_over_training(curves: Mapping[tuple[str, int], pd.DataFrame], schedules: tuple[str, ...]) -> Any:
    """FID of the EMA model over training, each curve against the floor at its own sample count."""
    keys = [k for s in schedules for k in curves if k[0] == s and len(curves[k])]
    if not keys:
        return None
    fig, axes = _new_figure(7.5, 4.0)
    ax = axes[0, 0]
    floors = np.unique(np.concatenate([curves[k]["floor"].to_numpy(np.float64) for k in keys]))
    vals = [floors]
    for schedule, seed in keys:
        i = schedules.index(schedule)
        d = curves[(schedule, seed)].sort_values("step", kind="mergesort")
        y = pd.to_numeric(d["fid"], errors="coerce").to_numpy(np.float64)
        first = (schedule, seed) == next(k for k in keys if k[0] == schedule)
        ax.plot(d["step"].to_numpy(), y, marker="o", ms=4, color=f"C{i}", lw=1.5, label=schedule if first else None)
        if len(floors) > 1:
            ax.plot(d["step"].to_numpy(), d["floor"].to_numpy(np.float64), ls="--", lw=1.0, color=f"C{i}")
        vals.append(y)
    if len(floors) == 1:
        ax.axhline(floors[0], ls="--", color="black", lw=1.2, label=f"floor at this sample count ({fmt_num(floors[0])})")
    _positive_log(ax, vals)
    _steps_x(ax)
    _finish(ax, "training step", "FID of the EMA model", "FID over training")
    return fig


# ------------------------------------------------------------------------------------------------
# Training loss
# ------------------------------------------------------------------------------------------------
def losses(curves: Mapping[tuple[str, int], pd.DataFrame], schedules: tuple[str, ...]) -> Any:
    """Training loss per schedule (colour), one line per training seed, rolling mean."""
    keys = [k for s in schedules for k in curves if k[0] == s and len(curves[k])]
    if not keys:
        return None
    fig, axes = _new_figure(7.5, 4.0)
    ax = axes[0, 0]
    plotted = []
    for schedule, seed in keys:
        d = curves[(schedule, seed)].sort_values("step", kind="mergesort")
        y = _smooth(d["loss"], loss_window(len(d))).to_numpy(np.float64)
        idx = _thin(len(d))
        first = (schedule, seed) == next(k for k in keys if k[0] == schedule)
        ax.plot(d["step"].to_numpy()[idx], y[idx], color=f"C{schedules.index(schedule)}", lw=1.5,
                label=schedule if first else None)
        plotted.append(y)
    _positive_log(ax, plotted)
    _steps_x(ax)
    _finish(ax, "training step", "training loss (rolling mean)", "Training loss", legend=False)
    ax.legend(title="schedule", frameon=False)
    return fig


def loss_quarters(curves: Mapping[tuple[str, int], pd.DataFrame], schedules: tuple[str, ...],
                  seed: int) -> Any:
    """Training loss split by the quarter of t, one panel per schedule (training seed ``seed``)."""
    names = [s for s in schedules if (s, seed) in curves and any(c in curves[(s, seed)] for c in QUARTER_COLS)]
    if not names:
        return None
    fig, axes = _new_figure(min(4.2 * len(names), 13.0), 3.8, 1, len(names), sharey=True, layout="constrained")
    plotted = []
    for ax, s in zip(axes[0], names):
        d = curves[(s, seed)].sort_values("step", kind="mergesort")
        idx = _thin(len(d))
        for q, (col, label) in enumerate(zip(QUARTER_COLS, QUARTER_NAMES)):
            if col in d.columns:
                y = _smooth(d[col], loss_window(len(d))).to_numpy(np.float64)
                ax.plot(d["step"].to_numpy()[idx], y[idx], color=f"C{q}", lw=1.3, label=label)
                plotted.append(y)
        _steps_x(ax)
        _finish(ax, "training step", "", s, legend=False)
    _positive_log(axes[0, 0], plotted)
    axes[0, 0].set_ylabel("loss (rolling mean)")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, title="quarter of t")
    fig.suptitle("Training loss per quarter of the diffusion time t")
    return fig


# ------------------------------------------------------------------------------------------------
# Schedules and the forward process
# ------------------------------------------------------------------------------------------------
def alpha_bars(schedules: tuple[str, ...], timesteps: int, zero_terminal_snr: bool) -> dict[str, np.ndarray]:
    out = {}
    for s in schedules:
        try:
            betas = get_beta_schedule(s, int(timesteps), zero_terminal_snr=zero_terminal_snr)
        except ValueError:  # a name that is no registered schedule: leave it out of these figures
            continue
        if bool(((betas > 0) & (betas <= 1)).all()):  # e.g. "linear" at a tiny T has betas > 1
            out[s] = torch.cumprod(1 - betas, dim=0).numpy()
    return out


def schedules_figure(abars: Mapping[str, np.ndarray], schedules: tuple[str, ...]) -> Any:
    if not abars:
        return None
    fig, axes = _new_figure(11.0, 3.8, 1, 2)
    for i, s in enumerate(schedules):
        if s in abars:
            ab = abars[s]
            t = np.arange(len(ab))
            axes[0, 0].plot(t, ab, color=f"C{i}", lw=1.6, label=s)
            with np.errstate(divide="ignore", invalid="ignore"):
                lsnr = np.log(ab) - np.log1p(-ab)
            ok = np.isfinite(lsnr)
            axes[0, 1].plot(t[ok], lsnr[ok], color=f"C{i}", lw=1.6, label=s)
    _finish(axes[0, 0], "t", r"$\bar\alpha_t$", r"$\bar\alpha_t$ (signal kept)", legend=False)
    _finish(axes[0, 1], "t", "log-SNR", r"log-SNR $= \log\,\bar\alpha_t / (1 - \bar\alpha_t)$", legend=False)
    axes[0, 1].axhline(0, color="grey", lw=0.8)
    axes[0, 0].legend(title="schedule", frameon=False)
    return fig


def forward_ts(timesteps: int) -> list[int]:
    T = int(timesteps)
    return sorted(set(min(max(v, 0), T - 1) for v in (0, T // 8, T // 4, T // 2, (3 * T) // 4, T - 1)))


def _forward_grids(real_images: np.ndarray, names: list[str], timesteps: int, zsnr: bool) -> list[np.ndarray]:
    x0 = uint8_to_model(torch.from_numpy(np.ascontiguousarray(real_images[:MAX_FORWARD_IMAGES])))
    n, ts = x0.shape[0], forward_ts(timesteps)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(FORWARD_SEED), dtype=x0.dtype)
    grids = []
    for s in names:
        # pred_v: q_sample does not depend on the objective, and pred_noise refuses zero terminal SNR
        proc = GaussianProcess(get_beta_schedule(s, int(timesteps), zero_terminal_snr=zsnr), objective="pred_v")
        cols = [proc.q_sample(x0, torch.full((n,), t, dtype=torch.long), noise) for t in ts]  # eq. 4 of Ho et al.
        xt = torch.stack(cols, dim=1).reshape(n * len(ts), *x0.shape[1:])  # rows = images, cols = t
        grids.append(make_image_grid(model_to_uint8(xt.clamp(-1, 1)), nrow=len(ts), scale=1, pad=1, pad_value=255))
    return grids


def forward_process(real_images: np.ndarray, abars: Mapping[str, np.ndarray], schedules: tuple[str, ...],
                    timesteps: int, zero_terminal_snr: bool) -> Any:
    names = [s for s in schedules if s in abars]
    if not names or real_images is None or len(real_images) == 0:
        return None
    grids, ts = _forward_grids(real_images, names, timesteps, zero_terminal_snr), forward_ts(timesteps)
    h, w = grids[0].shape[1:]
    panel_w = 3.6 if len(names) > 1 else 5.0
    fig, axes = _new_figure(panel_w * len(names), panel_w * h / w + 0.9, 1, len(names), layout="constrained")
    for ax, s, g in zip(axes[0], names, grids):
        if g.shape[0] == 1:
            ax.imshow(g[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(g.transpose(1, 2, 0), interpolation="nearest")
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
    return fig


# ------------------------------------------------------------------------------------------------
# All figures
# ------------------------------------------------------------------------------------------------
def draw_figures(r: Results) -> dict[str, bytes]:
    """{file name: PNG bytes} in report order; a figure without data is left out. Each figure function returns
    a pyplot-free matplotlib ``Figure`` (or None without data), so tests can inspect what was drawn."""
    import matplotlib
    import seaborn as sns

    # seaborn's style first, then RC on top: its font list starts with Arial, which would make the PNG bytes
    # depend on the fonts a machine has installed; RC pins the font bundled with matplotlib
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"), matplotlib.rc_context(RC):
        abars = alpha_bars(r.schedules, r.timesteps, r.zero_terminal_snr)
        figs = {
            "fid_vs_steps.png": fid_vs_steps(r.configs, r.floor, r.schedules),
            "fidelity_diversity.png": fidelity_diversity(r.rows, r.schedules, r.seeds[0]),
            "nll_terms.png": nll_terms(r.nll["terms"] if r.nll else None, r.schedules, r.seeds[0]),
            "loss.png": losses(r.losses, r.schedules),
            "loss_quarters.png": loss_quarters(r.losses, r.schedules, r.seeds[0]),
            "fid_over_training.png": fid_over_training(r.fid_curves, r.schedules),
            "schedules.png": schedules_figure(abars, r.schedules),
            "forward_process.png": forward_process(r.real_images, abars, r.schedules, r.timesteps,
                                                   r.zero_terminal_snr),
        }
        return {k: _fig_png(v) for k, v in figs.items() if v is not None}
