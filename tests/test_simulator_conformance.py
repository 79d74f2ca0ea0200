"""The simulator driven by the official ``openai`` SDK: every answer and error it sends must parse the way the SDK
expects from the real provider, in both dialects (``flavor``) the simulator speaks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from flashcard_pipeline.models import TermAnalysis
from flashcard_pipeline.simulator import MODEL_IDS, Flavor, Simulator, SimulatorConfig, run_simulator
from tests.test_simulator import FakeClock, RecordingSleep, analysis_body

FLAVORS: tuple[Flavor, ...] = ("openai", "openrouter")
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}
OPENROUTER_ERROR_FIELDS = {"code", "message", "metadata"}


@contextlib.asynccontextmanager
async def sdk(flavor: Flavor, **config: Any) -> AsyncIterator[tuple[Simulator, openai.AsyncOpenAI]]:
    """The simulator with an SDK client that never retries, so each call shows exactly one response."""
    sleep = RecordingSleep()
    async with run_simulator(SimulatorConfig(flavor=flavor, **config), clock=FakeClock(), sleep=sleep) as sim:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="test", max_retries=0, timeout=10.0)
        try:
            yield sim, client
        finally:
            await client.close()


async def create(client: openai.AsyncOpenAI, **extra: Any) -> Any:
    body = analysis_body()
    return await client.chat.completions.create(model="simulated/flashcard-sim", messages=body["messages"],
                                                response_format=body["response_format"], **extra)


def assert_shape(flavor: Flavor, error: openai.APIStatusError) -> None:
    """The SDK hands over the inner ``error`` object; it must hold exactly the simulated provider's fields."""
    assert isinstance(error.body, dict)
    if flavor == "openai":
        assert set(error.body) == OPENAI_ERROR_FIELDS
        assert error.type == error.body["type"]
    else:
        assert set(error.body) == OPENROUTER_ERROR_FIELDS
        assert error.body["code"] == error.status_code
        assert isinstance(error.body["metadata"], dict)
        assert error.type is None


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_structured_completion_parses_with_usage(flavor: Flavor) -> None:
    async with sdk(flavor) as (_sim, client):
        completion = await create(client)
    assert isinstance(completion, ChatCompletion)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert TermAnalysis.model_validate_json(choice.message.content or "").term == "내가"
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.model == "simulated/flashcard-sim"


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_models_list_and_retrieve(flavor: Flavor) -> None:
    async with sdk(flavor) as (_sim, client):
        page = await client.models.list()
        model = await client.models.retrieve(MODEL_IDS[0])
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("no-such-model")
    assert [m.id for m in page.data] == list(MODEL_IDS)
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in page.data)
    assert model.id == MODEL_IDS[0]
    assert_shape(flavor, missing.value)
    if flavor == "openai":
        assert (missing.value.code, missing.value.param) == ("model_not_found", "model")


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_bad_request_is_a_bad_request_error(flavor: Flavor) -> None:
    async with sdk(flavor) as (sim, client):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="simulated/flashcard-sim", messages=[])
        assert sim.stats().outcomes["bad_request"] == 1
    error = info.value
    assert_shape(flavor, error)
    assert "messages" in error.message
    if flavor == "openai":
        assert (error.type, error.param, error.code) == ("invalid_request_error", "messages", "invalid_request")
    else:
        assert error.body == {"code": 400, "message": json.loads(error.response.text)["error"]["message"],
                              "metadata": {"param": "messages"}}


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_streaming_is_refused_with_a_bad_request_error(flavor: Flavor) -> None:
    async with sdk(flavor) as (sim, client):
        with pytest.raises(openai.BadRequestError) as info:
            await create(client, stream=True)
        assert sim.stats().outcomes["bad_request"] == 1
        assert sim.stats().outcomes["ok"] == 0
    error = info.value
    assert_shape(flavor, error)
    assert "stream" in error.message and "not supported" in error.message
    if flavor == "openai":
        assert (error.type, error.param, error.code) == ("invalid_request_error", "stream", "unsupported_parameter")
    else:
        assert error.body["metadata"] == {"param": "stream"}


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_an_injected_429_is_a_rate_limit_error_with_retry_after(flavor: Flavor) -> None:
    async with sdk(flavor, rate_limit_rate=1.0, retry_after_seconds=7) as (_sim, client):
        with pytest.raises(openai.RateLimitError) as info:
            await create(client)
    error = info.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "7"
    assert_shape(flavor, error)
    if flavor == "openai":
        assert (error.type, error.code, error.param) == ("rate_limit_error", "rate_limit_exceeded", None)
    else:
        assert error.body["metadata"]["provider_name"]


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_real_limit_429_is_a_rate_limit_error_with_retry_after(flavor: Flavor) -> None:
    async with sdk(flavor, requests_per_minute=1) as (_sim, client):
        await create(client)
        with pytest.raises(openai.RateLimitError) as info:
            await create(client)
    error = info.value
    headers = error.response.headers
    assert headers["retry-after"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert_shape(flavor, error)
    if flavor == "openai":
        assert (error.type, error.code) == ("rate_limit_error", "rate_limit_exceeded")
    else:
        assert error.body["metadata"]["headers"]["Retry-After"] == "60"


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_5xx_is_an_internal_server_error(flavor: Flavor) -> None:
    async with sdk(flavor, server_error_rate=1.0) as (_sim, client):
        with pytest.raises(openai.InternalServerError) as info:
            await create(client)
    error = info.value
    assert error.status_code in (500, 502, 503)
    assert_shape(flavor, error)
    if flavor == "openai":
        assert (error.type, error.code, error.param) == ("server_error", None, None)
    else:
        assert error.body["metadata"]["provider_name"]


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_unknown_paths_and_methods_get_json_errors(flavor: Flavor) -> None:
    async with sdk(flavor) as (_sim, client):
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.embeddings.create(model="simulated/flashcard-sim", input="사과")
        with pytest.raises(openai.APIStatusError) as method:
            await client.get("/chat/completions", cast_to=object)
    assert_shape(flavor, unknown.value)
    assert "POST /v1/embeddings" in unknown.value.message
    assert method.value.status_code == 405
    assert method.value.response.headers["allow"] == "POST"
    assert_shape(flavor, method.value)
