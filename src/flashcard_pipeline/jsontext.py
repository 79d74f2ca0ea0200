"""JSON text on the hot path (prompts, cache keys, request bodies, answers), written and read by orjson, byte for
byte what the standard library gives.

Cache keys are hashes of JSON text: a byte that changed would make every cached answer a miss, paid again. orjson
writes strings, 64-bit integers, booleans, null, lists and string-keyed dicts exactly as ``json.dumps(...,
ensure_ascii=False)`` does (every code point is tested), about ten times faster; floats are where they part (1e-05
against 0.00001). So these functions take values without floats (messages, the stages' answers: their schemas have
no number), and fall back to the standard library for whatever orjson refuses (a lone surrogate, an integer wider
than 64 bits), which then writes or raises exactly as before.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["canonical", "compact", "indented", "loads", "standard_canonical", "standard_compact"]

#: The standard library's writers: for values that may hold floats (generation parameters), and for what orjson
#: refuses. One encoder each: ``json.dumps`` with options builds a new one per call. Like httpx's ``json=``, the
#: compact one refuses NaN and infinity.
_CANONICAL = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def standard_canonical(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))``, floats and all."""
    return _CANONICAL.encode(value)


def standard_compact(value: Any) -> str:
    """``value`` as httpx's ``json=`` writes it (compact, non-ASCII kept, NaN refused), floats and all."""
    return _COMPACT.encode(value)


def compact(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"))``, for a value without floats."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError
        return _COMPACT.encode(value)


def canonical(value: Any) -> str:
    """:func:`compact` with keys sorted: what cache keys hash."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return _CANONICAL.encode(value)


def indented(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, sort_keys=True, indent=1)``, for a value without floats: how
    prompts show their input. orjson indents by two; each line's leading spaces are halved (a string cannot hold a
    raw line break, so every line starts with indentation only)."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, indent=1)
    lines = text.split("\n")
    return "\n".join([line[(len(line) - len(line.lstrip(" "))) // 2:] for line in lines])


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``: orjson first, the standard library for what it refuses (NaN, Infinity, numbers out of
    a float's range, other encodings than UTF-8), so that the same documents are accepted and rejected, with the
    same error. One difference is left: an integer wider than 64 bits comes back as a float."""
    try:
        return orjson.loads(text)
    except ValueError:  # orjson.JSONDecodeError
        return json.loads(text)
