"""While a decoder trains, open Augment in a fresh tab and screenshot its loss curve twice, 30 s apart, without a reload.

    python shoot_item3_live_chart.py PORT OUT_PREFIX   (PORT: the Streamlit server shoot_item3.py started)
"""
import sys, time
from playwright.sync_api import sync_playwright
port, out = sys.argv[1], sys.argv[2]
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless","--no-sandbox","--disable-gpu","--disable-quic","--no-first-run","--disable-background-networking","--disable-component-update","--disable-sync"])
    page = b.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"http://127.0.0.1:{port}/augment"); page.get_by_text("the curve updates every").wait_for(timeout=90000); page.wait_for_timeout(1500)
    t0 = time.time()
    for i in range(2):
        page.get_by_text("the curve updates every").evaluate("e => e.scrollIntoView({block: 'end'})"); page.wait_for_timeout(300)
        page.screenshot(path=f"{out}-{i}.png"); print(i, round(time.time()-t0), page.get_by_text("the curve updates every").text_content(), flush=True)
        if i == 0: page.wait_for_timeout(30000)
    b.close()
