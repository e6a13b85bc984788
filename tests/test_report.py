"""Tests for ddpm.report: files, Markdown content and links, a self-contained HTML page, flat metrics,
byte-for-byte determinism, and (with /usr/bin/chromium) that every image of the page loads in a browser."""
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

from ci_tools import need

from ddpm.data import load_dataset
from ddpm.report import build_report, sampler_labels, summary_metrics

SCHEDULES = ("linear", "cosine")
SAMPLERS = (("ddpm", 0.0), ("ddim", 0.0))
STEPS = (5, 20)
FLOOR = 1.2345


def synthetic_inputs(channels: int = 1, timesteps: int = 50) -> dict:
    rng = np.random.default_rng(0)
    digits = load_dataset("digits").images[:200]  # uint8 [N, 1, 8, 8]
    if channels == 3:
        digits = np.concatenate([digits, digits[:, :, ::-1], 255 - digits], axis=1)
    rows = []
    for i, s in enumerate(SCHEDULES):
        for j, (name, eta) in enumerate(SAMPLERS):
            for st in STEPS:
                rows.append(dict(schedule=s, sampler=name, eta=eta, steps=st, fid=2.0 + 10.0 / st + i + 0.5 * j,
                                 n_samples=100, features="classifier"))
    n = 400
    losses = {
        s: pd.DataFrame({
            "step": np.arange(n),
            "loss": 0.1 + np.exp(-np.arange(n) / 80) * (1 + i) + rng.uniform(0, 0.02, n),
            **{f"loss_q{q}": (0.2 / (q + 1)) * (1 + rng.uniform(0, 0.1, n)) for q in range(4)},
        })
        for i, s in enumerate(SCHEDULES)
    }
    fid_curves = {s: pd.DataFrame({"step": [100, 200, 300], "fid": [30.0 + i, 15.0, 9.0]})
                  for i, s in enumerate(SCHEDULES)}
    samples = {
        (s, name, st): digits[rng.integers(0, len(digits), 16)]
        for s in SCHEDULES for name, _ in SAMPLERS for st in STEPS
    }
    return dict(
        fid=pd.DataFrame(rows), fid_floor=FLOOR, n_samples=100, features="classifier", losses=losses,
        fid_curves=fid_curves, timesteps=timesteps, zero_terminal_snr=False, samples=samples,
        real_images=digits[:3],
        featurizer={"kind": "classifier", "val_accuracy": 0.975, "train_accuracy": 0.99, "feature_dim": 32},
        timings=pd.DataFrame({"stage": ["train", "sample"], "item": ["linear", "all"], "seconds": [12.5, 3.25]}),
        params={"seed": 0, "timesteps": timesteps, "data": {"name": "digits"}, "train": {"steps": n, "lr": 1e-3},
                "sample": {"samplers": [{"name": "ddpm", "eta": 0.0}, {"name": "ddim", "eta": 0.0}],
                           "steps": list(STEPS)}},
        grid_images=16, grid_scale=3,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same inputs built twice, into two folders."""
    kw = synthetic_inputs()
    a = build_report(tmp_path_factory.mktemp("a") / "reports", **kw)
    b = build_report(tmp_path_factory.mktemp("b") / "reports", **kw)
    return kw, a, b


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


def test_markdown_fid_table_floor_and_links(built):
    kw, res, _ = built
    md = res["markdown"].read_text(encoding="utf-8")
    assert md.startswith("# DDPM experiment report")
    assert "| # | schedule | sampler | eta | steps | FID | FID / floor | samples |" in md
    assert "real vs real (floor)" in md and "1.234" in md  # the floor row (4 significant digits)
    # every configuration is a row; the best (lowest FID) row comes first, ratio to the floor shown
    fid = kw["fid"].sort_values("fid")
    best = fid.iloc[0]
    assert f"| **1** | **{best.schedule}** | **{best.sampler}** |" in md
    assert f"{best.fid / FLOOR:.2f}" in md
    table_rows = [ln for ln in md.splitlines() if re.match(r"\| \**\d+\** \|", ln)]
    assert len(table_rows) == len(fid)
    # summary paragraph names the best configuration and the floor
    assert "best configuration" in md and f"FID **{best.fid:.4g}**" in md
    # every image referenced exists, relative to the Markdown file
    refs = _md_images(md)
    assert len(refs) >= 6 + len(kw["samples"])
    for ref in refs:
        assert not ref.startswith(("http:", "https:", "/")), ref
        assert (res["markdown"].parent / ref).is_file(), ref
    for section in ("## FID", "## Samples", "## Training", "## Noise schedules", "## Featurizer", "## Run times",
                    "## Parameters"):
        assert section in md
    assert "97.5%" in md  # featurizer validation accuracy


def test_html_self_contained(built):
    kw, res, _ = built
    page = res["html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    urls = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.I)
    assert urls
    assert not [u for u in urls if re.match(r"\s*(https?:)?//", u, flags=re.I)]
    assert not re.search(r"https?://", page)
    srcs = re.findall(r"""<img[^>]*\bsrc="([^"]*)\"""", page)
    assert len(srcs) == len(re.findall(r"<img\b", page)) >= 6 + len(kw["samples"])
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "real vs real (floor)" in page


def test_determinism(built):
    _, a, b = built
    assert a["markdown"].read_bytes() == b["markdown"].read_bytes()
    assert a["html"].read_bytes() == b["html"].read_bytes()
    assert [Path(p).name for p in a["figures"]] == [Path(p).name for p in b["figures"]]
    for pa, pb in zip(a["figures"], b["figures"]):
        assert Path(pa).read_bytes() == Path(pb).read_bytes(), Path(pa).name


def test_sample_grids_pixels(built, tmp_path):
    kw, res, _ = built
    fig_dir = res["markdown"].parent / "figures"
    img = Image.open(fig_dir / "samples_linear_ddpm_5.png")
    assert img.mode == "L"
    # 16 images of 8x8 at scale 3 in a 4x4 grid with 1 px padding: nearest-neighbour upscaling
    assert img.size == (4 * (8 * 3 + 1) + 1, 4 * (8 * 3 + 1) + 1)
    arr = np.asarray(img)
    first = kw["samples"][("linear", "ddpm", 5)][0, 0]
    assert np.array_equal(arr[1:25, 1:25], first.repeat(3, 0).repeat(3, 1))

    rgb = synthetic_inputs(channels=3)
    rgb.update(zero_terminal_snr=True, fid_curves={})  # zero terminal SNR and no FID curve still work
    out = build_report(tmp_path / "rgb", **rgb)
    assert Image.open(tmp_path / "rgb" / "figures" / "samples_cosine_ddim_20.png").mode == "RGB"
    names = {Path(p).name for p in out["figures"]}
    assert "fid_over_training.png" not in names and "schedules.png" in names
    assert "No FID over training" in out["markdown"].read_text(encoding="utf-8")


def test_summary_metrics():
    kw = synthetic_inputs()
    m = summary_metrics(kw["fid"], kw["fid_floor"], kw["losses"], kw["featurizer"])
    best = kw["fid"].sort_values("fid").iloc[0]
    assert m["fid_floor"] == FLOOR
    assert m["best_fid"] == pytest.approx(best.fid)
    assert (m["best_schedule"], m["best_sampler"], m["best_steps"]) == (best.schedule, best.sampler, best.steps)
    assert m["best_fid_ratio"] == pytest.approx(best.fid / FLOOR)
    assert m["featurizer_val_accuracy"] == 0.975
    for s, df in kw["losses"].items():
        assert m[f"final_loss_{s}"] == pytest.approx(df["loss"].iloc[-40:].mean())  # last 10% of 400 steps
    for r in kw["fid"].itertuples():
        assert m[f"fid_{r.schedule}_{r.sampler}_{r.steps}"] == pytest.approx(r.fid)
    # flat, JSON-serialisable python scalars (what `dvc exp show` reads)
    assert all(isinstance(v, (int, float, str)) for v in m.values())
    assert json.loads(json.dumps(m)) == m
    assert isinstance(m["best_steps"], int)


def test_sampler_labels_disambiguate_eta():
    df = pd.DataFrame({"sampler": ["ddpm", "ddim", "ddim", "ddim"], "eta": [0.0, 0.0, 1.0, 0.0]})
    assert list(sampler_labels(df)) == ["ddpm", "ddim:0", "ddim:1", "ddim:0"]
    m = summary_metrics(
        pd.DataFrame({"schedule": ["cosine"] * 2, "sampler": ["ddim"] * 2, "eta": [0.0, 0.5], "steps": [10, 10],
                      "fid": [3.0, float("nan")]}),
        1.0, {}, {},
    )
    assert m["best_sampler"] == "ddim:0" and m["fid_cosine_ddim-0_10"] == 3.0
    assert m["fid_cosine_ddim-0p5_10"] is None  # NaN -> null in JSON


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
