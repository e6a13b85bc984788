#!/usr/bin/env bash
# Rebuild reports/plots-template.html: DVC's `dvc plots show` page template with vega, vega-lite and
# vega-embed INLINED, so the plots render offline (DVC's default page loads them from a CDN).
#
# Usage: reports/make_plots_template.sh [OUTPUT]   (default: reports/plots-template.html beside this script)
# Needs: npm (only to fetch the three pinned tarballs from the npm registry), python3, tar.
# Reproducible: pinned versions, tarballs checked against the registry's sha512 integrity below, and
# the output depends only on the tarballs' bytes.
#
# Use it with:  dvc config plots.html_template ../reports/plots-template.html
# (a relative path is resolved from the .dvc/ folder), or `dvc plots show --html-template <path>`.
#
# Template format (dvc-render's HTML.embed): `{plot_divs}` is required and replaced by the plot
# elements; `{refresh_tag}` is optional; `{scripts}` must NOT appear, or dvc-render would insert its
# CDN <script src="https://cdn.jsdelivr.net/..."> tags there. Each vega plot is a
# `<div><script>vegaEmbed('#id', spec)</script></div>` that needs the global `vegaEmbed`, which the
# inlined scripts in <head> define before the body is parsed.
set -euo pipefail

VEGA=5.33.1
VEGA_LITE=5.23.0
VEGA_EMBED=6.29.0
declare -A INTEGRITY=(
  [vega-$VEGA.tgz]="sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="
  [vega-lite-$VEGA_LITE.tgz]="sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="
  [vega-embed-$VEGA_EMBED.tgz]="sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="
)

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/plots-template.html}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

cd "$tmp"
npm pack --silent "vega@$VEGA" "vega-lite@$VEGA_LITE" "vega-embed@$VEGA_EMBED" >/dev/null
for tgz in "${!INTEGRITY[@]}"; do
  got="sha512-$(python3 -c 'import base64, hashlib, sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tgz")"
  if [[ "$got" != "${INTEGRITY[$tgz]}" ]]; then
    echo "integrity mismatch for $tgz: got $got, expected ${INTEGRITY[$tgz]}" >&2
    exit 1
  fi
  mkdir -p "${tgz%.tgz}"
  tar -xzf "$tgz" -C "${tgz%.tgz}"
done

python3 - "$out" \
  "vega@$VEGA=vega-$VEGA/package/build/vega.min.js" \
  "vega-lite@$VEGA_LITE=vega-lite-$VEGA_LITE/package/build/vega-lite.min.js" \
  "vega-embed@$VEGA_EMBED=vega-embed-$VEGA_EMBED/package/build/vega-embed.min.js" <<'PY'
import os
import re
import sys
import tempfile

out, specs = sys.argv[1], sys.argv[2:]
scripts = []
for spec in specs:
    name, path = spec.split("=", 1)
    js = open(path, encoding="utf-8").read()
    js = re.sub(r"\n?//# sourceMappingURL=\S*\s*$", "", js)  # no .map to fetch
    for placeholder in ("{scripts}", "{plot_divs}", "{refresh_tag}"):  # dvc-render replaces these anywhere
        if placeholder in js:
            sys.exit(f"{name}: contains the dvc-render placeholder {placeholder}")
    if "<!--" in js:
        sys.exit(f"{name}: contains '<!--', unsafe inside an inline <script>")
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.I)  # cannot close the inline <script> early
    scripts.append(f"<!-- {name} (BSD-3-Clause licence) -->\n<script>\n{js}\n</script>")

page = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined by reports/make_plots_template.sh: no network needed -->
""" + "\n".join(scripts) + """
    <style>
        body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; margin: 16px; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
assert page.count("{plot_divs}") == 1 and "{scripts}" not in page
fd, tmp = tempfile.mkstemp(prefix=".plots-template.", dir=os.path.dirname(os.path.abspath(out)))
with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(page)
os.chmod(tmp, 0o644)
os.replace(tmp, out)
print(f"wrote {out} ({len(page.encode()) / 1e6:.2f} MB)")
PY
