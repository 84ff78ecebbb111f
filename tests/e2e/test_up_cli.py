"""`fleetmesh up` as a user runs it: banner, API with the admin key, clean stop, no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fleetmesh.core.ports import free_port

pytestmark = pytest.mark.e2e

FLEETMESH = str(Path(sys.executable).with_name("fleetmesh"))


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def _wait_ready(base: str, process: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"fleetmesh up exited: {process.communicate()[1]}")
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("platform not ready in time")


def _start(data_dir: Path, http_port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            FLEETMESH,
            "up",
            "--data-dir",
            str(data_dir),
            "--http-port",
            str(http_port),
            "--nats-port",
            str(free_port()),
            "--mqtt-port",
            str(free_port()),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_up_serves_the_api_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = _start(tmp_path / "data", port)
    try:
        _wait_ready(base, process)
        key_file = tmp_path / "data" / "admin.key"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        nats_children = _children(process.pid)
        assert nats_children, "nats-server runs as a child"
        created = httpx.post(
            base + "/api/v1/device-types", json={"name": "thermo"}, headers=headers
        )
        assert created.status_code == 201
        device = httpx.post(
            base + "/api/v1/devices", json={"type": "thermo", "id": "e2e-1"}, headers=headers
        )
        assert device.status_code == 201
        listed = httpx.get(base + "/api/v1/devices", headers=headers).json()
        assert [d["id"] for d in listed["items"]] == ["e2e-1"]
        assert httpx.delete(base + "/api/v1/devices/e2e-1", headers=headers).status_code == 200
        types = _event_types(base, headers)
        assert "fleetmesh.device.registered.v1" in types
        assert "fleetmesh.device.deregistered.v1" in types
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "Console" in stderr and "MQTT" in stderr and "admin.key" in stderr
    time.sleep(0.2)
    assert not [pid for pid in nats_children if _alive(pid)], "no orphan nats-server"


def test_sigkill_of_the_platform_leaves_no_orphan_nats_server(tmp_path: Path) -> None:
    port = free_port()
    process = _start(tmp_path / "data", port)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", process)
        nats_children = _children(process.pid)
        assert nats_children
    finally:
        process.kill()
        process.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [p for p in nats_children if _alive(p)]:
        time.sleep(0.1)
    assert not [pid for pid in nats_children if _alive(pid)]


def test_an_explicit_port_that_is_taken_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = subprocess.run(
            [FLEETMESH, "up", "--data-dir", str(tmp_path), "--http-port", str(taken)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert f"port {taken}" in result.stderr and "already in use" in result.stderr


def test_version_and_help() -> None:
    version = subprocess.run([FLEETMESH, "version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("fleetmesh ")
    help_text = subprocess.run([FLEETMESH, "--help"], capture_output=True, text=True, check=True)
    for command in ("up", "devices", "keys"):
        assert command in help_text.stdout


def _event_types(base: str, headers: dict[str, str]) -> set[str]:
    deadline = time.monotonic() + 10
    types: set[str] = set()
    while time.monotonic() < deadline:
        body = httpx.get(base + "/api/v1/events", headers=headers).json()
        types = {e["type"] for e in body["items"]}
        if "fleetmesh.device.deregistered.v1" in types:
            break
        time.sleep(0.1)
    return types


def test_devices_cli_imports_csv_with_credentials_file(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    process = _start(data_dir, port)
    try:
        _wait_ready(base, process)
        env = {**os.environ, "FLEETMESH_API_URL": base, "FLEETMESH_DATA_DIR": str(data_dir)}
        key = (data_dir / "admin.key").read_text().strip()
        httpx.post(
            base + "/api/v1/device-types",
            json={"name": "meter", "capabilities": ["ping"]},
            headers={"Authorization": f"Bearer {key}"},
        )
        csv_file = tmp_path / "devices.csv"
        rows = ["type,id,name,capabilities"] + [f"meter,m-{i},Meter {i},ping" for i in range(30)]
        csv_file.write_text("\n".join(rows) + "\n")
        secrets_file = tmp_path / "secrets.json"
        result = subprocess.run(
            [FLEETMESH, "devices", "import", str(csv_file), "--credentials-out", str(secrets_file)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "created 30, failed 0" in result.stdout
        issued = json.loads(secrets_file.read_text())
        assert len(issued) == 30 and all(item["secret"] for item in issued)
        assert oct(secrets_file.stat().st_mode & 0o777) == "0o600"
        listed = subprocess.run(
            [FLEETMESH, "devices", "list", "--type", "meter", "--limit", "5"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert listed.returncode == 0 and "m-0" in listed.stdout
        gone = subprocess.run(
            [FLEETMESH, "devices", "deregister", "m-0"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert gone.returncode == 0 and "deregistered" in gone.stdout
        missing = subprocess.run(
            [FLEETMESH, "devices", "show", "nope"], capture_output=True, text=True, env=env
        )
        assert missing.returncode == 1 and "404" in missing.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
