"""An httpx transport that tries several base URLs in turn (replicated control services)."""

from __future__ import annotations

import httpx


class FailoverTransport(httpx.AsyncBaseTransport):
    """Sends each request to the first of `urls` that accepts a connection.

    The request's own host is replaced; the one that answered last is tried
    first next time. Only connection failures move on (the request never
    reached a server), so nothing is sent twice.
    """

    def __init__(self, urls: list[str]) -> None:
        if not urls:
            raise ValueError("FailoverTransport needs at least one URL")
        self.urls = [httpx.URL(url) for url in urls]
        self._inner = httpx.AsyncHTTPTransport()
        self._preferred = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        last_error: Exception | None = None
        for offset in range(len(self.urls)):
            index = (self._preferred + offset) % len(self.urls)
            target = self.urls[index]
            request.url = request.url.copy_with(
                scheme=target.scheme, host=target.host, port=target.port
            )
            try:
                response = await self._inner.handle_async_request(request)
            except httpx.ConnectError as error:
                last_error = error
                continue
            self._preferred = index
            return response
        assert last_error is not None
        raise last_error

    async def aclose(self) -> None:
        await self._inner.aclose()
