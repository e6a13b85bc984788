"""The tools the suite needs: present under CI, and the helper's skip-or-fail rule."""
import pytest

from ci_tools import TOOLS, find, need


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tool_is_present(tool):
    """Skipped on a machine without the tool; a failure under CI=true."""
    assert need(tool) == find(tool)


def test_missing_tool_skips_locally_and_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium not found on PATH"):
        need("chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true, so a missing tool is a failure"):
        need("chromium")


def test_ci_script_uses_the_same_lookup(repo_root):
    script = (repo_root / ".ci" / "run").read_text()
    assert "python3 tests/ci_tools.py" in script and "command -v" not in script
