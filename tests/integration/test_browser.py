"""The dashboard in a real headless Chromium: `tokenfarm dashboard` on a seeded database, every page
rendered and photographed. Screenshots land in artifacts/screenshots/ for CI to keep.

Debian's chromium is driven through the playwright package with `executable_path`: playwright's
own browser download (`playwright install`) is never used.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import urllib.request

import pytest

from dashboard.sample_data import seed
from orchestrator.db import make_engine, upgrade
from tests.conftest import REPO
from tests.integration.conftest import TOKENFARM, service_env, stop_process, wait_until

pytestmark = pytest.mark.integration
CHROMIUM = os.environ.get("TOKENFARM_CHROMIUM", "/usr/bin/chromium")
SHOTS = REPO / "artifacts" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
# (navigation label, heading, charts and tables that must have drawn before the screenshot)
PAGES = [
    ("Pareto: speed vs quality", "Speed against quality: the Pareto frontier", 1, 1),
    ("What should I run?", "What should I run?", 0, 1),
    ("The 2026 claims, measured", "The 2026 claims, measured", 0, 1),
    ("Techniques", "Techniques", 2, 1),
    ("Prefill vs decode", "Prefill vs decode", 2, 1),
    ("MoE and the roofline", "MoE and the roofline", 1, 1),
    ("Workers and sweeps", "Workers and sweeps", 1, 3),
    ("Result detail", "Result detail", 1, 1),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


# True once the script has finished and at least the expected tables and charts have drawn:
# Streamlit sends elements as the script runs, so "one chart visible" is not "page done".
DRAWN = """([charts, tables]) => {
  const status = document.querySelector('[data-testid="stStatusWidget"]');
  if (status && status.innerText.includes('Running')) return false;
  const drawn = sel => [...document.querySelectorAll(sel)].filter(
    b => b.querySelector('canvas, svg, table') && b.getBoundingClientRect().height > 20).length;
  return drawn('[data-testid="stVegaLiteChart"]') >= charts && drawn('[data-testid="stDataFrame"]') >= tables;
}"""


def settled(page, heading: str, n_charts: int, n_tables: int) -> None:
    """Wait until the page's heading shows and its tables and charts have all drawn."""
    page.get_by_role("heading", name=heading).first.wait_for(state="visible", timeout=60_000)
    page.wait_for_function(DRAWN, arg=[n_charts, n_tables], timeout=60_000)


@pytest.fixture
def dashboard_url(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (CI's .ci/run does)")
    pytest.importorskip("playwright", reason="pip install playwright (the test extra)")
    data_dir = tmp_path / "data"
    url = f"sqlite:///{data_dir / 'tokenfarm.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    seed(engine, 3000, n_sweeps=4)
    engine.dispose()
    env = service_env(data_dir)
    env["PYTHONPATH"] = str(REPO)
    port = free_port()
    log = (tmp_path / "dashboard.log").open("wb")
    proc = subprocess.Popen([TOKENFARM, "dashboard", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: healthy(base) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
        yield base
    finally:
        stop_process(proc, timeout_s=20)
        log.close()


def test_every_page_renders_in_chromium(dashboard_url):
    from playwright.sync_api import sync_playwright

    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 2200})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(dashboard_url)
            settled(page, "Leaderboard by VRAM tier", 1, 1)
            assert page.get_by_role("tab", name="24 GB").count() == 1
            page.screenshot(path=str(SHOTS / "leaderboard.png"), full_page=True)

            for label, heading, n_charts, n_tables in PAGES:
                page.locator('[data-testid="stSidebarNav"] a', has_text=label).first.click()
                settled(page, heading, n_charts, n_tables)
                if heading == "Result detail":
                    # Metrics and JSON draw after the charts: wait for their text, not for time.
                    page.get_by_text("tok/s (mean)").first.wait_for(state="visible", timeout=60_000)
                    page.get_by_text('"n_threads"').first.wait_for(state="visible", timeout=60_000)
                assert page.locator('[data-testid="stException"]').count() == 0, label
                name = re.sub(r"[^a-z0-9]+", "_", heading.lower()).strip("_")  # a plain file name
                page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    assert len(list(SHOTS.glob("*.png"))) == 1 + len(PAGES)
