"""Before/after screenshots for issue 11 item 3 (the decoder's time budget), in headless Chromium.

    python shoot_item3.py TAG ROOT DATA OUTDIR [BUDGET_MINUTES, default 2]

ROOT is a checkout of the app (652f3aa for "before", HEAD for "after"); DATA a data folder in which
`python -m ka2l import demo:capitals` and a Stage 1 run (`python -m ka2l probe --pool capitals ...`)
already exist. The script starts Streamlit on ROOT, opens Augment, launches decoder training with
"Time budget" = BUDGET_MINUTES, and screenshots the page as the job moves through its phases, then the Jobs
page when it ends. Job state is read from DATA/ka2l.db (read-only) to time the shots; the elapsed
time since the job started goes into each file name and into OUTDIR/3-decoder-budget-TAG-timeline.txt.
"""
import os, re, socket, sqlite3, subprocess, sys, time, urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

TAG, ROOT, DATA, OUT = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
PY = "/work/main/.venv/bin/python"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BUDGET_MIN = int(sys.argv[5]) if len(sys.argv) > 5 else 2
OUT.mkdir(parents=True, exist_ok=True)
timeline = open(OUT / f"3-decoder-budget-{TAG}-timeline.txt", "w")


def note(text):
    print(text, flush=True); timeline.write(text + "\n"); timeline.flush()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def settle(page):
    page.wait_for_timeout(300)
    page.wait_for_function("""() => { const a = document.querySelector('[data-testid="stApp"]');
        return a && a.getAttribute('data-test-script-state') === 'notRunning' && !document.querySelector('[data-stale="true"]'); }""",
                           timeout=120000)


def job_row():
    with sqlite3.connect(f"file:{DATA / 'ka2l.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM jobs WHERE kind = 'decoder' ORDER BY id DESC LIMIT 1").fetchone()
    return dict(row) if row else None


def stamp(t0):
    s = int(time.time() - t0); return f"{s // 60}m{s % 60:02d}s"


def shot(page, name, t0, anchor=None):
    if anchor is not None and anchor.count():
        anchor.first.evaluate("e => e.scrollIntoView({block: 'start'})"); page.wait_for_timeout(400)
    path = OUT / f"3-decoder-budget-{TAG}-{name}-at-{stamp(t0)}.png"
    page.screenshot(path=str(path))
    note(f"{stamp(t0)}  screenshot {path.name}")


def main():
    port = free_port()
    env = {**os.environ, "KA2L_DATA_DIR": str(DATA), "PYTHONPATH": str(ROOT), "HOME": str(DATA)}
    srv = subprocess.Popen([PY, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
                            "--server.address", "127.0.0.1", "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
                           cwd=ROOT, env=env, stdout=open(OUT.parent / f"streamlit-{TAG}.log", "w"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url + "_stcore/health", timeout=1); break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url); settle(page)  # first load imports everything
            page.goto(url + "augment"); page.get_by_text("Train a new decoder").wait_for(timeout=120000); settle(page)
            if not page.get_by_role("button", name="Train decoder").is_visible():  # collapsed once a decoder exists
                page.get_by_text("Train a new decoder").click(); page.get_by_role("button", name="Train decoder").wait_for()
            budget = page.get_by_role("spinbutton", name="Time budget (min, 0 = none)")
            budget.fill(str(BUDGET_MIN)); budget.press("Tab"); page.wait_for_timeout(300)
            page.get_by_text("Time budget (min, 0 = none)").first.evaluate("e => e.scrollIntoView({block: 'center'})")
            page.screenshot(path=str(OUT / f"3-decoder-budget-{TAG}-0-form.png"))
            page.get_by_role("button", name="Train decoder").click(); settle(page)
            t0 = time.time()
            note(f"{TAG}: submitted with a {BUDGET_MIN} min budget at {time.strftime('%H:%M:%S')}")
            card = lambda jid: page.get_by_text(re.compile(rf"^Job {jid} · decoder"))
            seen, n, row, stage_t = {}, 1, None, t0
            baseline_long = False
            while True:
                row = job_row()
                if row is None:
                    time.sleep(1); continue
                if row["status"] in ("done", "failed", "cancelled"):
                    break
                stage = row["stage"] or "starting"
                if stage not in seen:
                    seen[stage] = time.time(); stage_t = seen[stage]
                    note(f"{stamp(t0)}  stage {stage!r} ({row['done']}/{row['total']}) message={row['message']!r}")
                in_stage = time.time() - seen[stage]
                key = re.sub(r"[^a-z]+", "-", stage.lower()).strip("-")
                # one shot per phase, 15 s in (training: 45 s in, so the loss curve has points)
                if f"shot:{stage}" not in seen and in_stage >= (45 if "train" in stage else 15):
                    seen[f"shot:{stage}"] = 1
                    shot(page, f"{n}-{key}", t0, card(row["id"])); n += 1
                    if "train" in stage:  # reload once (the decoder row now exists), then 30 s later without a reload
                        page.reload(); card(row["id"]).first.wait_for(timeout=60000); page.wait_for_timeout(2000)
                        shot(page, f"{n}-{key}-reloaded", t0, card(row["id"])); n += 1
                        page.wait_for_timeout(30000)
                        shot(page, f"{n}-{key}-30s-later-no-reload", t0, card(row["id"])); n += 1
                # before: still in the first phase once the whole budget is gone
                if stage.startswith("baseline") and not baseline_long and time.time() - t0 >= BUDGET_MIN * 60 + 60:
                    baseline_long = True
                    shot(page, f"{n}-{key}-past-the-budget", t0, card(row["id"])); n += 1
                time.sleep(2)
            note(f"{stamp(t0)}  job {row['id']} {row['status']}: created {row['created_at']} started {row['started_at']} finished {row['finished_at']}"
                 f" error={row['error']!r} result={row['result']!r}")
            page.wait_for_timeout(3000); settle(page)
            page.reload(); card(row["id"]).first.wait_for(timeout=120000); settle(page)
            page.wait_for_timeout(1500)
            shot(page, f"{n}-done-augment", t0, card(row["id"])); n += 1
            page.goto(url + "jobs"); card(row["id"]).first.wait_for(timeout=60000); settle(page); page.wait_for_timeout(1500)
            shot(page, f"{n}-done-jobs-page", t0)
            browser.close()
    finally:
        os.killpg(srv.pid, 15); srv.wait()
        timeline.close()


main()
