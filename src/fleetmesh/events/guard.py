"""The SSRF guard: webhooks may only reach public addresses.

A host is resolved and every address it resolves to must be globally routable
(not loopback, private, link-local, CGNAT, multicast, reserved or
unspecified; IPv4-mapped IPv6 addresses are judged by their IPv4 address),
unless the platform runs with `allow_private_webhooks`. The check runs when a
subscription is created (422) and again before deliveries (the verdict is
cached for `ttl` seconds), which narrows DNS rebinding to that window.
Redirects are never followed by the sender, so a public endpoint cannot
bounce a delivery to an internal one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

from fleetmesh.core.errors import FieldError
from fleetmesh.events.subscription import Endpoint, InvalidSubscription

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedDestination(Exception):
    """The endpoint's host is not allowed (private address) or does not resolve."""


def is_public(address: IpAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class HostGuard:
    """Resolves webhook hosts and refuses non-public ones (unless private ones are allowed)."""

    def __init__(self, *, allow_private: bool, ttl: float = 30.0) -> None:
        self.allow_private = allow_private
        self.ttl = ttl
        self._verdicts: dict[tuple[str, int], tuple[float, str | None]] = {}

    async def check(self, host: str, port: int) -> None:
        """Raise :class:`BlockedDestination` when deliveries to this host must not happen."""
        key = (host, port)
        cached = self._verdicts.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            problem = cached[1]
        else:
            problem = await self._problem(host, port)
            self._verdicts[key] = (now + self.ttl, problem)
        if problem is not None:
            raise BlockedDestination(problem)

    async def check_endpoint(self, endpoint: Endpoint) -> None:
        """The check at creation time: a 422 on the `endpoint` field."""
        if endpoint.host is None or endpoint.port is None:
            return
        try:
            await self.check(endpoint.host, endpoint.port)
        except BlockedDestination as error:
            raise InvalidSubscription([FieldError("endpoint", str(error), "blocked")]) from None

    async def _problem(self, host: str, port: int) -> str | None:
        try:
            literal: IpAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
            except (OSError, UnicodeError):
                return f"the host {host!r} does not resolve"
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
            if not addresses:
                return f"the host {host!r} does not resolve"
        if self.allow_private:
            return None
        blocked = sorted({str(a) for a in addresses if not is_public(a)})
        if blocked:
            return (
                f"the host {host!r} resolves to non-public addresses ({', '.join(blocked)}); "
                "start fleetmesh with --allow-private-webhooks to allow them"
            )
        return None
