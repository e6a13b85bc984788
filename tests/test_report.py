"""Tests for ddpm.app.results and ddpm.app.report.build: a pipeline output tree in the contract format (tests/report_fixture.py)
-> load_results -> build_report: files, Markdown content and links, a self-contained HTML page, aggregation over
seeds, intervals, ties, the winner per step count, clear errors for missing columns, flat metrics, byte-for-byte
determinism, and (with /usr/bin/chromium) that every image of the page loads in a browser."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from ci_tools import need

import report_fixture as rf
from ddpm.app.report import figures
from ddpm.app import paths
from ddpm.app.names import sampler_label
from ddpm.app.report.build import build_report, summary_metrics
from ddpm.app.results import TIE_RULE, ResultsError, aggregate, load_results, winners_by_steps
from ddpm.diffusion.samplers import StepRule

SCHEDULES = ("linear", "cosine")
SAMPLERS = (("ddpm", 0.0), ("ddim", 0.0))
STEPS = (5, 20)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return rf.write_tree(tmp_path_factory.mktemp("tree"), schedules=SCHEDULES, samplers=SAMPLERS, steps=STEPS)


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
    """The same results built twice, into two folders."""
    r = load_results(rf.params(), tree)
    a = build_report(tmp_path_factory.mktemp("a") / "reports", r, grid_images=16, grid_scale=3)
    b = build_report(tmp_path_factory.mktemp("b") / "reports", r, grid_images=16, grid_scale=3)
    return r, a, b


def _md_images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md)


def test_files_exist(built):
    _, res, _ = built
    assert res["markdown"].is_file() and res["markdown"].name == "report.md"
    assert res["html"].is_file() and res["html"].name == "report.html"
    fig_dir = res["markdown"].parent / "figures"
    assert res["figures"] and all(Path(p).is_file() and Path(p).parent == fig_dir for p in res["figures"])
    names = {Path(p).name for p in res["figures"]}
    for expected in ("fid_vs_steps.png", "loss.png", "loss_quarters.png", "fid_over_training.png",
                     "schedules.png", "forward_process.png"):
        assert expected in names
    assert len([n for n in names if n.startswith("samples_")]) == len(SCHEDULES) * len(SAMPLERS) * len(STEPS)
    assert not list(fig_dir.parent.rglob(".*.tmp"))  # atomic writes left no temporary files


def test_markdown_fid_table_floor_and_links(built, tree):
    r, res, _ = built
    md = res["markdown"].read_text(encoding="utf-8")
    assert md.startswith("# DDPM experiment report")
    assert ("| # | schedule | sampler | eta | spacing | steps | seeds | FID | 95% interval | FID / floor | KID | "
            "FID − best \\[95%\\] | vs best |") in md
    fl = r.floor
    assert "*perfect model (floor)* |" in md and f"*\\[{fl.lo:.4g}, {fl.hi:.4g}\\]*" in md  # floor + interval
    rows = pd.read_csv(tree / "reports" / "fid.csv")
    best = rows.sort_values("fid").iloc[0]
    label = sampler_label(best.sampler, best.eta)
    assert f"| **1** | **{best.schedule}** | **{label}** |" in md
    assert f"{best.fid / fl.fid:.2f}" in md
    table_rows = [ln for ln in md.splitlines() if re.match(r"\| \**\d+\** \|", ln)]
    assert len(table_rows) == len(rows)  # one seed: one row per fid.csv row
    assert "best configuration" in md and f"FID **{best.fid:.4g}**" in md
    refs = _md_images(md)
    assert len(refs) >= 6 + len(r.samples)
    for ref in refs:
        assert not ref.startswith(("http:", "https:", "/")), ref
        assert (res["markdown"].parent / ref).is_file(), ref
    for section in ("## FID", "## Questions of the design", "## Samples", "## Training", "## Noise schedules",
                    "## Featurizer", "## Parameters"):
        assert section in md
    assert "## Run times" not in md  # timings are no DVC output (outputs are pure functions of their inputs)
    assert "97.5%" in md  # featurizer validation accuracy


def test_single_seed_says_training_noise_is_untested(built):
    r, res, _ = built
    md = res["markdown"].read_text(encoding="utf-8")
    assert "Each configuration was trained with one seed (seed 0): differences between schedules have not been " \
           "tested against training noise." in md
    best = r.configs.iloc[0]  # one seed: the interval is fid.csv's own, and no sd is shown for the FID
    rows = r.rows
    own = rows[(rows["schedule"] == best["schedule"]) & (rows["label"] == best["label"])
               & (rows["steps"] == best["steps"])]
    assert (best["fid_lo"], best["fid_hi"]) == (own["fid_lo"].iloc[0], own["fid_hi"].iloc[0])
    assert f"| **{best['fid']:.4g}** | **\\[{best['fid_lo']:.4g}, {best['fid_hi']:.4g}\\]** |" in md


def test_featurizer_section_shows_the_ruler(built):
    r, res, _ = built
    md = res["markdown"].read_text(encoding="utf-8")
    section = md.split("## Featurizer")[1].split("## Parameters")[0]
    lines = [ln.replace("\\", "") for ln in section.splitlines()]
    f = r.featurizer
    for key in ("features", "ruler", "sha256"):
        assert f"| {key} | {f[key]} |" in lines, key
    assert any(ln.startswith("| seed_stability | {seeds: [0, 1]") for ln in lines)
    assert f["features"] in md.split("## FID")[0]  # the summary names the ruler too


def test_html_self_contained(built):
    r, res, _ = built
    page = res["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    urls = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.I)
    assert urls
    assert not [u for u in urls if re.match(r"\s*(https?:)?//", u, flags=re.I)]
    assert not re.search(r"https?://", page)
    srcs = re.findall(r"""<img[^>]*\bsrc="([^"]*)\"""", page)
    assert len(srcs) == len(re.findall(r"<img\b", page)) >= 6 + len(r.samples)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "perfect model (floor)" in page


def test_determinism(built):
    _, a, b = built
    assert a["markdown"].read_bytes() == b["markdown"].read_bytes()
    assert a["html"].read_bytes() == b["html"].read_bytes()
    assert [Path(p).name for p in a["figures"]] == [Path(p).name for p in b["figures"]]
    for pa, pb in zip(a["figures"], b["figures"]):
        assert Path(pa).read_bytes() == Path(pb).read_bytes(), Path(pa).name


def test_sample_grids_pixels(built, tree, tmp_path):
    r, res, _ = built
    fig_dir = res["markdown"].parent / "figures"
    img = Image.open(fig_dir / "samples_linear_ddpm_5.png")
    assert img.mode == "L"
    # 16 images of 8x8 at scale 3 in a 4x4 grid with 1 px padding: nearest-neighbour upscaling
    assert img.size == (4 * (8 * 3 + 1) + 1, 4 * (8 * 3 + 1) + 1)
    arr = np.asarray(img)
    with np.load(tree / paths.sample_path(schedule="linear", seed=0, name="ddpm", eta=0.0, steps=5)) as f:
        first = f["images"][0, 0]
    assert np.array_equal(arr[1:25, 1:25], first.repeat(3, 0).repeat(3, 1))

    root = rf.write_tree(tmp_path / "rgb", channels=3, curves=False)  # RGB, no FID curve, zero terminal SNR
    out = build_report(tmp_path / "rgb" / "out", load_results(rf.params(zero_terminal_snr=True), root))
    assert Image.open(tmp_path / "rgb" / "out" / "figures" / "samples_cosine_ddim-eta0_20.png").mode == "RGB"
    names = {Path(p).name for p in out["figures"]}
    assert "fid_over_training.png" not in names and "schedules.png" in names
    assert "No FID over training" in out["markdown"].read_text(encoding="utf-8")


def test_summary_metrics(built):
    r, _, _ = built
    m = summary_metrics(r)
    rows = r.rows.sort_values("fid")
    best = rows.iloc[0]
    assert m["fid_floor"] == r.floor.fid and (m["fid_floor_lo"], m["fid_floor_hi"]) == (r.floor.lo, r.floor.hi)
    assert m["best_fid"] == pytest.approx(best.fid)
    assert (m["best_fid_lo"], m["best_fid_hi"]) == (pytest.approx(best.fid_lo), pytest.approx(best.fid_hi))
    assert (m["best_schedule"], m["best_sampler"], m["best_steps"]) == (best.schedule, best.label, best.steps)
    assert m["best_fid_ratio"] == pytest.approx(best.fid / r.floor.fid)
    assert m["featurizer_val_accuracy"] == r.featurizer["val_accuracy"] and m["n_seeds"] == 1
    for (s, _), df in r.losses.items():
        assert m[f"final_loss_{s}"] == pytest.approx(df["loss"].iloc[-40:].mean())  # last 10% of 400 steps
    for row in r.rows.itertuples():
        assert m[f"fid_{row.schedule}_{row.label}_{row.steps}"] == pytest.approx(row.fid)
    # flat, JSON-serialisable python scalars (what `dvc exp show` reads)
    assert all(isinstance(v, (int, float, str)) for v in m.values())
    assert json.loads(json.dumps(m)) == m
    assert isinstance(m["best_steps"], int)


def test_one_sampler_label_across_modules():
    for name, eta in (("ddpm", 0.0), ("ddpm_large", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0)):
        label = sampler_label(name, eta)
        assert StepRule(name, eta).label == label
    assert [sampler_label("ddim", e) for e in (0.0, 0.5)] == ["ddim-eta0", "ddim-eta0.5"]
    df = rf.fid_rows(["cosine"], [("ddim", 0.0), ("ddim", 0.5)], [10], [0])
    df.loc[0, "fid"] = float("nan")
    configs = aggregate(df.assign(label=[sampler_label(n, e) for n, e in zip(df["sampler"], df["eta"])]),
                        rf.comparisons(df))
    assert list(configs["label"]) == ["ddim-eta0.5", "ddim-eta0"]  # NaN sorts last
    assert list(configs["tie"]) == [False, False]


def _build(tmp_path, **kw):
    root = rf.write_tree(tmp_path, **kw)
    r = load_results(rf.params(), root)
    out = build_report(tmp_path / "out", r, grid_images=4, grid_scale=1)
    return r, out["markdown"].read_text(encoding="utf-8"), out


def test_several_seeds_aggregate_as_mean_sd_with_t_interval(tmp_path):
    seeds = (0, 1, 2)
    r, md, _ = _build(tmp_path, seeds=seeds, steps=(5,), schedules=("cosine",))
    assert r.seeds == seeds and len(r.configs) == len(SAMPLERS)
    for _, c in r.configs.iterrows():
        fids = r.rows[(r.rows["label"] == c["label"])]["fid"].to_numpy()
        assert len(fids) == len(seeds)
        half = stats.t.ppf(0.975, len(fids) - 1) * fids.std(ddof=1) / np.sqrt(len(fids))
        assert c["fid"] == pytest.approx(fids.mean()) and c["fid_sd"] == pytest.approx(fids.std(ddof=1))
        assert (c["fid_lo"], c["fid_hi"]) == (pytest.approx(fids.mean() - half), pytest.approx(fids.mean() + half))
        assert f"| {c['fid']:.4g} ± {c['fid_sd']:.2g} |" in md or f"**{c['fid']:.4g} ± {c['fid_sd']:.2g}**" in md
    assert "trained with 3 seeds (0, 1, 2)" in md and "not been tested against training noise" not in md
    assert summary_metrics(r)["n_seeds"] == 3


def test_ties_are_marked_and_named(tmp_path):
    # three configurations: the second's paired difference to the best is not resolved, the third's is
    # (the fixture's comparisons.csv combines the two intervals' half-widths)
    df = rf.fid_rows(["cosine"], [("ddpm", 0.0)], [10, 20, 50], [0], spread=0.0)
    df["fid"] = [3.0, 2.0, 2.2]
    df["fid_lo"], df["fid_hi"] = df["fid"] - 0.15, df["fid"] + 0.15
    r, md, _ = _build(tmp_path, schedules=("cosine",), samplers=(("ddpm", 0.0),), steps=(10, 20, 50), fid=df)
    assert list(r.configs["steps"]) == [20, 50, 10] and list(r.configs["tie"]) == [False, True, False]
    table = {ln.split(" | ")[5].strip("* "): ln for ln in md.splitlines() if re.match(r"\| \**\d+\** \|", ln)}
    assert table["20"].endswith("**best** |") and table["50"].endswith("| tie |") and table["10"].endswith("|  |")
    assert f"Indistinguishable from it ({TIE_RULE}): cosine / ddpm / 50 steps." in md
    df.loc[2, "fid"] = 2.5  # no overlap now
    df["fid_lo"], df["fid_hi"] = df["fid"] - 0.15, df["fid"] + 0.15
    r, md, _ = _build(tmp_path / "b", schedules=("cosine",), samplers=(("ddpm", 0.0),), steps=(10, 20, 50), fid=df)
    assert not r.configs["tie"].any() and f"No other configuration is indistinguishable from it ({TIE_RULE})" in md


def test_every_sampler_drawn_and_winner_per_step_count(tmp_path):
    samplers = (("ddim", 0.0), ("dpmpp_2m", 0.0), ("ddpm", 0.0))  # a sampler this branch does not know
    df = rf.fid_rows(["cosine", "linear"], samplers, [10, 50], [0], spread=0.02)
    fast = df["sampler"] == "dpmpp_2m"
    df.loc[fast & (df["steps"] == 10), ["fid", "fid_lo", "fid_hi"]] = [[1.5, 1.45, 1.55]]  # clear winner at 10
    slow = (df["sampler"] == "ddim") & (df["steps"] == 50)
    df.loc[slow, ["fid", "fid_lo", "fid_hi"]] = [[3.0, 0.0, 6.0]]  # worse, yet its difference ties at 50
    r, md, _ = _build(tmp_path, schedules=("cosine", "linear"), samplers=samplers, steps=(10, 50), fid=df)
    wins = {steps: (w["label"], tied) for steps, w, tied in winners_by_steps(r.configs, r.comparisons)}
    per_label = r.configs.groupby(["steps", "label"])["fid"].min()
    assert wins[10][0] == "dpmpp_2m" and wins[10][0] == per_label[10].idxmin() and wins[10][1] == []
    assert wins[50][0] == per_label[50].idxmin() != "ddim-eta0" and "ddim-eta0" in wins[50][1]
    text = md.replace("\\", "")  # Markdown escapes the underscore of dpmpp_2m
    assert re.search(r"at 10 steps dpmpp_2m \(cosine, FID 1\.5 \[1\.45, 1\.55\]\), ahead of every other sampler", text)
    assert re.search(rf"at 50 steps {wins[50][0]} \([^)]*\), tied with [^;.]*ddim-eta0", text)
    fig = figures.fid_vs_steps(r.configs, r.floor, r.schedules)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for s in r.schedules:
        for name, eta in samplers:
            assert f"{s} / {sampler_label(name, eta)}" in legend
    bars = [c for c in fig.axes[0].containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == len(r.schedules) * len(samplers)
    bar = next(b for b in bars if b.get_label() == "cosine / ddim-eta0")
    seg = bar.lines[2][0].get_segments()  # the error bars span each configuration's interval
    lows = sorted(round(float(min(s[:, 1])), 9) for s in seg)
    first = r.configs[(r.configs["schedule"] == "cosine") & (r.configs["label"] == "ddim-eta0")]
    assert lows == sorted(round(float(x), 9) for x in first["fid_lo"])


def test_fid_over_training_is_drawn_against_its_own_floor(built):
    r, _, _ = built
    fig = figures.fid_over_training(r.fid_curves, r.schedules)
    ys = {round(float(y), 9) for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--" for y in ln.get_ydata()}
    curve_floors = {round(float(v), 9) for d in r.fid_curves.values() for v in d["floor"]}
    assert ys == curve_floors and round(r.floor.fid, 9) not in ys


@pytest.mark.parametrize("drop, file", [("kid", "reports/fid.csv"), ("seed", "reports/fid.csv"),
                                        ("fid_floor_hi", "reports/fid_summary.json"),
                                        ("ruler", "featurizer/metrics.json"),
                                        ("floor", "models/linear/seed0/fid_curve.csv")])
def test_missing_column_or_key_is_a_clear_error(tmp_path, drop, file):
    root = rf.write_tree(tmp_path)
    path = root / file
    if path.suffix == ".csv":
        pd.read_csv(path).drop(columns=[drop]).to_csv(path, index=False)
    else:
        obj = json.loads(path.read_text())
        del obj[drop]
        path.write_text(json.dumps(obj))
    with pytest.raises(ResultsError, match=rf"{re.escape(str(path))}: missing (column|key)\(s\) {drop};"):
        load_results(rf.params(), root)


def test_mixed_rulers_are_refused(tmp_path):
    df = rf.fid_rows(["linear", "cosine"], SAMPLERS, STEPS, [0])
    df.loc[0, "features"] = "classifier-32d-ffffffff"
    root = rf.write_tree(tmp_path, fid=df)
    with pytest.raises(ResultsError, match="several feature spaces"):
        load_results(rf.params(), root)


_PROBE = """<script>
window.addEventListener("load", function () {
  var r = Array.prototype.map.call(document.images, function (im) {
    return {ok: im.complete && im.naturalWidth > 0, w: im.naturalWidth, alt: im.alt};
  });
  var pre = document.createElement("pre");
  pre.id = "img-probe";
  pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script>"""


def test_html_images_load_in_headless_chromium(built, tmp_path):
    _, res, _ = built
    page = res["html"].read_text(encoding="utf-8")
    n_img = len(re.findall(r"<img\b", page))
    probe = tmp_path / "probe.html"  # a test copy with a probe script; the report itself has no script
    probe.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    cmd = [need("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
           "--dump-dom", probe.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    m = re.search(r'<pre id="img-probe">(.*?)</pre>', proc.stdout, flags=re.S)
    assert m, f"no probe output (rc={proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}"
    results = json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert len(results) == n_img > 0
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The offline `dvc plots show` template (reports/plots-template.html, built by make_plots_template.sh)
# --------------------------------------------------------------------------------------------
PLOTS_TEMPLATE = Path(__file__).resolve().parents[1] / "reports" / "plots-template.html"


@pytest.fixture(scope="module")
def plots_page():
    """The template filled by dvc-render as `dvc plots show` does, with one vega-lite plot."""
    if not PLOTS_TEMPLATE.is_file():
        pytest.skip(f"{PLOTS_TEMPLATE} missing (run reports/make_plots_template.sh)")
    from dvc_render.html import HTML
    from dvc_render.vega import VegaRenderer

    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 300, "height": 200,
            "data": {"values": [{"step": i, "loss": 1.0 / (1 + i)} for i in range(20)]},
            "mark": "line", "encoding": {"x": {"field": "step", "type": "quantitative"},
                                         "y": {"field": "loss", "type": "quantitative"}}}
    div = VegaRenderer.DIV.format(id="loss_csv", partial=json.dumps(spec))
    page = HTML(PLOTS_TEMPLATE.read_text(encoding="utf-8")).with_scripts(VegaRenderer.SCRIPTS)
    return page.with_element(div).embed()


def test_plots_template_is_offline(plots_page):
    template = PLOTS_TEMPLATE.read_text(encoding="utf-8")
    assert template.count("{plot_divs}") == 1 and "{scripts}" not in template
    assert 0.3e6 < len(template.encode()) < 5e6
    assert "vegaEmbed('#loss_csv', spec)" in plots_page
    assert not re.search(r"""<script[^>]*\bsrc\s*=""", plots_page, flags=re.I)  # dvc-render's CDN tags dropped
    assert "cdn.jsdelivr" not in plots_page


def test_plots_template_renders_in_headless_chromium(plots_page, tmp_path):
    page = tmp_path / "plots.html"
    page.write_text(plots_page, encoding="utf-8")
    cmd = [need("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
           "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert re.search(r'<canvas width="[1-9]\d*" height="[1-9]\d*"', proc.stdout), (
        f"vega drew no canvas (rc={proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}")


def test_report_stage_on_a_contract_tree(tmp_path, monkeypatch, repo_root):
    """stages/report.py end to end on a fixture tree: report files, metrics.json and the plot CSVs."""
    import yaml

    import stages.report as stage

    root = rf.write_tree(tmp_path, seeds=(0, 1))
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["tracking"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(root)
    stage.main()
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert metrics == summary_metrics(load_results(rf.params(), root)) and metrics["n_seeds"] == 2
    for name in ("report.md", "report.html", "plots/loss.csv", "plots/fid_train.csv", "plots/fid_steps.csv"):
        assert (root / "reports" / name).is_file(), name
    steps = pd.read_csv(root / "reports" / "plots" / "fid_steps.csv")
    assert list(steps.columns) == ["steps", "fid", "fid_lo", "fid_hi", "series"] and len(steps) == 8
    assert set(pd.read_csv(root / "reports" / "plots" / "loss.csv")["series"]) == {
        f"{s} seed{k}" for s in ("linear", "cosine") for k in (0, 1)}


def test_ties_follow_the_paired_comparisons_not_overlap(tmp_path):
    """Marginal intervals that overlap, yet comparisons.csv resolves the paired difference: not a tie; and the
    other way round. The questions of the design get their own section, counted in the summary and metrics."""
    df = rf.fid_rows(["cosine"], [("ddpm", 0.0)], [10, 20, 50], [0], spread=0.0)
    df["fid"] = [3.0, 2.0, 2.2]
    df["fid_lo"], df["fid_hi"] = df["fid"] - 1.0, df["fid"] + 1.0  # every marginal interval overlaps
    root = rf.write_tree(tmp_path, schedules=("cosine",), samplers=(("ddpm", 0.0),), steps=(10, 20, 50), fid=df)
    comp = rf.comparisons(df)
    rank = comp["family"] == "ranking"
    comp.loc[rank, ["lo", "hi"]] = np.c_[comp.loc[rank, "effect"] - 0.1, comp.loc[rank, "effect"] + 0.1]
    better = np.where(comp.loc[rank, "effect"] < 0, comp.loc[rank, "a"], comp.loc[rank, "b"])
    comp.loc[rank, "verdict"] = better + " better"
    comp.to_csv(root / "reports" / "comparisons.csv", index=False)
    r = load_results(rf.params(), root)
    assert list(r.configs["steps"]) == [20, 50, 10] and not r.configs["tie"].any()
    second = r.configs.iloc[1]  # FID(50 steps) - FID(20 steps) = 0.2 with the paired interval [0.1, 0.3]
    assert (second["vs_best"], second["vs_best_lo"], second["vs_best_hi"]) == pytest.approx((0.2, 0.1, 0.3))
    md = build_report(tmp_path / "out", r, grid_images=4, grid_scale=1)["markdown"].read_text(encoding="utf-8")
    assert "| 0.2 \\[0.1, 0.3\\] |  |" in md
    assert f"No other configuration is indistinguishable from it ({TIE_RULE})" in md
    assert "## Questions of the design" in md and "ddpm-10 vs ddpm-20, averaged" in md
    q = comp[(comp["family"] == "questions") & (comp["kind"] != "interaction")]
    resolved = int((q["verdict"] != "tie").sum())
    assert f"{resolved} of {len(q)} main effects resolved" in md and "One training seed (seed 0)" in md
    m = summary_metrics(r)
    assert (m["questions"], m["questions_resolved"]) == (len(q), resolved)
    (root / "reports" / "comparisons.csv").unlink()
    with pytest.raises(ResultsError, match="comparisons.csv not found"):
        load_results(rf.params(), root)
