"""The app in a real browser: Streamlit on 127.0.0.1, Playwright driving Debian's Chromium.
Upload a CSV, run Stage 1 on a tiny model from the Probe page, reload mid-run, see scores and map;
then Stage 2: train a decoder, generate candidates, review them with keyboard shortcuts, download
the approved set.
Screenshots land in test-artifacts/. CI installs Chromium and sets KA2L_REQUIRE_BROWSER=1, so there
this test cannot silently skip."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ka2l import settings
from ka2l.paths import PROJECT_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _requirements_or_skip():
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append("Debian's chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package")
    if missing:
        if os.environ.get("KA2L_REQUIRE_BROWSER") == "1":
            pytest.fail("browser test required but missing: " + ", ".join(missing))
        pytest.skip("needs " + ", ".join(missing))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, memo_model):
    _requirements_or_skip()
    settings.save({"model": str(memo_model), "device": "cpu"})
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(PROJECT_ROOT / "app.py"), "--server.port", str(port),
                             "--server.headless", "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
                            env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "_stcore/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=20)


def test_upload_run_stage1_and_explore(server, tmp_path, capitals):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    pool_csv = tmp_path / "capitals-80.csv"
    with pool_csv.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        w.writerows((q, "|".join(a)) for q, a in capitals)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        # The first request to a fresh server is a page's own URL (a bookmark, or a tab left open while
        # the app restarted): it must still get the app's navigation and sidebar, not a bare page.
        page.goto(server + "jobs")
        page.get_by_role("heading", name="Jobs").wait_for()
        page.wait_for_timeout(1500)
        expect(page.get_by_text("Active pool")).to_have_count(0)  # no pool yet: the sidebar says so instead
        expect(page.get_by_text("No pool yet: add one on the Pool page.")).to_be_visible()
        expect(page.get_by_text("Stage 1", exact=True)).to_be_visible()  # a section of the app's navigation
        page.goto(server)
        page.get_by_text("Question pool").wait_for()
        page.locator("input[type=file]").set_input_files(str(pool_csv))
        page.get_by_role("button", name="Import pool").click()
        page.get_by_text("Imported pool 'capitals-80'").wait_for()
        page.screenshot(path=str(ARTIFACTS / "1-pool.png"), full_page=True)

        page.get_by_role("link", name="Probe", exact=True).click()
        page.get_by_text("Stage 1: knowledge-distribution probing").wait_for()
        page.get_by_label("Samples k").fill("4")
        page.get_by_label("Max new tokens").fill("6")
        page.get_by_role("button", name="Launch Stage 1").click()
        page.get_by_text("submitted").wait_for()
        page.reload()  # a reload mid-run loses nothing: the job panel reads the database
        page.get_by_text("Job 1 · stage1").wait_for()
        page.screenshot(path=str(ARTIFACTS / "2-job-running.png"), full_page=True)
        page.get_by_text("Done: run 1.").wait_for(timeout=240_000)
        page.screenshot(path=str(ARTIFACTS / "3-job-done.png"), full_page=True)

        page.get_by_role("link", name="Scores", exact=True).click()
        page.get_by_text("Drill down into").wait_for()
        expect(page.get_by_text("of 80 questions")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "4-scores.png"), full_page=True)

        page.get_by_role("link", name="Map", exact=True).click()
        page.locator(".js-plotly-plot").first.wait_for()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(ARTIFACTS / "5-map.png"), full_page=True)
        approved = _augment_and_review(page, tmp_path)
        browser.close()
    assert all((ARTIFACTS / f).stat().st_size > 10_000 for f in ("1-pool.png", "4-scores.png", "5-map.png", "7-review.png"))
    kinds = [json.loads(line)["kind"] for line in approved.read_text().splitlines()]
    assert kinds.count("decoded") == 2 and kinds.count("original") > 0, kinds


def _metric(page, label: str) -> str:
    return page.get_by_test_id("stMetric").filter(has_text=label).get_by_test_id("stMetricValue").inner_text()


def _settle(page) -> None:
    """Wait for the script run to finish: until then the previous run's widgets may still be on the page."""
    from playwright.sync_api import expect

    page.wait_for_timeout(500)
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=30_000)
    page.wait_for_timeout(500)


def _unfocus(page) -> None:
    """After the run settles (so buttons and shortcuts are the current ones), take focus off any
    widget, so key presses go to the page's shortcuts."""
    _settle(page)
    page.evaluate("document.activeElement && document.activeElement.blur()")


def _augment_and_review(page, tmp_path: Path) -> Path:
    """Stage 2 in the browser: train a decoder and generate candidates as jobs, review them with the
    keyboard (typing in the edit box must not trigger shortcuts), download the approved set."""
    from playwright.sync_api import expect

    page.get_by_role("link", name="Augment", exact=True).click()
    page.get_by_role("button", name="Train decoder").wait_for()
    page.get_by_label("Learning rate").fill("3e-3")
    page.get_by_role("button", name="Train decoder").click()
    page.get_by_text("Done: decoder 1.").wait_for(timeout=240_000)
    page.get_by_role("radio", name="1 · Decoder").click()  # the decoder's report and loss curve
    page.get_by_text("Reconstruction of questions from their own vectors").wait_for()

    page.get_by_role("radio", name="2 · Generate").click()
    page.get_by_label("Candidates per question").fill("2")
    page.get_by_label("Noise (share of vector norm)").fill("0.2")
    page.get_by_role("button", name="Generate candidates").click()
    page.get_by_text("Done: generation 1.").wait_for(timeout=240_000)
    page.screenshot(path=str(ARTIFACTS / "6-generate.png"), full_page=True)

    page.get_by_role("radio", name="3 · Review").click()
    page.get_by_text("Source question:").wait_for()
    pending = int(_metric(page, "Pending"))
    _unfocus(page)
    page.keyboard.press("a")  # approve with the shortcut
    expect(page.get_by_test_id("stMetric").filter(has_text="Approved").get_by_test_id("stMetricValue")).to_have_text("1", timeout=20_000)
    _settle(page)  # the next candidate's box replaces the approved one's
    box = page.get_by_label("Candidate (edit before approving if needed)")
    box.fill("")
    box.press_sequentially("What is the capital of Atlantis? xsua")  # letters of every shortcut, typed into the box
    box.press("Enter")
    page.wait_for_timeout(1500)
    assert _metric(page, "Approved") == "1" and _metric(page, "Rejected") == "0" and int(_metric(page, "Pending")) == pending - 1
    box.fill("What is the capital of Atlantis?")
    box.press("Enter")
    page.get_by_role("button", name="Approve edited").click()
    expect(page.get_by_test_id("stMetric").filter(has_text="Approved").get_by_test_id("stMetricValue")).to_have_text("2", timeout=20_000)
    _unfocus(page)
    page.keyboard.press("x")
    expect(page.get_by_test_id("stMetric").filter(has_text="Rejected").get_by_test_id("stMetricValue")).to_have_text("1", timeout=20_000)
    page.reload()  # decisions are stored, not kept in the browser session
    page.get_by_role("radio", name="3 · Review").click()
    page.get_by_text("Source question:").wait_for()
    assert _metric(page, "Rejected") == "1"
    _unfocus(page)
    page.keyboard.press("u")  # undo the rejection
    expect(page.get_by_test_id("stMetric").filter(has_text="Rejected").get_by_test_id("stMetricValue")).to_have_text("0", timeout=20_000)
    page.screenshot(path=str(ARTIFACTS / "7-review.png"), full_page=True)

    page.get_by_role("radio", name="4 · Approved set").click()
    page.get_by_text("Original (curation set)").wait_for()
    page.get_by_role("button", name="Add the").click()  # the run's unknown questions join the curation set
    expect(page.get_by_test_id("stMetric").filter(has_text="Original").get_by_test_id("stMetricValue")).not_to_have_text("0")
    page.get_by_role("button", name="Download JSONL").wait_for()
    page.wait_for_timeout(2000)  # let the rerun finish: a stale button's file is gone once the new one is sent
    with page.expect_download() as download:
        page.get_by_role("button", name="Download JSONL").click()
    target = tmp_path / "approved.jsonl"
    download.value.save_as(target)
    page.screenshot(path=str(ARTIFACTS / "8-approved.png"), full_page=True)
    return target
