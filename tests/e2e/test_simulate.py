"""`fleetmesh simulate` against a `fleetmesh up` process: nothing accepted is lost."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import pytest

from fleetmesh.core.ports import free_port

pytestmark = pytest.mark.e2e

FLEETMESH = str(Path(sys.executable).with_name("fleetmesh"))


class Running:
    def __init__(self, data_dir: Path, api: str, mqtt_port: int, nats_port: int) -> None:
        self.data_dir = data_dir
        self.api = api
        self.mqtt_url = f"mqtt://127.0.0.1:{mqtt_port}"
        self.nats_url = f"nats://127.0.0.1:{nats_port}"

    def nats_password(self) -> str:
        secrets = json.loads((self.data_dir / "nats" / "secrets.json").read_text())
        return str(secrets["service_password"])


@pytest.fixture(scope="module")
def platform_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    data_dir = tmp_path_factory.mktemp("simulate") / "data"
    http_port, mqtt_port, nats_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [
            FLEETMESH, "up", "--data-dir", str(data_dir), "--http-port", str(http_port),
            "--nats-port", str(nats_port), "--mqtt-port", str(mqtt_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    api = f"http://127.0.0.1:{http_port}"
    try:
        _wait_ready(api, process)
        yield Running(data_dir, api, mqtt_port, nats_port)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _wait_ready(api: str, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"fleetmesh up exited: {process.communicate()[1]}")
        try:
            if httpx.get(api + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("platform not ready in time")


def simulate_command(running: Running, *options: str) -> list[str]:
    return [
        FLEETMESH, "simulate", "--api", running.api, "--data-dir", str(running.data_dir),
        "--json", *options,
    ]  # fmt: skip


def report_of(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    assert returncode == 0, stderr[-3000:]
    report: dict[str, Any] = json.loads(stdout)
    return report


def simulate(running: Running, *options: str) -> dict[str, Any]:
    result = subprocess.run(
        simulate_command(running, *options), capture_output=True, text=True, timeout=90
    )
    return report_of(result.returncode, result.stdout, result.stderr)


async def ping_until_answered(running: Running, device_id: str, timeout: float = 20) -> str:
    """Ping a simulated device over NATS (MQTT devices/<id>/commands/ping) until it answers."""
    nc = await nats.connect(running.nats_url, user="fleetmesh", password=running.nats_password())
    try:
        answers = await nc.subscribe(f"devices.{device_id}.responses.ping")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            command_id = f"ping-{time.monotonic_ns()}"
            await nc.publish(
                f"devices.{device_id}.commands.ping",
                json.dumps({"command_id": command_id}).encode(),
            )
            try:
                answer = await answers.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            assert json.loads(answer.data)["command_id"] == command_id
            return command_id
        raise AssertionError(f"{device_id} never answered a ping")
    finally:
        await nc.close()


def test_simulate_over_http_loses_nothing_and_records_its_anomalies(
    platform_process: Running,
) -> None:
    report = simulate(
        platform_process, "--devices", "3", "--rate", "8", "--duration", "3", "--http",
        "--anomalies", "--seed", "5",
    )  # fmt: skip
    assert report["transport"] == "http"
    assert report["sent"] >= 3 * 8 * 2  # 3 devices, 8 points/s, at least 2 of the 3 seconds
    assert report["accepted"] == report["sent"] - report["rejected"]
    assert report["stored"] == report["accepted"] > 0
    assert report["lost"] == 0 and report["verified"]
    credentials = platform_process.data_dir / "simulator-credentials.json"
    assert oct(credentials.stat().st_mode & 0o777) == "0o600"
    assert set(json.loads(credentials.read_text())["devices"]) == {
        "sim-0000",
        "sim-0001",
        "sim-0002",
    }


def test_simulate_over_mqtt_reuses_the_devices_answers_pings_and_loses_nothing(
    platform_process: Running,
) -> None:
    credentials = platform_process.data_dir / "simulator-credentials.json"
    if not credentials.exists():  # run alone: register the devices first
        simulate(platform_process, "--devices", "2", "--rate", "4", "--duration", "1")
    before = json.loads(credentials.read_text())["devices"]
    command = simulate_command(
        platform_process, "--devices", "2", "--rate", "8", "--duration", "4", "--mqtt",
        "--mqtt-url", platform_process.mqtt_url,
    )  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as run:
        asyncio.run(ping_until_answered(platform_process, "sim-0001"))
        stdout, stderr = run.communicate(timeout=90)
    report = report_of(run.returncode, stdout, stderr)
    assert report["transport"] == "mqtt"
    assert report["sent"] >= 2 * 8 * 2
    assert report["stored"] == report["accepted"] > 0
    assert report["lost"] == 0 and report["verified"]
    assert report["pings_answered"] >= 1
    after = json.loads(credentials.read_text())["devices"]
    for device_id in ("sim-0000", "sim-0001"):
        assert after[device_id] == before[device_id]  # reused, not re-issued
