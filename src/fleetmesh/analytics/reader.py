"""Reads other contexts through their published HTTP API (never their tables or code).

* telemetry: `GET /api/v1/devices/{id}/telemetry?metric=&from=&to=&limit=&cursor=`,
  page by page; `ts` may come back as RFC 3339 or epoch ms;
* devices: `GET /api/v1/devices/{id}` for the type of a device the projection
  has not seen yet.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from fleetmesh.analytics.domain import InvalidAnalyticsInput, TelemetryNotFound, from_ms, parse_ts
from fleetmesh.core.clock import to_rfc3339
from fleetmesh.core.errors import FleetmeshError, Overloaded
from fleetmesh.core.logging import get_logger

log = get_logger(__name__)

PAGE_SIZE = 5000  # the telemetry API serves at most 10,000 points a page


class TelemetryUnavailable(Overloaded):
    problem = "telemetry-unavailable"
    title = "Telemetry unavailable"


@dataclass(frozen=True, slots=True)
class SeriesPage:
    """One page of numeric points, sorted by time; `covered_to_ms` is how far the range is read."""

    ts_ms: list[int]
    values: list[float]
    covered_to_ms: int


class TelemetryReader(Protocol):
    def read(
        self, device_id: str, metric: str, start_ms: int, end_ms: int
    ) -> AsyncIterator[SeriesPage]:
        """Numeric points of one metric with start <= ts <= end, page by page, in time order."""


class DeviceDirectory(Protocol):
    async def device_type(self, device_id: str) -> str | None:
        """The device's type name, or None if the device is unknown."""


def numeric(value: object) -> float | None:
    """A finite float for numbers and booleans; None for anything else (strings, null)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


class HttpTelemetryReader:
    """Telemetry through the platform's public API (in-process or over the network)."""

    def __init__(
        self, client_factory: Callable[[], httpx.AsyncClient], page_size: int = PAGE_SIZE
    ) -> None:
        self.client_factory = client_factory
        self.page_size = page_size

    async def read(
        self, device_id: str, metric: str, start_ms: int, end_ms: int
    ) -> AsyncIterator[SeriesPage]:
        # `to` is asked one millisecond later (whether the API's bound is inclusive or
        # not) and the extra is cut here, so the last point of the range is never lost.
        params: dict[str, str | int] = {
            "metric": metric,
            "from": to_rfc3339(from_ms(start_ms)),
            "to": to_rfc3339(from_ms(end_ms + 1)),
            "limit": self.page_size,
        }
        last_seen = start_ms - 1
        async with self.client_factory() as http:
            while True:
                body = await self._get(http, device_id, params)
                page = _page(body, metric, start_ms, end_ms, last_seen)
                if page.ts_ms:
                    last_seen = page.ts_ms[-1]
                cursor = body.get("next_cursor")
                done = not cursor
                yield SeriesPage(
                    page.ts_ms, page.values, end_ms if done else max(last_seen, start_ms)
                )
                if done:
                    return
                params["cursor"] = str(cursor)

    async def _get(
        self, http: httpx.AsyncClient, device_id: str, params: dict[str, str | int]
    ) -> dict[str, Any]:
        try:
            response = await http.get(f"/api/v1/devices/{device_id}/telemetry", params=params)
        except httpx.HTTPError as error:
            raise TelemetryUnavailable(f"The telemetry API did not answer: {error!r}") from None
        if response.status_code == 404:
            raise TelemetryNotFound(f"No telemetry for device {device_id!r}: it is not known.")
        if response.status_code in (400, 422):
            raise InvalidAnalyticsInput(f"The telemetry API refused the query: {_detail(response)}")
        if response.status_code >= 400:
            raise TelemetryUnavailable(
                f"The telemetry API answered {response.status_code}: {_detail(response)}"
            )
        body = response.json()
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise TelemetryUnavailable("The telemetry API answered an unexpected body.")
        return body


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("detail", body))[:500] if isinstance(body, dict) else str(body)[:200]


def _page(
    body: dict[str, Any], metric: str, start_ms: int, end_ms: int, last_seen: int
) -> SeriesPage:
    points: dict[int, float] = {}
    for item in body["items"]:
        if not isinstance(item, dict) or item.get("metric", metric) != metric:
            continue
        value = numeric(item.get("value"))
        if value is None:
            continue
        try:
            ts = parse_ts(item.get("ts"))
        except FleetmeshError:
            continue
        # Pages do not overlap, but guard anyway: keep time order, drop repeats.
        if start_ms <= ts <= end_ms and ts > last_seen:
            points[ts] = value
    ordered = sorted(points.items())
    return SeriesPage([ts for ts, _ in ordered], [v for _, v in ordered], last_seen)


class HttpDeviceDirectory:
    """The devices API, for a device the projection of device events has not seen yet."""

    def __init__(self, client_factory: Callable[[], httpx.AsyncClient]) -> None:
        self.client_factory = client_factory

    async def device_type(self, device_id: str) -> str | None:
        async with self.client_factory() as http:
            try:
                response = await http.get(f"/api/v1/devices/{device_id}")
            except httpx.HTTPError as error:
                raise TelemetryUnavailable(f"The devices API did not answer: {error!r}") from None
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise TelemetryUnavailable(f"The devices API answered {response.status_code}.")
        body = response.json()
        type_name = body.get("type") if isinstance(body, dict) else None
        return str(type_name) if type_name else None
