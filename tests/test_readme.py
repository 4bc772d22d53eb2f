"""The README: short, opens with `make demo` / `make test`, and its Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 260
TESTED = "<!-- tested -->"


def code_blocks(text: str) -> list[tuple[str, str, bool]]:
    """(language, body, marked tested) of every fenced block, in order; marked: `<!-- tested -->` is the
    last non-blank line before the opening fence."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        before = [line for line in lines[:i] if line.strip()]
        blocks.append((m.group(1), "\n".join(lines[i + 1:j]), bool(before) and before[-1].strip() == TESTED))
        i = j + 1
    return blocks


def test_code_blocks_parser():
    text = "intro\n```bash\nmake demo\n```\n\n<!-- tested -->\n\n```python\nx = 1\n```\n```\nplain\n```\n"
    assert code_blocks(text) == [("bash", "make demo", False), ("python", "x = 1", True), ("", "plain", False)]


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines (at most {MAX_LINES}): move long sections to docs/"


def test_readme_opens_with_make_demo_and_make_test():
    text = README.read_text()
    first = code_blocks(text)[0][1]
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make demo", "make test"], first
    # nothing but the title comes before that block
    assert [line for line in text[:text.index("```")].splitlines() if line.strip()] == ["# leantune"]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """Every block marked tested runs as written, in order, in one namespace, in an empty directory (in this
    process: torch and transformers are imported once for the whole suite)."""
    blocks = code_blocks(README.read_text())
    tested = [body for lang, body, marked in blocks if marked]
    assert tested, f"no code block marked {TESTED} in README.md"
    assert all(lang == "python" for lang, _, marked in blocks if marked)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for k, body in enumerate(tested):
        exec(compile(body, f"README.md python block {k}", "exec"), namespace)
    ledger = tmp_path / "runs" / "tiny" / "ledger.json"
    assert ledger.is_file(), "the example should leave its run directory in the working directory"


DOCS = sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def test_relative_links_resolve():
    """Relative links of the README and of every page in docs/ point at files in the checkout."""
    for page in [README] + [ROOT / "docs" / name for name in DOCS]:
        links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text())
        targets = {(page.parent / link).resolve().relative_to(ROOT).as_posix() for link in links}
        missing = sorted(t for t in targets if not (ROOT / t).exists())
        assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
    assert re.findall(r"\]\(docs/", README.read_text())
