"""The web console in a real browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleetmesh.core.ports import free_port

pytestmark = pytest.mark.e2e

FLEETMESH = str(Path(sys.executable).with_name("fleetmesh"))
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def running_platform(tmp_path: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    process = subprocess.Popen(
        [
            FLEETMESH,
            "up",
            "--data-dir",
            str(data_dir),
            "--http-port",
            str(port),
            "--nats-port",
            str(free_port()),
            "--mqtt-port",
            str(free_port()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(150):
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                raise AssertionError(process.communicate()[1])
            time.sleep(0.2)
        yield base, (data_dir / "admin.key").read_text().strip()
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


def test_console_shows_the_fleet_and_a_device(
    running_platform: tuple[str, str], tmp_path: Path
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed (the CI script installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    base, key = running_platform
    headers = {"Authorization": f"Bearer {key}"}
    thermo = {"name": "thermo", "telemetry_schema": {"temp": {"type": "number"}}}
    httpx.post(base + "/api/v1/device-types", json=thermo, headers=headers)
    secrets = [
        httpx.post(
            base + "/api/v1/devices", json={"type": "thermo", "id": f"c-{i}"}, headers=headers
        ).json()["credentials"]["secret"]
        for i in range(3)
    ]
    sent = httpx.post(
        base + "/api/v1/devices/c-1/telemetry?wait=stored",
        json=[
            {"metric": "temp", "value": 20 + i / 10, "ts": int(time.time() * 1000) - 1000 * i}
            for i in range(5)
        ],
        auth=("c-1", secrets[1]),
    )
    assert sent.status_code == 202, sent.text
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.get_by_text("Paste an API key").wait_for()
            page.fill("#api-key", key)
            page.click("#key-form button")
            page.locator(".card .label", has_text="devices").wait_for()
            assert page.locator(".card .value").first.inner_text() == "3"
            page.click("text=Devices")
            page.get_by_role("heading", name="Devices").wait_for()
            page.get_by_role("link", name="c-1", exact=True).click()
            page.get_by_role("heading", name="Device c-1").wait_for()
            page.locator("#chart .uplot").wait_for()  # the telemetry chart was drawn
            status_cards = page.locator("#status-cards .card .value")
            assert status_cards.nth(0).inner_text() == "online"
            assert status_cards.nth(1).inner_text().endswith("%")
            assert status_cards.nth(2).inner_text().isdigit()
            page.screenshot(path=str(tmp_path / "device.png"))
            page.click("text=Events")
            page.get_by_text("fleetmesh.device.registered.v1").first.wait_for()
        finally:
            browser.close()
