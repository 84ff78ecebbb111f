"""Ports: a default that is taken is replaced by a free one; an explicit one must be free."""

from __future__ import annotations

import socket


class PortInUse(RuntimeError):
    """A port given explicitly is taken."""


def is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def choose_port(host: str, requested: int | None, default: int, *, what: str) -> int:
    """The port to listen on: the requested one (must be free), else the default or a free one."""
    if requested is not None and requested != 0:
        if not is_free(host, requested):
            raise PortInUse(f"{what} port {requested} on {host} is already in use")
        return requested
    if requested is None and is_free(host, default):
        return default
    return free_port(host)
