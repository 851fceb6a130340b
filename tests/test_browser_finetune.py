"""The Fine-tune page in a real browser: Chromium launches a LoRA fine-tune of a tiny Llama from the
page's button (many small steps, so it runs long enough to watch), sees the loss chart gain points,
reloads mid-run and still sees the chart and the running job, cancels it and sees it cancelled (its
checkpoint kept). Screenshots land in test-artifacts/finetune-*.png. Skips without Debian's Chromium
unless KA2L_REQUIRE_BROWSER=1 (CI), where it fails instead.

Every wait is on a real condition: the app's own run protocol (``App`` of test_browser), the chart's
plotted points read from the page's plotly figure, the job's state read from the store."""

from __future__ import annotations

import pytest

from ka2l import jobs
from ka2l.store import finetune as S
from ka2l.store.db import connect
from helpers import import_pool
from test_browser import ARTIFACTS, CHROMIUM, FLAGS, JOB_TIMEOUT_MS, RUN_TIMEOUT_MS, App, _requirements_or_skip, streamlit_app
from test_finetune import CAPS
from test_finetune_data import stored_run

EPOCHS = "5000"  # 9 training pairs, batch 4 x grad-accum 2 (cpu-small): 10,000 steps of a tiny model, far more than the test waits for

TRAIN_POINTS = """(n) => {
    const gd = document.querySelector('[data-testid="stMain"] [data-testid="stPlotlyChart"] .js-plotly-plot');
    const train = gd && gd.data && gd.data.find(t => t.name === 'train loss');
    return !!train && train.x.length >= n;
}"""
COUNT_POINTS = """() => {
    const gd = document.querySelector('[data-testid="stMain"] [data-testid="stPlotlyChart"] .js-plotly-plot');
    const train = gd && gd.data && gd.data.find(t => t.name === 'train loss');
    return train ? train.x.length : 0;
}"""


class FinetuneApp(App):
    """``App``, knowing one more turn of the protocol: a click inside a fragment (the job's Cancel) whose
    handler calls ``st.rerun()`` turns the fragment run into a full run; that run's ``new_session`` (its
    ``metadata.run`` names no fragment) makes the awaited run a full one, ended by its ``script_finished``."""

    def _received(self, payload) -> None:
        if self.pending == "fragment" and not isinstance(payload, str):
            msg = self._fwd()
            msg.ParseFromString(payload)
            if msg.WhichOneof("type") == "new_session" and not msg.metadata.run.fragment_ids:
                self.pending = "full"
        super()._received(payload)


@pytest.fixture
def app_server(tiny_llama_dir, tmp_path):
    _requirements_or_skip()
    stored_run(tiny_llama_dir, import_pool(None, rows=CAPS))  # a finished Stage 1 run naming the tiny model
    with streamlit_app(tmp_path) as url:
        yield url


def _shot(app: App, name: str, show=None) -> None:
    """A screenshot with ``show`` (default: the training section's heading) in view (the app scrolls its main area, not the page)."""
    app.settle()
    (show or app.main().get_by_role("heading", name="Training", exact=True)).scroll_into_view_if_needed()
    app.screenshot(name)


def _steps_logged() -> int:
    with connect() as db:
        rows = S.list_finetunes(db)
        return len(S.log(db, rows[-1]["id"], "train")) if rows else 0


def test_launch_watch_reload_and_cancel_a_finetune(app_server):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(RUN_TIMEOUT_MS)
        app = FinetuneApp(page)
        app.goto(app_server)
        app.nav("Fine-tune")
        app.wait_text("Fine-tune: teach the model its unknowns")
        app.click(app.main().get_by_test_id("stRadio").get_by_text("gold answers (the pool's own)", exact=True))
        app.click(app.main().get_by_test_id("stRadio").get_by_text("every question", exact=True))
        epochs = app.main().get_by_label("Epochs", exact=True)
        epochs.fill(EPOCHS)
        app.act(lambda: epochs.press("Enter"))
        # the preset stops early after 3 held-out checks without improvement: a fast machine could finish the job
        # before the reload and the cancel below; with early stopping off it trains until cancelled
        app.click(app.main().get_by_test_id("stExpander").get_by_text("Advanced settings", exact=True), reruns=False)  # opens in the browser alone
        patience = app.main().get_by_label("Early-stopping patience (0 = off)", exact=True)
        patience.fill("0")
        app.act(lambda: patience.press("Enter"))
        app.wait_text("It fits.")
        assert int(app.metric("Training pairs")) + int(app.metric("Held out")) == len(CAPS)  # every gold answer
        app.screenshot("finetune-1-form.png")

        app.click(app.main().get_by_role("button", name="Launch fine-tune"))
        (job,) = jobs.list_jobs()  # queued by the click's run, which has ended
        assert job["kind"] == "finetune" and job["config"]["finetune"]["epochs"] == float(EPOCHS)
        assert job["config"]["finetune"]["patience"] == 0

        # the chart gains points while the job trains (the fragment redraws it from the store)
        page.wait_for_function(TRAIN_POINTS, arg=3, timeout=JOB_TIMEOUT_MS)
        first = page.evaluate(COUNT_POINTS)
        page.wait_for_function(TRAIN_POINTS, arg=first + 3, timeout=JOB_TIMEOUT_MS)
        app.wait_text("Training: step")
        _shot(app, "finetune-2-training.png")

        # a reload mid-run: the chart and the running job come back from the store
        seen = page.evaluate(COUNT_POINTS)
        app.reload()
        page.wait_for_function(TRAIN_POINTS, arg=seen, timeout=JOB_TIMEOUT_MS)
        app.wait_text("Training: step")
        assert jobs.get(job["id"])["status"] == "running"
        panel = app.main().get_by_test_id("stVerticalBlock").filter(has_text=f"Job {job['id']} · finetune").last  # the job's own box
        expect(panel).to_contain_text("running")
        page.wait_for_function(TRAIN_POINTS, arg=seen + 2, timeout=JOB_TIMEOUT_MS)  # and it keeps updating after the reload
        _shot(app, "finetune-3-after-reload.png", panel.get_by_role("button", name="Cancel"))

        # cancel: the job stops at a step's end with a checkpoint, the page says so and offers Resume
        app.click(panel.get_by_role("button", name="Cancel"))
        app.wait_text("is interrupted", timeout_ms=JOB_TIMEOUT_MS)
        panel = app.main().get_by_test_id("stVerticalBlock").filter(has_text=f"Job {job['id']} · finetune").last
        expect(panel).to_contain_text("cancelled", timeout=JOB_TIMEOUT_MS)
        expect(panel.get_by_role("button", name="Resume")).to_be_visible()
        assert jobs.get(job["id"])["status"] == "cancelled"
        with connect() as db:
            row = S.list_finetunes(db)[-1]
        assert row["status"] == "interrupted" and 0 < row["step"] < row["total_steps"]
        stopped = _steps_logged()
        assert page.evaluate(COUNT_POINTS) == stopped, "the chart shows every logged step"
        _shot(app, "finetune-4-cancelled.png", panel.get_by_role("button", name="Resume"))
        browser.close()
