"""httpx's API over aiohttp's connection pool.

httpx's own transport (httpcore) costs 1.7 ms of CPU per call at 8 calls in flight and 7.9 ms at 128: it scans
its pool for every request and detects the async library each time. The same client over aiohttp costs
0.8-1.0 ms whatever the concurrency (benchmarks/bench_overhead.py, docs/benchmarks.md). httpx-aiohttp provides the
transport; this subclass only makes its errors precise: upstream maps every ``ClientConnectionError`` to
``ConnectTimeout``, so a dropped connection or a refused one would be reported, and counted, as a timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport as _UpstreamTransport

#: Most specific first: the first class the aiohttp error is an instance of decides.
_PRECISE: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientConnectionError, httpx.NetworkError),
    (TimeoutError, httpx.ReadTimeout),
)


def precise_error(error: httpx.TransportError, request: httpx.Request) -> httpx.TransportError:
    """The httpx error that says what the aiohttp error behind ``error`` really was."""
    cause = error.__cause__
    for aiohttp_error, httpx_error in _PRECISE:
        if isinstance(cause, aiohttp_error):
            if isinstance(error, httpx_error) and type(error) is httpx_error:
                return error
            precise = httpx_error(str(cause) or type(cause).__name__, request=request)
            precise.__cause__ = cause
            return precise
    return error


class _PreciseStream(httpx.AsyncByteStream):
    """The response body, with the same precise errors while it is read."""

    def __init__(self, stream: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except httpx.TransportError as error:
            raise precise_error(error, self._request) from error.__cause__

    async def aclose(self) -> None:
        await self._stream.aclose()


class AiohttpTransport(_UpstreamTransport):
    """httpx-aiohttp's transport with errors mapped as httpx's own transport maps them."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.TransportError as error:
            raise precise_error(error, request) from error.__cause__
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _PreciseStream(response.stream, request)
        return response
