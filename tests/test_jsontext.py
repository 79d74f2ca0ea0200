"""orjson on the hot path writes the standard library's bytes: cache keys hash them."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashcard_pipeline import jsontext
from flashcard_pipeline.llm.client import LLMClient
from flashcard_pipeline.llm.providers import ProviderName, resolve_provider
from flashcard_pipeline.llm.types import ChatMessage, ChatRequest
from flashcard_pipeline.models import FlashcardSet, TermAnalysis, strict_json_schema

EVERY_CHARACTER = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)

#: What the hot path writes: strings, integers, booleans, null, lists and string-keyed dicts (no floats).
FLOATLESS = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)


def stdlib(value: Any) -> tuple[str, str, str]:
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":")),
            json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True),
            json.dumps(value, ensure_ascii=False, sort_keys=True, indent=1))


def ours(value: Any) -> tuple[str, str, str]:
    return jsontext.compact(value), jsontext.canonical(value), jsontext.indented(value)


def test_every_character_is_written_as_the_standard_library_writes_it() -> None:
    value = {"text": EVERY_CHARACTER, "list": [EVERY_CHARACTER[:300], {"\n\"\\": EVERY_CHARACTER[-50:]}]}
    assert ours(value) == stdlib(value)


@given(FLOATLESS)
def test_any_floatless_value_is_written_as_the_standard_library_writes_it(value: Any) -> None:
    assert ours(value) == stdlib(value)


@pytest.mark.parametrize("value", [{"lone": "\ud800"}, [2**64], {"n": -2**63 - 1}, {1: "int key"}, {}, [], [[], {}]])
def test_what_orjson_refuses_is_written_by_the_standard_library(value: Any) -> None:
    assert ours(value) == stdlib(value)


def test_the_stages_answers_hold_no_floats() -> None:
    """The precondition of writing answers (and prompts that quote them) with orjson: floats would differ."""
    for model in (TermAnalysis, FlashcardSet):
        assert '"number"' not in json.dumps(strict_json_schema(model)), model


@pytest.mark.parametrize("text", ['{"a": 1, "a": [true, null, "학"]}', b'{"u": "\\ud55c"}', "[NaN, Infinity]",
                                  '{"big": 18446744073709551615}', '"\\u00e9"', "1e400",
                                  '{"x": 1}'.encode("utf-16")])
def test_loads_reads_what_the_standard_library_reads(text: str | bytes) -> None:
    assert repr(jsontext.loads(text)) == repr(json.loads(text))


@pytest.mark.parametrize("text", ["{", '{"a": 1,}', "<html>", b"\xff", ""])
def test_loads_refuses_what_the_standard_library_refuses_with_its_error(text: str | bytes) -> None:
    with pytest.raises(ValueError) as expected:
        json.loads(text)
    with pytest.raises(ValueError) as got:
        jsontext.loads(text)
    assert type(got.value) is type(expected.value) and str(got.value) == str(expected.value)


def test_a_request_body_is_what_httpx_would_send_floats_and_all() -> None:
    request = ChatRequest(model="m", temperature=1e-05, max_tokens=5,
                          messages=(ChatMessage("system", EVERY_CHARACTER[:2000]), ChatMessage("user", "학교\x01")),
                          params={"top_p": 0.9, "logit_bias": {"50256": -100.0}, "stop": ["\n"]},
                          response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True}},
                          extra_body={"usage": {"include": True}})
    client = LLMClient(resolve_provider(ProviderName.OPENAI_COMPATIBLE, base_url="http://x.invalid/v1", env={}))
    plain = request.to_body()
    for body in (plain, {"response_format": None, **plain}, {**plain, "response_format": None}):
        assert client._encode(body) == httpx.Request("POST", "http://x.invalid", json=body).content
