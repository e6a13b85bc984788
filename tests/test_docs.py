"""The user documentation: README.md stays short, its first commands are the ones CI runs, and every relative
link in README.md and docs/*.md points at a file of the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def ci_commands() -> list[str]:
    """The install and test commands of .ci/run (the README's own, as CI types them, without pip's -q)."""
    lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines() if ln.strip().startswith("python3 -m")]
    install = next(ln for ln in lines if " pip install " in ln)
    test = next(ln for ln in lines if " pytest" in ln)
    return [re.sub(r"\s-q\b", "", install), test]


def relative_links(text: str) -> list[str]:
    """Link targets that are not URLs or in-page anchors, without their #fragment."""
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def test_readme_is_at_most_300_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines (at most 300: longer material goes to docs/)"


def test_readme_first_code_block_holds_the_ci_commands():
    first = FENCE.search((ROOT / "README.md").read_text()).group(1)
    for command in ci_commands():
        assert command in first, f"README's first code block lacks .ci/run's command {command!r}"


def test_every_relative_link_resolves():
    assert len(DOCS) > 1, "docs/*.md not found"
    broken = [f"{doc.relative_to(ROOT)}: {target}" for doc in DOCS for target in relative_links(doc.read_text())
              if not (doc.parent / target).resolve().is_file()]
    assert not broken, "links to no file: " + "; ".join(broken)


def test_link_checker_keeps_only_relative_targets():
    assert relative_links("[a](docs/x.md#y) [b](https://e.org/z) [c](#top) [d](../e.md)") == ["docs/x.md", "../e.md"]
