"""httpx's API over aiohttp's connection pool.

httpx's own transport (httpcore) costs 1.7 ms of CPU per call at 8 calls in flight and 7.9 ms at 128: it scans
its pool for every request and detects the async library each time. The same client over aiohttp costs
0.8-1.0 ms whatever the concurrency (benchmarks/bench_overhead.py, docs/benchmarks.md). httpx-aiohttp provides the
transport; this subclass only makes its errors precise: upstream maps every ``ClientConnectionError`` to
``ConnectTimeout``, so a dropped connection or a refused one would be reported, and counted, as a timeout.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport as _UpstreamTransport
from httpx_aiohttp.transport import map_aiohttp_exceptions

#: httpx's own logger: a post that skips httpx's client still writes the line httpx would (``httpx=INFO``).
_httpx_log = logging.getLogger("httpx")

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

    async def post(self, url: str, content: bytes, headers: Mapping[str, str],
                   timeouts: aiohttp.ClientTimeout) -> httpx.Response:
        """What ``httpx.AsyncClient.post`` answers through this transport, without httpx's client layer: the same
        request on the wire (the caller gives the client's merged headers), the same errors, the body read whole.

        The layer costs about half a millisecond of CPU a call (URL and header merging, cookie extraction, three
        stream wrappers), a fifth of what a pipeline call costs at 8 in flight (docs/benchmarks.md)."""
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        try:
            with map_aiohttp_exceptions():
                async with self.client.request("POST", url, headers=headers, data=content, allow_redirects=False,
                                               auto_decompress=False, compress=False, timeout=timeouts) as answer:
                    body = await answer.read()
        except httpx.TransportError as error:
            raise precise_error(error, httpx.Request("POST", url)) from error.__cause__
        extensions = {"http_version": b"HTTP/1.1"}
        if answer.reason:
            extensions["reason_phrase"] = answer.reason.encode()
        # httpx decodes a compressed body here, as it does for its own client (auto_decompress is off above).
        response = httpx.Response(answer.status, headers=answer.raw_headers, content=body, extensions=extensions)
        if _httpx_log.isEnabledFor(logging.INFO):
            _httpx_log.info('HTTP Request: POST %s "HTTP/1.1 %d %s"', url, answer.status, answer.reason or "")
        return response
