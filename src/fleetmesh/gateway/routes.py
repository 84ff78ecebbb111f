"""Which service owns a request: a route table built from each service's OpenAPI document.

In distributed mode the gateway knows no context's code; every service
instance serves `/openapi.json`, and the gateway compiles the paths found
there. When several templates match, the most specific wins (more literal
characters, then fewer parameters), so `/api/v1/devices/{id}/telemetry`
goes to telemetry while `/api/v1/devices/{id}` goes to devices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_PARAMETER = re.compile(r"\{[^}/]+\}")


@dataclass(frozen=True, slots=True)
class Route:
    service: str
    template: str
    methods: frozenset[str]
    pattern: re.Pattern[str]

    @property
    def specificity(self) -> tuple[int, int]:
        literal = len(_PARAMETER.sub("", self.template))
        return literal, -len(_PARAMETER.findall(self.template))


def compile_template(template: str) -> re.Pattern[str]:
    parts = _PARAMETER.split(template)
    regex = "[^/]+".join(re.escape(part) for part in parts)
    return re.compile(f"^{regex}$")


def routes_from_openapi(service: str, document: dict[str, Any]) -> list[Route]:
    routes = []
    for template, operations in (document.get("paths") or {}).items():
        methods = frozenset(method.upper() for method in operations)
        routes.append(Route(service, template, methods, compile_template(template)))
    return routes


class RouteTable:
    """Maps a method and path to the service that owns it."""

    def __init__(self) -> None:
        self._by_service: dict[str, list[Route]] = {}
        self._routes: list[Route] = []

    def replace(self, service: str, routes: list[Route]) -> None:
        self._by_service[service] = routes
        merged = [route for group in self._by_service.values() for route in group]
        self._routes = sorted(merged, key=lambda r: r.specificity, reverse=True)

    @property
    def services(self) -> list[str]:
        return sorted(self._by_service)

    def owner(self, method: str, path: str) -> str | None:
        for route in self._routes:
            if route.pattern.match(path) and (method in route.methods or method == "HEAD"):
                return route.service
        return None
