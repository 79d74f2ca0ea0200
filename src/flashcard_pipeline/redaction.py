"""Keeping secrets out of text: the one place that knows what an API key looks like once it is written down."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable

REDACTED = "***"

#: Key shapes caught even when the exact key is unknown to the process (a key pasted into a term, a header echoed
#: back by a proxy): OpenAI/OpenRouter ``sk-...`` keys and bearer tokens.
KEY_PATTERNS = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}|(?i:\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}")


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every occurrence of each secret (bare, ``Bearer``-prefixed, JSON- or URL-escaped) with ``***``.

    Applied to anything taken from a response, because providers sometimes echo the key back.
    """
    variants: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        escaped = json.dumps(secret)[1:-1]
        variants.update({secret, escaped, escaped.replace("/", "\\/"), urllib.parse.quote(secret, safe="")})
    for variant in sorted(variants, key=len, reverse=True):
        text = text.replace(f"Bearer {variant}", REDACTED).replace(variant, REDACTED)
    return text


#: A "key" shorter than this (``--api-key x`` for a local server) is no secret worth blanking every occurrence of
#: its letters in a log line for.
MIN_SECRET_CHARS = 6


def redact_all(text: str, secrets: Iterable[str | None]) -> str:
    """:func:`redact`, then anything shaped like a key: what a log line goes through before it is written."""
    return KEY_PATTERNS.sub(REDACTED, redact(text, (s for s in secrets if s and len(s) >= MIN_SECRET_CHARS)))
