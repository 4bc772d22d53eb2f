"""report.html and compare.html rendered by a real headless browser (Chromium): the pages draw, with the
plots, from file:// and with the network off. Slow (a browser start per page); skipped without Chromium."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from leantune.ledger import atomic_write_json
from leantune.report import compare_runs, make_report
from test_report import LEDGER, _synthetic_run

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(BROWSER is None, reason="no chromium on PATH")]


def _screenshot(page, out, height=2000):
    # --proxy-server to a closed port: any attempt to fetch something from outside would fail to draw.
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--proxy-server=127.0.0.1:9", f"--screenshot={out}", f"--window-size=1280,{height}", page.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    from PIL import Image

    return Image.open(out).convert("RGB")


def _check_drawn(img):
    """Not blank: text, tables and antialiased plot lines give thousands of distinct colours, and a good
    part of the page is not the white background."""
    assert img.size == (1280, 2000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1000, f"{len(colours or [])} distinct colours: a blank page?"
    white = sum(n for n, c in colours if c == (255, 255, 255))
    assert white / (img.width * img.height) < 0.9
    # the plot is an image wider than half the page: its colour (matplotlib's C0 blue lines) is there
    assert any(abs(r - 31) < 20 and abs(g - 119) < 20 and abs(b - 180) < 20 for _, (r, g, b) in colours)


def test_report_page_renders_in_chromium(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _synthetic_run(run)
    atomic_write_json(run / "ledger.json", LEDGER)
    make_report(run)
    _check_drawn(_screenshot(run / "report.html", tmp_path / "shot.png"))


def test_compare_page_renders_in_chromium(tmp_path):
    for name in ("a", "b"):
        _synthetic_run(tmp_path / name, steps=20 if name == "a" else 30)
        atomic_write_json(tmp_path / name / "ledger.json", LEDGER)
    compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    _check_drawn(_screenshot(tmp_path / "out" / "compare.html", tmp_path / "shot.png"))
