"""The Label Studio round trip in a real browser: ka2l pushes a pool's approved set to a real Label
Studio (the session fixture ``label_studio``); Chromium logs into Label Studio's own UI, opens the first
task, sees the model's low-temperature answer as the prefilled prediction, corrects it and submits; then
ka2l's Annotate page (Streamlit on 127.0.0.1) pulls and shows the typed answer in its table.
Screenshots land in test-artifacts/labelstudio-*.png. Skips without Debian's Chromium unless
KA2L_REQUIRE_BROWSER=1 (CI), where it fails instead."""

from __future__ import annotations

import pytest

from ka2l.annotate import connection
from ka2l.annotate import push as P
from ka2l.annotate.labelstudio import Client
from ka2l.config import PushConfig
from ka2l.paths import PROJECT_ROOT
from ka2l.probing.stage1 import run_stage1
from ka2l.store import annotate as A
from ka2l.store import curation
from ka2l.store import queries as Q
from ka2l.store.db import connect
from helpers import N_KNOWN, import_pool, stage1_cfg
from test_browser import ARTIFACTS, CHROMIUM, FLAGS, JOB_TIMEOUT_MS, RUN_TIMEOUT_MS, App, _requirements_or_skip, streamlit_app

TYPED = "Ankara, typed in Label Studio"
HOSTILE_ANSWER = "<img src=y onerror=alert(3)>Paris"
HOSTILE = '<script>alert("ka2l")</script><img src=x onerror=alert(2)> What is the capital of =HYPERLINK("http://x","y")?'


@pytest.fixture
def pushed(memo_model, capitals, label_studio, monkeypatch):
    """A pool with a Stage 1 run and four curated unknown questions, pushed to Label Studio; the
    connection comes from the environment (as a deployment would set it)."""
    _requirements_or_skip()
    monkeypatch.setenv(connection.ENV_URL, label_studio.url)
    monkeypatch.setenv(connection.ENV_TOKEN, label_studio.token)
    pool = import_pool(capitals, rows=capitals[N_KNOWN - 12:N_KNOWN + 12])  # 12 known to the tiny model, 12 not
    run_id = run_stage1("caps", stage1_cfg(memo_model))
    with connect() as db:
        unknown = [r["question_id"] for r in Q.load_scores(db, run_id) if r["bise"] == 1]
    curation.add(pool, unknown[:4], "test")
    result = P.push("caps", PushConfig(title="browser round trip"))
    with connect() as db:
        first = A.links(db, result["project"])[0]  # rank 1
    ranked = P.items("caps").set_index("item_key", drop=False)
    prediction = ranked.loc[first["item_key"], "low_answer"]
    assert prediction, "the first task carries the model's answer as a prediction"
    # a task written to attack whatever renders it, built by push's own task_of, in a project of its own
    # (so the round trip's counts and tables stay those of the four questions above)
    client = Client.from_connection(connection.require())
    hostile_project = client.create_project("browser hostile text", P.LABEL_CONFIG)
    item = {**ranked.loc[first["item_key"]].to_dict(), "question": HOSTILE, "low_answer": HOSTILE_ANSWER,
            "clusters": [(HOSTILE, 3), ("<b>bold?</b>", 1)]}
    (hostile_task,) = client.import_tasks(hostile_project, [P.task_of(item, "caps", 1)])
    return {"project_id": result["project_id"], "task_id": first["task_id"], "question": first["question"], "prediction": prediction,
            "hostile_project": hostile_project, "hostile_task": hostile_task}


@pytest.fixture
def app_server(pushed, tmp_path):
    with streamlit_app(tmp_path) as url:
        yield url


def test_annotate_in_label_studio_and_pull_into_the_app(pushed, app_server, label_studio):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(RUN_TIMEOUT_MS)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

        # Label Studio's own UI, as an annotator: log in, open the first task in the order
        page.goto(f"{label_studio.url}/user/login")
        page.locator("#email").fill(label_studio.username)
        page.locator("#password").fill(label_studio.password)
        page.locator("button.login-button").click()
        page.wait_for_url(lambda u: "/user/login" not in u)
        page.goto(f"{label_studio.url}/projects/{pushed['project_id']}/data?task={pushed['task_id']}")
        main = page.locator(".lsf-main-view")
        expect(main.get_by_text(pushed["question"], exact=True)).to_be_visible()
        answer = page.get_by_test_id("htx-textbox-content")
        expect(answer).to_have_text(pushed["prediction"])  # the model's answer, prefilled to correct
        page.screenshot(path=str(ARTIFACTS / "labelstudio-1-task-with-prediction.png"), full_page=True)
        page.get_by_test_id("htx-textbox-edit-button").click()
        page.get_by_test_id("htx-textbox-input").fill(TYPED)
        page.get_by_role("button", name="Save", exact=True).click()
        expect(answer).to_have_text(TYPED)
        page.screenshot(path=str(ARTIFACTS / "labelstudio-2-answer-typed.png"), full_page=True)
        with page.expect_response(lambda r: "/api/tasks/" in r.url and "/annotations" in r.url and r.request.method == "POST") as posted:
            page.get_by_role("button", name="Submit current annotation").click()
        assert posted.value.ok, posted.value.status

        # ka2l's Annotate page: progress shows the annotation, Pull brings the answer into the table
        app = App(page)
        app.goto(app_server + "annotate")
        app.wait_text(f"Connected to {label_studio.url}")
        app.wait_text("1 of 4 pushed tasks annotated")
        app.click(app.main().get_by_role("button", name="Pull answers"))
        app.wait_text("pulls the answers")
        app.wait_text(f"Done: ", timeout_ms=JOB_TIMEOUT_MS)
        app.reload()
        table = app.main().get_by_test_id("stDataFrame").filter(has_text="every annotation")
        expect(table).to_contain_text(TYPED, timeout=JOB_TIMEOUT_MS)
        expect(app.main().get_by_test_id("stMetric").filter(has_text="Answered").get_by_test_id("stMetricValue")).to_have_text("1")
        app.screenshot("labelstudio-3-pulled-in-ka2l.png")

        # question, sampled answers and prediction written as an attack show in Label Studio's UI as the text
        # they are: no script runs, no element is made of them
        page.goto(f"{label_studio.url}/projects/{pushed['hostile_project']}/data?task={pushed['hostile_task']}")
        main = page.locator(".lsf-main-view")
        expect(main.get_by_text(HOSTILE, exact=True)).to_be_visible()
        expect(page.get_by_test_id("htx-textbox-content")).to_have_text(HOSTILE_ANSWER)
        expect(main.get_by_text("<b>bold?</b>")).to_be_visible()
        assert main.locator("script").count() == 0 and main.locator("img[src='x'], img[src='y']").count() == 0
        page.screenshot(path=str(ARTIFACTS / "labelstudio-4-hostile-text-inert.png"), full_page=True)
        assert dialogs == [], f"a script from task text ran: {dialogs}"
        browser.close()
    assert all((ARTIFACTS / f).stat().st_size > 10_000 for f in ("labelstudio-1-task-with-prediction.png",
                                                                    "labelstudio-3-pulled-in-ka2l.png"))
