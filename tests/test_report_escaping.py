"""Every user-controlled string reaches the report escaped (issue 13): a `<script>` payload in the experiment name,
params values, schedule names (folder and file names), sampler names, the ruler's metadata and the interval text
appears in report.html only HTML-escaped, and in report.md only Markdown-escaped. Schedule and sampler names
that are not in ddpm/app/names.py's vocabulary are refused when fid.csv is read (issue 28, row 8)."""
from __future__ import annotations

import dataclasses
import json
import re

import pandas as pd
import pytest
from markupsafe import escape

import report_fixture as rf
from ddpm.app.report.build import build_report
from ddpm.app.results import ResultsError, load_results

PAYLOAD = '"><script>alert(1)</script>'
NAME = '"><script>alert(1)'  # no "/": it names folders and files


def test_script_payload_in_a_name_column_is_refused(tmp_path):
    for schedule, sampler in ((f"cosine{NAME}", "ddpm"), ("cosine", f"ddpm{NAME}")):
        fid = rf.fid_rows([schedule], [(sampler, 0.0)], [5], [0])
        root = rf.write_tree(tmp_path / sampler[:4], schedules=(schedule,), samplers=((sampler, 0.0),), steps=(5,),
                             fid=fid)
        with pytest.raises(ResultsError, match="allowed"):
            load_results(rf.params(), root)


def test_script_payload_is_escaped_everywhere(tmp_path):
    schedule, sampler = "cosine", "ddpm"
    features = f"classifier-32d{NAME}"
    fid = rf.fid_rows([schedule, "linear"], [(sampler, 0.0), ("ddim", 0.0)], [5, 20], [0])
    fid["features"] = features
    root = rf.write_tree(tmp_path, schedules=(schedule, "linear"), samplers=((sampler, 0.0), ("ddim", 0.0)),
                         steps=(5, 20), fid=fid)
    for name, extra in (("reports/fid_summary.json", {"interval": PAYLOAD}),
                        ("featurizer/metrics.json", {"ruler": PAYLOAD, "seed_stability": {PAYLOAD: PAYLOAD}})):
        obj = json.loads((root / name).read_text())
        (root / name).write_text(json.dumps({**obj, "features": features, **extra}))
    p = rf.params(data_name=PAYLOAD)
    p = dataclasses.replace(p, tracking=dataclasses.replace(p.tracking, experiment=PAYLOAD),
                            data=dataclasses.replace(p.data, name=PAYLOAD, root=PAYLOAD))
    r = load_results(p, root)
    out = build_report(tmp_path / "out", r, grid_images=4, grid_scale=1)
    page = out["html"].read_text(encoding="utf-8")
    md = out["markdown"].read_text(encoding="utf-8")

    assert "<script" not in page.lower()
    assert not re.search(r"(?<!\\)<(?!br>)", md)  # every "<" in the Markdown is escaped (but our own <br>)
    # each string is there, escaped: title and params (data.name), experiment, schedule, sampler, ruler, interval
    for s in (PAYLOAD, features):
        assert str(escape(s)) in page, s
    assert page.count(str(escape(PAYLOAD))) >= 5  # title x2, params table (name, root, experiment), ruler, interval
    assert f"<title>DDPM experiment report: {escape(PAYLOAD)}</title>" in page
    assert f'alt="{escape(schedule)} / {escape(sampler)} / 5 steps"' in page  # attribute values too
    assert pd.read_csv(root / "reports" / "fid.csv")["features"].iloc[0] == features  # the payload did go in
    assert "\\<script\\>" in md
    assert not [p for p in out["figures"] if "<" in p.name or '"' in p.name]  # file names are slugs
