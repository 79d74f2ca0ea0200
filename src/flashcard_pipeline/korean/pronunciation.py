"""How a Korean word is said, computed from its spelling with ko-pron (the sound changes of standard
pronunciation: 학교 -> [학꾜], 같이 -> [가치]), so the card never depends on the model's memory of IPA."""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)
_NOT_HANGUL = re.compile(r"[^\uac00-\ud7a3]+")


@dataclass(frozen=True)
class Pronunciation:
    #: The word as it sounds, in Hangul (학꾜 for 학교); shown in brackets.
    hangul: str
    #: Revised Romanization of Korean, which follows the sound changes (hakgyo).
    romanization: str
    ipa: str


@functools.lru_cache(maxsize=8192)
def pronounce(text: str) -> Pronunciation | None:
    """The pronunciation of the Hangul in ``text`` (other characters are dropped), or None when there is no
    Hangul or ko-pron cannot read it."""
    from ko_pron import romanise

    words = [w for w in (_NOT_HANGUL.sub("", word) for word in text.split()) if w]
    if not words:
        return None
    spoken = " ".join(words)
    try:
        return Pronunciation(hangul=romanise(spoken, "ph"), romanization=romanise(spoken, "rr"),
                             ipa=romanise(spoken, "ipa"))
    except (IndexError, KeyError, ValueError) as exc:  # ko-pron's own failures on unusual syllable joins
        log.debug("ko-pron cannot read %r: %s", spoken, exc)
        return None
