"""The HTTP transport (httpx over aiohttp) against real sockets: every way a call fails is classed as httpx's own
transport classes it, so retries, breakers and the ledger see the same categories and codes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest

from flashcard_pipeline.errors import NetworkError, RequestTimeoutError
from flashcard_pipeline.llm.client import LLMClient
from flashcard_pipeline.llm.providers import ProviderName, resolve_provider
from flashcard_pipeline.llm.transport import AiohttpTransport
from flashcard_pipeline.llm.types import ChatMessage, ChatRequest
from flashcard_pipeline.simulator import SimulatorConfig, run_simulator

REQUEST = ChatRequest(model="m", messages=(ChatMessage("user", "hi"),))


def client_for(url: str, *, read_timeout: float = 5.0) -> LLMClient:
    return LLMClient(resolve_provider(ProviderName.OPENAI_COMPATIBLE, base_url=url, read_timeout=read_timeout,
                                      connect_timeout=2.0, env={}))


async def closing_server(reply: bytes = b"") -> tuple[asyncio.Server, str]:
    """A server that reads the request, sends ``reply`` (perhaps a cut response) and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def simulator_url() -> AsyncIterator[str]:
    async with run_simulator(SimulatorConfig()) as sim:
        yield sim.base_url


async def test_an_answer_comes_through_with_status_headers_and_body(simulator_url: str) -> None:
    transport = AiohttpTransport()
    async with httpx.AsyncClient(transport=transport) as http:
        response = await http.get(simulator_url + "/models")
        assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
        assert response.json()["data"][0]["id"] == "simulated/flashcard-sim"
        assert response.reason_phrase == "OK"


async def test_a_refused_connection_is_a_connect_error_not_a_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        async with client_for(f"http://127.0.0.1:{port}/v1") as client:
            with pytest.raises(NetworkError) as refused:
                await client.complete(REQUEST)
    assert refused.value.code == "connect_error"


async def test_a_server_that_hangs_up_is_a_protocol_error() -> None:
    server, url = await closing_server()
    async with server, client_for(url) as client:
        with pytest.raises(NetworkError) as dropped:
            await client.complete(REQUEST)
    assert dropped.value.code in {"protocol_error", "read_error"}


async def test_a_body_cut_short_is_a_read_error() -> None:
    server, url = await closing_server(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 500\r\n\r\n{\"choices\": [")
    async with server, client_for(url) as client:
        with pytest.raises(NetworkError) as cut:
            await client.complete(REQUEST)
    assert cut.value.code in {"read_error", "protocol_error"}


async def test_an_answer_slower_than_the_read_timeout_is_a_read_timeout() -> None:
    async with run_simulator(SimulatorConfig(hang_rate=1.0, hang_seconds=5)) as sim, \
            client_for(sim.base_url, read_timeout=0.2) as client:
        with pytest.raises(RequestTimeoutError) as slow:
            await client.complete(REQUEST)
    assert slow.value.code == "read_timeout"


def test_only_an_https_provider_loads_certificates() -> None:
    import ssl

    plain = client_for("http://127.0.0.1:9/v1")
    secure = client_for("https://example.invalid/v1")
    plain_ctx = plain._http._transport.ssl_context
    secure_ctx = secure._http._transport.ssl_context
    assert plain_ctx.verify_mode == ssl.CERT_NONE
    assert secure_ctx.verify_mode == ssl.CERT_REQUIRED and secure_ctx.cert_store_stats()["x509_ca"] > 0


async def capturing_server(answer: bytes) -> tuple[asyncio.Server, str, list[bytes]]:
    """A server that keeps each raw request (head and body) and answers ``answer``."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # a kept-alive connection carries the next request
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            seen.append(head + await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(answer)).encode() + b"\r\n\r\n" + answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", seen


ANSWER = (b'{"id": "r1", "model": "m", "choices": [{"message": {"content": "\xed\x95\x99"}, "finish_reason": "stop"}],'
          b' "usage": {"prompt_tokens": 3, "completion_tokens": 1}}')
SCHEMA_REQUEST = ChatRequest(model="m", messages=(ChatMessage("user", "학교"),),
                             response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True}})


async def test_the_owned_client_posts_what_httpx_would_send() -> None:
    """Owned clients post straight through the transport; the wire request is httpx's: its default headers merged
    with ours, the body byte for byte as ``json=`` encodes it (the response format serialised once)."""
    server, url, seen = await capturing_server(ANSWER)
    async with server:
        provider = resolve_provider(ProviderName.OPENAI_COMPATIBLE, base_url=url, api_key="sk-test", env={})
        async with LLMClient(provider) as client:
            assert client._direct is not None
            for _ in range(2):  # the second call uses the format's cached JSON
                answer = await client.complete(SCHEMA_REQUEST)
                assert answer.content == "학" and answer.usage.total_tokens == 4 and answer.status_code == 200
    expected_body = httpx.Request("POST", url, json=SCHEMA_REQUEST.to_body()).content
    for raw in seen:
        head, body = raw.split(b"\r\n\r\n", 1)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.decode().partition(":")
                                                                for line in head.split(b"\r\n")[1:])}
        assert head.startswith(b"POST /v1/chat/completions HTTP/1.1")
        assert body == expected_body
        assert headers["content-type"] == "application/json" and headers["authorization"] == "Bearer sk-test"
        assert headers["accept"] == "application/json" and headers["user-agent"] == "flashcard-pipeline"
        assert headers["accept-encoding"] == httpx.AsyncClient().headers["accept-encoding"]


async def test_an_injected_client_gets_the_same_body() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=ANSWER, headers={"content-type": "application/json"})

    provider = resolve_provider(ProviderName.OPENAI_COMPATIBLE, base_url="http://x.invalid/v1", env={})
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        client = LLMClient(provider, http=http)
        assert client._direct is None
        await client.complete(SCHEMA_REQUEST)
        await client.complete(SCHEMA_REQUEST)
    expected = httpx.Request("POST", "http://x.invalid", json=SCHEMA_REQUEST.to_body())
    assert [r.content for r in sent] == [expected.content] * 2
    assert all(r.headers["content-type"] == "application/json" for r in sent)
