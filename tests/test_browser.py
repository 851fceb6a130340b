"""The app in a real browser: Streamlit on 127.0.0.1, Playwright driving Debian's Chromium.
Import two pools (a demo pool, then an uploaded CSV), run Stage 1 on a tiny model from the Probe
page, reload mid-run, explore Scores (drill-down, judge verdicts, every download read back) and the
Map (hover shows the question); then Stage 2: train a decoder, generate candidates, review them with
keyboard shortcuts, download the approved set.
Screenshots land in test-artifacts/. CI installs Chromium and sets KA2L_REQUIRE_BROWSER=1, so there
this test cannot silently skip.

Robust by construction (issue 9): Streamlit redraws the page on every script run and keeps the
previous run's elements on screen, marked stale, until the run ends, so a locator resolved mid-run
can match an old and a new element at once (the strict-mode violation "Download JSONL resolved to 2
elements" on a busy CI machine) or one about to vanish. ``App`` follows the app's own protocol on its
WebSocket: an action that makes the browser ask for a run waits for that run to end, and every locate
first waits until no run is asked for or going and no stale element is left (``App.settle``). No
fixed sleeps; locators are scoped to the part of the page they belong to."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ka2l import settings
from ka2l.paths import PROJECT_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_MS = 120_000  # one script run, however busy the machine
JOB_TIMEOUT_MS = 300_000  # one background job (Stage 1, decoder training, generation) on the tiny model


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


@contextmanager
def streamlit_app(home: Path) -> Iterator[str]:
    """The real app (``streamlit run app.py``) on a free loopback port, with ``home`` as HOME; yields its
    URL once it answers its health check and stops its process group afterwards."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(PROJECT_ROOT / "app.py"), "--server.port", str(port),
                             "--server.headless", "true", "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
                            env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(url + "_stcore/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "the app server did not start"
            time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)


@pytest.fixture
def server(tmp_path, memo_model):
    _requirements_or_skip()
    settings.save({"model": str(memo_model), "device": "cpu"})
    with streamlit_app(tmp_path) as url:
        yield url


# -- waiting for Streamlit -------------------------------------------------------------------------

_SETTLED_DOM = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    return !!app && app.getAttribute('data-test-connection-state') === 'CONNECTED'
        && app.getAttribute('data-test-script-state') === 'notRunning'
        && !document.querySelector('[data-stale="true"]')
        && !document.querySelector('[data-testid="stStatusWidget"]');
}"""


class App:
    """A Playwright page on the app that knows when Streamlit has finished answering.

    It reads the app's WebSocket: a BackMsg ``rerun_script`` from the browser (a click, a choice, a
    reload; not a fragment's timed auto-rerun) is a run asked for; the run has ended when a
    ``new_session`` (the start of a full run) and then a successful ``script_finished`` came back
    (a run cut short by ``st.rerun`` ends "early for rerun" and the next one follows). A fragment run
    asked for ends with its fragment's ``script_finished``."""

    def __init__(self, page):
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        self.page, self._back, self._fwd = page, BackMsg, ForwardMsg
        self.asked = 0            # runs the browser asked for
        self.pending: str | None = None  # "full" / "fragment": a run asked for and not ended
        self._started = False     # the pending full run has started (its new_session came)
        page.on("websocket", self._attach)

    # the protocol
    def _attach(self, ws) -> None:
        if ws.url.endswith("/_stcore/stream"):
            ws.on("framesent", self._sent)
            ws.on("framereceived", self._received)

    def _sent(self, payload) -> None:
        if isinstance(payload, str):
            return
        msg = self._back()
        msg.ParseFromString(payload)
        if msg.WhichOneof("type") == "rerun_script" and not msg.rerun_script.is_auto_rerun:
            self.asked += 1
            self.pending, self._started = ("fragment" if msg.rerun_script.fragment_id else "full"), False

    def _received(self, payload) -> None:
        if isinstance(payload, str) or self.pending is None:
            return
        msg = self._fwd()
        msg.ParseFromString(payload)
        kind, status = msg.WhichOneof("type"), self._fwd.ScriptFinishedStatus
        if kind == "new_session":
            self._started = True
        elif kind == "script_finished":
            if self.pending == "full" and self._started and msg.script_finished in (status.FINISHED_SUCCESSFULLY,
                                                                                    status.FINISHED_WITH_COMPILE_ERROR):
                self.pending = None
            elif self.pending == "fragment" and msg.script_finished == status.FINISHED_FRAGMENT_RUN_SUCCESSFULLY:
                self.pending = None

    def _until(self, condition, what: str, timeout_ms: int = RUN_TIMEOUT_MS) -> None:
        """Let Playwright deliver the page's events until ``condition()`` holds (a condition, not a delay)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while not condition():
            assert time.monotonic() < deadline, f"timed out after {timeout_ms / 1000:.0f} s waiting for {what}"
            self.page.wait_for_timeout(20)

    # waiting
    def settle(self) -> None:
        """Until no run is asked for or going, and the page holds no stale element from an earlier run."""
        self._until(lambda: self.pending is None, "the app's run to end")
        self.page.wait_for_function(_SETTLED_DOM, timeout=RUN_TIMEOUT_MS)

    def act(self, action, reruns: bool = True):
        """Do ``action``; when it makes the browser ask for a run, wait for that run to end. Returns what ``action`` returned."""
        before = self.asked
        result = action()
        if reruns:
            self._until(lambda: self.asked > before, "the browser to ask for a run")
        self.settle()
        return result

    # scoped locators, each after the page has settled
    def main(self):
        self.settle()
        return self.page.get_by_test_id("stMain")

    def sidebar(self):
        self.settle()
        return self.page.get_by_test_id("stSidebar")

    # actions
    def goto(self, url: str) -> None:
        self.act(lambda: self.page.goto(url))

    def reload(self) -> None:
        self.act(self.page.reload)

    def nav(self, title: str) -> None:
        self.act(self.sidebar().get_by_role("link", name=title, exact=True).click)

    def click(self, locator, reruns: bool = True) -> None:
        self.act(locator.click, reruns)

    def choose(self, label: str, option: str | None = None, index: int | None = None) -> None:
        """Pick an option of the main area's selectbox ``label`` by its text or position."""
        box = self.main().get_by_test_id("stSelectbox").filter(has=self.page.get_by_text(label, exact=True))
        box.click()
        dropdown = self.page.get_by_test_id("stSelectboxVirtualDropdown")
        self.click(dropdown.get_by_role("option", name=option, exact=True) if option is not None else dropdown.get_by_role("option").nth(index))

    def wait_text(self, text, timeout_ms: int = RUN_TIMEOUT_MS):
        """Until ``text`` (a string or pattern) shows in the main area, then settle; returns its locator."""
        found = self.main().get_by_text(text).first
        found.wait_for(timeout=timeout_ms)
        self.settle()
        return self.main().get_by_text(text).first

    def metric(self, label: str) -> str:
        return self.main().get_by_test_id("stMetric").filter(has_text=label).get_by_test_id("stMetricValue").inner_text()

    def download_all(self, container, folder: Path) -> dict[str, bytes]:
        """Click every download button in ``container`` and read each file back: label -> bytes."""
        files = {}
        buttons = container.get_by_test_id("stDownloadButton")
        for i in range(buttons.count()):
            self.settle()
            button = buttons.nth(i)
            label = button.inner_text().strip()
            with self.page.expect_download(timeout=RUN_TIMEOUT_MS) as download:
                button.get_by_role("button").click()
            target = folder / download.value.suggested_filename
            download.value.save_as(target)
            files[label] = target.read_bytes()
            self.settle()  # a button that reruns the page on click has asked by now
        return files

    def screenshot(self, name: str) -> None:
        self.settle()
        path = ARTIFACTS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)


# -- the test ---------------------------------------------------------------------------------------

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
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.set_default_timeout(RUN_TIMEOUT_MS)
        app = App(page)
        # The first request to a fresh server is a page's own URL (a bookmark, or a tab left open while
        # the app restarted): it must still get the app's navigation and sidebar, not a bare page.
        app.goto(server + "jobs")
        expect(app.main().get_by_role("heading", name="Jobs")).to_be_visible()
        expect(app.sidebar().get_by_text("Active pool")).to_have_count(0)  # no pool yet: the sidebar says so instead
        expect(app.sidebar().get_by_text("No pool yet: add one on the Pool page.")).to_be_visible()
        expect(app.sidebar().get_by_text("Stage 1", exact=True)).to_be_visible()  # a section of the app's navigation

        _import_two_pools(app, server, pool_csv)
        _stage1(app)
        _scores(app, tmp_path)
        _map(app)
        approved = _augment_and_review(app, tmp_path)
        browser.close()
    assert all((ARTIFACTS / f).stat().st_size > 10_000 for f in ("1-pool.png", "4-scores.png", "5-map.png", "7-review.png"))
    kinds = [json.loads(line)["kind"] for line in approved.decode("utf-8").splitlines()]
    assert kinds.count("decoded") == 2 and kinds.count("original") > 0, kinds


def _import_two_pools(app: App, server: str, pool_csv: Path) -> None:
    """A demo pool, then the uploaded CSV: the second import crashed with
    StreamlitWidgetAlreadyInstantiatedError (issue 11, item 1)."""
    from playwright.sync_api import expect

    app.goto(server)
    app.click(app.main().get_by_test_id("stRadio").get_by_text("Demo pool", exact=True))
    app.choose("Demo pool", "elements")
    app.click(app.main().get_by_test_id("stForm").get_by_role("button", name="Import pool"))
    app.wait_text("Imported pool 'elements' (206 questions)")

    app.click(app.main().get_by_test_id("stRadio").get_by_text("Upload a file", exact=True))
    app.act(lambda: app.main().locator("input[type=file]").set_input_files(str(pool_csv)))
    app.click(app.main().get_by_test_id("stForm").get_by_role("button", name="Import pool"))
    app.wait_text("Imported pool 'capitals-80' (80 questions)")
    main = app.main()
    expect(main.get_by_test_id("stException")).to_have_count(0)
    expect(main.get_by_test_id("stDataFrame").last).to_contain_text("capitals-80.csv")  # the stored-pools list, at once
    expect(app.sidebar().get_by_role("combobox", name="Active pool")).to_have_value("capitals-80 (80)")
    app.screenshot("1-pool.png")
    app.screenshot("issue11/1-second-pool-after.png")


def _stage1(app: App) -> None:
    app.nav("Probe")
    app.wait_text("Stage 1: knowledge-distribution probing")
    form = app.main().get_by_test_id("stForm").filter(has=app.page.get_by_role("button", name="Launch Stage 1"))
    form.get_by_label("Samples k").fill("4")
    form.get_by_label("Max new tokens").fill("6")
    app.click(form.get_by_role("button", name="Launch Stage 1"))
    app.wait_text("submitted")
    app.reload()  # a reload mid-run loses nothing: the job panel reads the database
    app.wait_text("Job 1 · stage1")
    app.screenshot("2-job-running.png")
    app.wait_text(re.compile(r"Done: run 1\b"), timeout_ms=JOB_TIMEOUT_MS)
    app.screenshot("3-job-done.png")


def _scores(app: App, tmp_path: Path) -> None:
    """Filter to the unknown questions, drill into one, open its judge verdicts (where the downloads
    hung, issue 11 item 4), then click every download and read the files."""
    from playwright.sync_api import expect

    app.nav("Scores")
    app.wait_text("Drill down into")
    expect(app.main().get_by_text("80 of 80 questions")).to_be_visible()
    app.choose("Label", "unknown (BiSE = 1)")
    n_unknown = int(re.search(r"(\d+) of 80 questions", app.wait_text(re.compile(r"\d+ of 80 questions")).inner_text()).group(1))
    assert 0 < n_unknown < 80
    app.choose("Drill down into", index=1)
    verdicts = app.main().get_by_test_id("stExpander").filter(has_text="Judge verdicts")
    app.click(verdicts.get_by_text("Judge verdicts"), reruns=False)
    expect(app.main().get_by_test_id("stExpander").filter(has_text="Judge verdicts").get_by_test_id("stDataFrame")).to_be_visible()
    app.screenshot("4-scores.png")
    files = app.download_all(app.main(), tmp_path / "scores")
    assert set(files) == {"Download CSV", "Download JSONL"}, set(files)
    rows = list(csv.DictReader(io.StringIO(files["Download CSV"].decode("utf-8"))))
    lines = [json.loads(line) for line in files["Download JSONL"].decode("utf-8").splitlines()]
    assert len(rows) == len(lines) == n_unknown, (len(rows), len(lines), n_unknown)
    assert {r["bise"] for r in rows} == {"1"} and {r["bise"] for r in lines} == {1}
    assert [r["question"] for r in rows] == [r["question"] for r in lines] and all(r["question"].endswith("?") for r in rows)


def _map(app: App) -> None:
    """Hovering a point shows its question, not a density contour's bin (issue 11 item 5)."""
    from playwright.sync_api import expect

    app.nav("Map")
    chart = app.main().locator(".js-plotly-plot").first
    chart.wait_for()
    app.choose("Colour by", "BiSE")
    legend = app.main().locator(".js-plotly-plot .legend")
    for name in ("known", "unknown", "known density", "unknown density"):
        expect(legend.get_by_text(name, exact=True)).to_be_visible()
    app.screenshot("5-map.png")
    x, y = app.page.evaluate("""() => {
        const gd = document.querySelector('[data-testid="stMain"] .js-plotly-plot');
        const trace = gd._fullData.find(t => t.type === 'scattergl' && t.name === 'unknown');
        const L = gd._fullLayout, box = gd.getBoundingClientRect();
        return [box.left + L._size.l + L.xaxis.l2p(trace.x[0]), box.top + L._size.t + L.yaxis.l2p(trace.y[0])];
    }""")
    app.page.mouse.move(x, y)
    hover = app.main().locator(".js-plotly-plot .hoverlayer .hovertext")
    expect(hover).to_have_count(1)
    expect(hover).to_contain_text("?")
    expect(hover).to_contain_text("BiSE: unknown")
    expect(hover).not_to_contain_text("density")
    app.screenshot("issue11/5-map-hover-after.png")


def _unfocus(app: App) -> None:
    """Take focus off any widget, so key presses go to the page's shortcuts (after the run settles,
    so the buttons and shortcuts are the current ones)."""
    app.settle()
    app.page.evaluate("document.activeElement && document.activeElement.blur()")


def _augment_and_review(app: App, tmp_path: Path) -> bytes:
    """Stage 2 in the browser: train a decoder and generate candidates as jobs, review them with the
    keyboard (typing in the edit box must not trigger shortcuts), download the approved set."""
    from playwright.sync_api import expect

    def metric_value(label: str):
        return app.main().get_by_test_id("stMetric").filter(has_text=label).get_by_test_id("stMetricValue")

    def step(name: str) -> None:
        """Open an Augment step; clicking the step already open asks for no run (the page keeps its step in the URL)."""
        button = app.main().get_by_role("radio", name=name)
        if not button.is_checked():
            app.click(button)
        expect(app.main().get_by_role("radio", name=name)).to_be_checked()

    app.nav("Augment")
    train = app.main().get_by_test_id("stForm").filter(has=app.page.get_by_role("button", name="Train decoder"))
    train.get_by_label("Learning rate").fill("3e-3")
    app.click(train.get_by_role("button", name="Train decoder"))
    app.wait_text("Done: decoder 1.", timeout_ms=JOB_TIMEOUT_MS)
    app.reload()  # the step is kept in the URL; the page drawn before the decoder existed shows its report after a rerun
    step("1 · Decoder")  # the decoder's report and loss curve
    app.wait_text("Reconstruction of questions from their own vectors")

    step("2 · Generate")
    generate = app.main().get_by_test_id("stForm").filter(has=app.page.get_by_role("button", name="Generate candidates"))
    generate.get_by_label("Candidates per question").fill("2")
    generate.get_by_label("Noise (share of vector norm)").fill("0.2")
    app.click(generate.get_by_role("button", name="Generate candidates"))
    app.wait_text("Done: generation 1.", timeout_ms=JOB_TIMEOUT_MS)
    app.screenshot("6-generate.png")

    step("3 · Review")
    app.wait_text("Source question:")
    pending = int(app.metric("Pending"))
    _unfocus(app)
    app.act(lambda: app.page.keyboard.press("a"))  # approve with the shortcut
    expect(metric_value("Approved")).to_have_text("1")
    box = app.main().get_by_label("Candidate (edit before approving if needed)")
    box.fill("")
    box.press_sequentially("What is the capital of Atlantis? xsua")  # letters of every shortcut, typed into the box
    app.act(lambda: box.press("Enter"))  # commits the text: a run, but no decision
    assert app.metric("Approved") == "1" and app.metric("Rejected") == "0" and int(app.metric("Pending")) == pending - 1
    box = app.main().get_by_label("Candidate (edit before approving if needed)")
    box.fill("What is the capital of Atlantis?")
    app.act(lambda: box.press("Enter"))
    app.click(app.main().get_by_role("button", name="Approve edited"))
    expect(metric_value("Approved")).to_have_text("2")
    _unfocus(app)
    app.act(lambda: app.page.keyboard.press("x"))
    expect(metric_value("Rejected")).to_have_text("1")
    app.reload()  # decisions are stored, not kept in the browser session
    step("3 · Review")
    app.wait_text("Source question:")
    assert app.metric("Rejected") == "1"
    _unfocus(app)
    app.act(lambda: app.page.keyboard.press("u"))  # undo the rejection
    expect(metric_value("Rejected")).to_have_text("0")
    app.screenshot("7-review.png")

    step("4 · Approved set")
    app.wait_text("Original (curation set)")
    app.click(app.main().get_by_role("button", name=re.compile(r"^Add the \d+ unknown questions")))  # the run's unknowns join the set
    expect(metric_value("Original")).not_to_have_text("0")
    files = app.download_all(app.main(), tmp_path / "approved")
    assert set(files) == {"Download JSONL", "Download CSV"}, set(files)
    jsonl = files["Download JSONL"].decode("utf-8").splitlines()
    rows = list(csv.DictReader(io.StringIO(files["Download CSV"].decode("utf-8"))))
    assert len(jsonl) == len(rows) == int(app.metric("Approved set"))
    assert [json.loads(line)["question"] for line in jsonl] == [r["question"] for r in rows]
    assert "What is the capital of Atlantis?" in {r["question"] for r in rows}
    app.screenshot("8-approved.png")
    return files["Download JSONL"]
