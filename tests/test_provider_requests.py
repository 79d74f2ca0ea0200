"""Bodies and headers every named provider accepts: reasoning models, OpenRouter routing and ``--param``.

The wire is captured with ``httpx.MockTransport``; nothing leaves the process.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.llm import (
    ChatMessage,
    ChatRequest,
    LLMClient,
    ModelKind,
    ProviderConfig,
    capabilities_for,
    estimate_request_tokens,
    model_kind_of,
    parse_model_kind,
    resolve_provider,
)
from flashcard_pipeline.models import VocabularyItem
from flashcard_pipeline.prompts import PromptTemplate
from flashcard_pipeline.stages import (
    StageRequest,
    StageSettings,
    build_nuance_request,
    cache_key_for,
    parse_params,
    sha256_text,
)

TEMPLATE = PromptTemplate(version="nuance.test", system="Teach $language to $learner_language speakers.",
                          user="<input>$input_json</input>", temperature=0.2, max_tokens=800)
ITEM = VocabularyItem(position=1, term="학교", type="noun")
ANSWER = {"id": "gen-1", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant", "content": "{}"}}],
          "usage": {"prompt_tokens": 10, "completion_tokens": 5, "cost": 0.00042}}

Sent = list[httpx.Request]


def settings(provider: str, model: str, **changes: Any) -> StageSettings:
    return StageSettings(provider=provider, model=model, nuance_prompt=TEMPLATE, **changes)


def openai() -> ProviderConfig:
    return resolve_provider("openai-compatible", base_url="https://api.openai.com/v1", api_key="sk-test", env={})


def openrouter() -> ProviderConfig:
    return resolve_provider("openrouter", api_key="sk-or-test", env={})


@pytest.fixture
async def send() -> AsyncIterator[Callable[..., Any]]:
    """``await send(provider, request)`` -> (the captured HTTP request, its JSON body, the parsed response)."""
    opened: list[httpx.AsyncClient] = []

    async def call(provider: ProviderConfig, request: ChatRequest) -> tuple[httpx.Request, dict[str, Any], Any]:
        seen: Sent = []

        def handler(sent: httpx.Request) -> httpx.Response:
            seen.append(sent)
            return httpx.Response(200, json=ANSWER)

        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        opened.append(http)
        response = await LLMClient(provider, http=http).complete(request)
        (sent,) = seen
        return sent, json.loads(sent.content), response

    yield call
    for http in opened:
        await http.aclose()


def nuance(stage_settings: StageSettings) -> StageRequest:
    return build_nuance_request(ITEM, stage_settings)


# --- the capability table ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [
    "o1", "o1-mini", "o1-preview", "o3", "o3-mini", "o3-pro", "o4-mini", "o4-mini-2025-04-16", "openai/o3",
    "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5-2025-08-07", "gpt-5.1", "openai/gpt-5-mini", "GPT-5",
    "gpt-5-chat-latest",
])
def test_reasoning_models_by_name(model: str) -> None:
    assert model_kind_of(model) is ModelKind.REASONING


@pytest.mark.parametrize("model", [
    "gpt-4o", "gpt-4o-mini", "openai/gpt-4o-mini", "gpt-4.1", "openai/gpt-4.1-mini", "gpt-3.5-turbo",
    "omni-moderation-latest", "anthropic/claude-sonnet-4", "llama3.1:8b", "simulated/flashcard-sim",
])
def test_other_models_are_chat_models(model: str) -> None:
    assert model_kind_of(model) is ModelKind.CHAT


def test_reasoning_capabilities_depend_on_the_provider() -> None:
    for provider in ("openai-compatible", "simulated"):
        caps = capabilities_for(provider, "o3")
        assert (caps.token_parameter, caps.supports_temperature) == ("max_completion_tokens", False)
    on_openrouter = capabilities_for("openrouter", "openai/o3")
    assert (on_openrouter.token_parameter, on_openrouter.supports_temperature) == ("max_tokens", False)
    assert capabilities_for("openai-compatible", "gpt-4o-mini").supports_temperature


def test_the_kind_overrides_the_table() -> None:
    assert capabilities_for("openai-compatible", "gpt-5", "chat").token_parameter == "max_tokens"
    assert capabilities_for("openai-compatible", "my-azure-deployment",
                            ModelKind.REASONING).token_parameter == "max_completion_tokens"
    assert parse_model_kind(" Reasoning ") is ModelKind.REASONING
    with pytest.raises(ConfigurationError, match="--model-kind"):
        parse_model_kind("thinking")


# --- OpenAI reasoning models ------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["o3", "gpt-5"])
async def test_openai_reasoning_model_gets_max_completion_tokens_and_no_temperature(send, model: str) -> None:
    _, body, _ = await send(openai(), nuance(settings("openai-compatible", model)).request)
    assert body["max_completion_tokens"] == 800
    assert "max_tokens" not in body and "temperature" not in body
    assert "provider" not in body


async def test_openai_chat_model_keeps_max_tokens_and_temperature(send) -> None:
    _, body, _ = await send(openai(), nuance(settings("openai-compatible", "gpt-4o-mini")).request)
    assert (body["max_tokens"], body["temperature"]) == (800, 0.2)
    assert "max_completion_tokens" not in body


async def test_chat_kind_override_sends_max_tokens_to_a_gpt5_model(send) -> None:
    staged = nuance(settings("openai-compatible", "gpt-5", model_kind="chat"))
    _, body, _ = await send(openai(), staged.request)
    assert (body["max_tokens"], body["temperature"]) == (800, 0.2)
    assert "max_completion_tokens" not in body


def test_the_token_budget_is_one_field_whatever_its_wire_name() -> None:
    reasoning = nuance(settings("openai-compatible", "o3")).request
    chat = nuance(settings("openai-compatible", "o3", model_kind="chat")).request
    assert reasoning.max_tokens == chat.max_tokens == 800
    assert estimate_request_tokens(reasoning) == estimate_request_tokens(chat)


# --- OpenRouter ---------------------------------------------------------------------------------------


async def test_openrouter_schema_request_requires_parameters_attributes_the_app_and_reads_cost(send) -> None:
    staged = nuance(settings("openrouter", "openai/gpt-4o-mini"))
    sent, body, response = await send(openrouter(), staged.request)
    assert body["response_format"]["type"] == "json_schema"
    assert body["provider"] == {"require_parameters": True}
    assert "usage" not in body
    assert sent.headers["http-referer"].startswith("https://")
    assert sent.headers["x-openrouter-title"] == "flashcard-pipeline"
    assert "x-title" not in sent.headers
    assert response.usage.cost_usd == pytest.approx(0.00042)


async def test_openrouter_reasoning_model_keeps_max_tokens_but_loses_temperature(send) -> None:
    _, body, _ = await send(openrouter(), nuance(settings("openrouter", "openai/gpt-5-mini")).request)
    assert body["max_tokens"] == 800
    assert "temperature" not in body and "max_completion_tokens" not in body


def test_routing_preferences_merge_with_require_parameters_and_an_explicit_false_wins() -> None:
    merged = nuance(settings("openrouter", "openai/gpt-4o-mini", params={"provider": {"order": ["openai"]}}))
    assert merged.request.to_body()["provider"] == {"require_parameters": True, "order": ["openai"]}
    declined = nuance(settings("openrouter", "openai/gpt-4o-mini",
                               params={"provider": {"require_parameters": False}}))
    assert declined.request.to_body()["provider"] == {"require_parameters": False}


def test_openrouter_cache_key_is_the_one_main_computed() -> None:
    """Dropping ``usage.include`` and adding ``require_parameters`` must not orphan cached answers."""
    schema = {"type": "json_schema", "json_schema": {"name": "term_analysis", "strict": True,
                                                     "schema": {"type": "object"}}}
    request = ChatRequest(model="openai/gpt-4o-mini", response_format=schema, temperature=0.2, max_tokens=800,
                          messages=(ChatMessage("system", "Teach Korean."), ChatMessage("user", "학교")),
                          require_parameters=True)
    # Computed by cache_key_for on main (7481594), with extra_body={"usage": {"include": True}}.
    assert cache_key_for("openrouter", request, "nuance.v1") == (
        "114dbff22f2fb955692099cadf2edff64a8f7b24dfd07997e1f5247460df6081")
    assert cache_key_for("openrouter", request, "nuance.v1", upstream="abc") == (
        "0b5ae93d98ef8913ba2df62e02eef2e6aa0626210ef6fec0ac8357d0a043e011")


def test_openrouter_stage_key_follows_mains_formula() -> None:
    staged = nuance(settings("openrouter", "openai/gpt-4o-mini", extra_body={}))
    request = staged.request
    mains_body = {"model": request.model, "messages": [m.to_dict() for m in request.messages],
                  "temperature": 0.2, "max_tokens": 800, "response_format": request.response_format}
    material = {"provider": "openrouter", "prompt_version": "nuance.test", "body": mains_body, "upstream": None}
    expected = sha256_text(json.dumps(material, ensure_ascii=False, sort_keys=True, separators=(",", ":")))
    assert staged.cache_key == expected


# --- --param ------------------------------------------------------------------------------------------


def test_param_values_are_json_when_they_parse_else_strings() -> None:
    params = parse_params(["seed=7", "top_p=0.9", 'reasoning={"effort":"high"}', "x=true",
                           "reasoning_effort=high", "stop=[\"END\"]", "label=NaN", " seed = 8"])
    assert params == {"seed": 8, "top_p": 0.9, "reasoning": {"effort": "high"}, "x": True,
                      "reasoning_effort": "high", "stop": ["END"], "label": "NaN"}
    assert parse_params([]) == {}


@pytest.mark.parametrize("pair", ["seed", "=7", "  =7", ""])
def test_param_without_key_or_equals_is_a_one_line_error(pair: str) -> None:
    with pytest.raises(ConfigurationError, match="--param") as info:
        parse_params([pair])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["model", "messages", "response_format", "stream", "n", "max_tokens",
                                 "max_completion_tokens"])
def test_params_cannot_replace_what_the_pipeline_sends(key: str) -> None:
    with pytest.raises(ConfigurationError, match=f"--param cannot set {key}"):
        parse_params([f"{key}=1"])
    with pytest.raises(ConfigurationError):
        StageSettings(provider="openrouter", model="m", params={key: 1})


def test_provider_param_must_be_an_object() -> None:
    with pytest.raises(ConfigurationError, match="--param provider"):
        parse_params(["provider=fast"])


async def test_params_reach_the_body_and_may_set_temperature(send) -> None:
    params = parse_params(["top_p=0.9", "seed=7", "reasoning_effort=high", "temperature=1"])
    _, body, _ = await send(openai(), nuance(settings("openai-compatible", "gpt-5", params=params)).request)
    assert {k: body[k] for k in params} == {"top_p": 0.9, "seed": 7, "reasoning_effort": "high", "temperature": 1}
    assert body["max_completion_tokens"] == 800


def test_params_are_part_of_the_cache_key_in_any_order() -> None:
    def key(*pairs: str) -> str:
        return nuance(settings("openrouter", "openai/gpt-4o-mini", params=parse_params(pairs))).cache_key

    assert key("seed=7", "top_p=0.9") == key("top_p=0.9", "seed=7")
    assert len({key(), key("seed=7"), key("seed=8"), key("seed=7", "top_p=0.9"),
                key('provider={"order":["openai"]}')}) == 5


def test_run_key_material_is_empty_by_default_and_carries_params_and_reasoning() -> None:
    assert settings("openrouter", "openai/gpt-4o-mini").run_key_material == {}
    assert settings("openrouter", "openai/gpt-4o-mini", params={"seed": 7}).run_key_material == {
        "params": {"seed": 7}}
    reasoning = settings("openai-compatible", "o3").run_key_material
    assert reasoning == {"capabilities": {"token_parameter": "max_completion_tokens", "temperature": False}}
    assert settings("openai-compatible", "o3", model_kind="chat").run_key_material == {}
    assert dataclasses.replace(settings("openai-compatible", "o3"), model_kind="reasoning").model_kind is (
        ModelKind.REASONING)
