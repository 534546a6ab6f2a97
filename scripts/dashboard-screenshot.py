"""Screenshots of the master's web dashboard during a real online upgrade.

Starts a local cluster (a master with ``--dashboard`` and two workers), submits
an app, runs a dry run of its next version (the page shows the preview) and then
the upgrade itself (the page follows it live), and saves what a headless
chromium shows at each step into docs/img/:

    .venv/bin/python scripts/dashboard-screenshot.py [--out docs/img]

Needs chromium and chromium-driver (apt) and selenium (the test extra).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from hotwire.testing.cluster import LocalCluster, poll_for, write_app

V1 = """
from hotwire import Topology
from hotwire.testing.sources import counter

def parse(r):
    return {**r, "word": f"w{r['seq'] % 7}"}

app = Topology("orders")
raw = app.source("raw", counter(rate=300))
clean = raw.map("parse", parse, parallelism=2)
counts = clean.key_by(lambda r: r["word"]).reduce("count", lambda a, r: (a or 0) + 1, parallelism=2)
counts.sink("totals", lambda r: None)
clean.sink("audit", lambda r: None)
"""

V2 = """
from hotwire import Topology
from hotwire.testing.sources import counter

def parse(r):
    return {**r, "word": f"w{r['seq'] % 9}"}

def enrich(r):
    return {**r, "len": len(r["word"])}

app = Topology("orders")
raw = app.source("raw", counter(rate=300))
clean = raw.map("parse", parse, parallelism=2)
rich = clean.map("enrich", enrich)
counts = rich.key_by(lambda r: r["word"]).reduce("count", lambda a, r: (a or 0) + 1, parallelism=3)
counts.sink("totals", lambda r: None)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/img", help="where the PNG files go")
    args = ap.parse_args()
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        print("dashboard-screenshot: chromium and chromedriver are needed (apt)", file=sys.stderr)
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1500"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(driver))
    with tempfile.TemporaryDirectory(prefix="hotwire-shot-") as tmp:
        v1 = write_app(tmp, "orders_v1.py", V1)
        v2 = write_app(tmp, "orders_v2.py", V2)
        try:
            with LocalCluster(workers=2, data_dir=Path(tmp) / "c", dashboard=True) as c:
                c.client.submit(v1)
                browser.get(f"http://{c.dashboard_address}/")

                def text(element_id: str) -> str:
                    return str(browser.find_element("id", element_id).text)

                def rate_shown() -> bool:
                    return bool(
                        browser.execute_script(
                            "const t = document.querySelector('#graph g.pe[data-pe=\"count\"]');"
                            "return t && !t.textContent.includes(' 0 rec/s');"
                        )
                    )

                poll_for(rate_shown, 30, 0.2, what="rates on the page")
                browser.save_screenshot(str(out / "dashboard-running.png"))
                dry = c.client.upgrade(v2, dry_run=True, drop_state=())
                print(f"dry run: {len(dry.change_lines)} changes, {dry.instructions} instructions")
                poll_for(lambda: "PREVIEW" in text("mode-title"), 20, 0.1, what="the preview")
                browser.save_screenshot(str(out / "dashboard-preview.png"))
                reply = c.client.upgrade(v2)
                print(f"upgrade: version {reply.to_version} in {reply.latency_ms:.1f} ms")
                poll_for(lambda: text("app-version") == "v2", 20, 0.1, what="version 2")
                poll_for(lambda: "committed" in text("progress"), 20, 0.1)
                poll_for(rate_shown, 30, 0.2, what="rates after the upgrade")
                browser.save_screenshot(str(out / "dashboard-upgrade.png"))
        finally:
            browser.quit()
    for name in ("dashboard-running.png", "dashboard-preview.png", "dashboard-upgrade.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
