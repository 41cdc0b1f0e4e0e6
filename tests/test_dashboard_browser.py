"""The dashboard in headless Chromium (Debian's, driven by Playwright) against a coordinator running a real job:
the page follows the job round by round without a reload, draws its metric curves and lists the silos.

A screenshot goes to the test's tmp folder; with FEDMEKI_DASHBOARD_SCREENSHOT=PATH also to PATH (docs/dashboard.png
was made with FEDMEKI_DASHBOARD_SCREENSHOT=docs/dashboard.png).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import address, coordinator_settings
from in_process import in_process_agents

from coordinator.server import Coordinator
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState
from silo_agent.agent import SiloAgent

CHROMIUM = Path("/usr/bin/chromium")
# Offline and quiet: no sandbox (root in containers), no GPU, no calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROUNDS = 3
WAIT_MS = 30_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no {CHROMIUM}: apt-get install chromium (scripts/setup does it as root)"
)


def step_until(agents: list[SiloAgent], done: Callable[[], bool], timeout: float = 120) -> None:
    give_up = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < give_up, "the job stopped advancing"
        for agent in agents:
            agent.run_once()


@pytest.fixture
def watched_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    instance = Coordinator(coordinator_settings(tmp_path / "coordinator", dashboard_address="127.0.0.1:0"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop(grace=0)


def test_the_page_follows_a_running_job(watched_coordinator: Coordinator, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    coordinator = watched_coordinator
    agents = in_process_agents(coordinator, tmp_path, "synthetic-vitals", 60)
    spec = parse_job_spec(
        {
            "name": "vitals-fedavg",
            "task": "synthetic-vitals",
            "rounds": ROUNDS,
            "min_silos": 3,
            "algorithm": {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.05},
        }
    )
    with sync_api.sync_playwright() as playwright, FedmekiClient(address(coordinator)) as client:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            job_id = client.submit_job(spec).id
            page.goto(f"http://127.0.0.1:{coordinator.dashboard_port}/")
            expect = sync_api.expect
            expect(page.locator("#job-name")).to_have_text("vitals-fedavg", timeout=WAIT_MS)
            expect(page.locator("#job-state")).to_have_text("running", timeout=WAIT_MS)
            expect(page.locator("#job-round")).to_have_text("0", timeout=WAIT_MS)
            expect(page.locator("#rounds tbody tr")).to_have_count(1, timeout=WAIT_MS)
            page.evaluate("window.sameDocument = true")  # gone if the page reloads

            for done in range(1, ROUNDS + 1):  # the counter moves on screen as each round commits
                step_until(agents, lambda done=done: client.get_job(job_id).current_round >= done)
                expect(page.locator("#job-round")).to_have_text(str(done), timeout=WAIT_MS)
                expect(page.locator("#jobs tbody tr").first.locator("td").nth(2)).to_have_text(
                    f"{done} / {ROUNDS}", timeout=WAIT_MS
                )
            step_until(agents, lambda: client.get_job(job_id).state.finished)  # the final evaluation
            assert client.get_job(job_id).state == JobState.COMPLETED

            expect(page.locator("#job-state")).to_have_text("completed", timeout=WAIT_MS)
            expect(page.locator("#rounds tbody tr")).to_have_count(ROUNDS + 1, timeout=WAIT_MS)
            mean = page.locator('.curve[data-task="synthetic-vitals"] path[data-series="all"]')
            expect(mean).to_have_attribute("data-points", str(ROUNDS + 1), timeout=WAIT_MS)  # checkpoints 0..ROUNDS
            expect(page.locator('.curve path[class="silo"]')).to_have_count(3)
            expect(page.locator("#silos tbody tr")).to_have_count(3)
            expect(page.locator("#silos .dot.on")).to_have_count(3)
            expect(page.locator("#banner")).to_be_hidden()
            assert page.evaluate("window.sameDocument") is True
            assert errors == []

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if target := os.environ.get("FEDMEKI_DASHBOARD_SCREENSHOT"):
                shutil.copyfile(shot, target)
        finally:
            browser.close()
