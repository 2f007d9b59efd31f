import base64
import json
import os
import re
import shutil
import subprocess

import pytest

from specmoe.errors import InputError
from specmoe.report.build import write_report
from specmoe.report.markdown import markdown_summary

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Debian's chromium and sets this, so the browser check cannot silently skip there.
REQUIRE_BROWSER = os.environ.get("SPECMOE_REQUIRE_BROWSER") == "1"


def render_in_chromium(page, tmp_path) -> dict[str, int]:
    """Open ``page`` in headless Chromium; the report's own script counts the plots that decoded."""
    if CHROMIUM is None:
        if REQUIRE_BROWSER:
            pytest.fail("SPECMOE_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("headless Chromium not installed (Debian package: chromium)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return {key: int(value) for key, value in re.findall(r'data-(plots(?:-rendered)?)="(\d+)"', body)}


def test_report_plots_render_in_headless_chromium(finished_run, tmp_path):
    out, _ = finished_run
    counts = render_in_chromium(out / "report.html", tmp_path)
    assert counts["plots"] == 8  # usage, comparison, by horizon, by layer, calibration, simulated, measured, stalls
    assert counts["plots-rendered"] == counts["plots"]


def test_the_render_check_catches_a_broken_plot(finished_run, tmp_path):
    out, _ = finished_run
    page = (out / "report.html").read_text()
    start = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(page[:start] + base64.b64encode(b"not a png at all").decode() + page[page.index('"', start) :])
    counts = render_in_chromium(broken, tmp_path)
    assert counts["plots-rendered"] == counts["plots"] - 1


def test_report_is_self_contained_and_labels_simulation(finished_run):
    out, _ = finished_run
    page = (out / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)[^"#]', page)  # nothing fetched from elsewhere
    assert "SIMULATION" in page and "MEASURED" in page and "random" in page
    summary = (out / "summary.md").read_text()
    assert "SIMULATION" in summary and "| token |" in summary


def test_report_can_be_rerendered_and_markdown_matches_summary(finished_run):
    out, _ = finished_run
    write_report(out)
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.md").read_text() == markdown_summary(summary)


def test_report_of_a_non_run_directory_is_refused(tmp_path):
    with pytest.raises(InputError, match="not a specmoe run directory"):
        write_report(tmp_path)


def test_report_of_an_unfinished_run_says_so(tmp_path):
    (tmp_path / "stages.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("predictors: {models: []}\n")
    with pytest.raises(InputError, match="finish it with `specmoe run`"):
        write_report(tmp_path)
