"""Hanja readings from the ``hanja`` package's dictionary: does a Hanja spelling read as the Korean word?

The dictionary gives each character one reading. Two things make a correct spelling read otherwise, and both
are accepted: the initial-sound rule (力 is 력, but 역 at the start of 역사; 女 is 녀 but 여 in 여자), and the
handful of common characters with more than one reading (不 is 불 or 부, 車 차 or 거).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

_FIRST, _LAST = 0xAC00, 0xD7A3
_RIEUL, _NIEUN, _IEUNG = 5, 2, 11
#: Common characters whose second reading the one-reading dictionary lacks.
ALTERNATE_READINGS: dict[str, tuple[str, ...]] = {
    "不": ("부",), "車": ("거",), "金": ("김",), "樂": ("악", "요"), "行": ("항",), "度": ("탁",),
    "北": ("배",), "說": ("세", "열"), "便": ("변",), "復": ("부",), "省": ("생",), "惡": ("오",),
    "易": ("이",), "切": ("체",), "識": ("지",), "率": ("률",), "宅": ("댁",), "見": ("현",), "更": ("갱",),
    "參": ("삼",), "茶": ("차",), "數": ("삭",), "降": ("항",), "洞": ("통",),
}


def _package_table_path() -> Path | None:
    """The ``hanja`` package's table file, found without importing ``hanja.table`` (which loads it with PyYAML)."""
    spec = importlib.util.find_spec("hanja")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "table.yml"


def load_table(path: Path | None) -> dict[str, Any]:
    """The table at ``path``. Each of its lines is ``"\\u4E00": "\\uC77C"``, which is JSON as well as YAML: read
    as JSON it loads in about 30 ms instead of 0.7 s of PyYAML. A file JSON cannot read (a comment, another
    layout in a later release) is left to the package's own loader."""
    if path is not None:
        try:
            lines = (line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            table = json.loads("{" + ",".join(lines) + "}")
            if isinstance(table, dict):
                return table
        except (OSError, UnicodeDecodeError, ValueError):
            pass
    from hanja import table as package

    return package.hanja_table


@functools.cache
def _table() -> dict[str, Any]:
    return load_table(_package_table_path())


def reading_of(char: str) -> str | None:
    """The dictionary reading of one Hanja character, or None when it is not in the dictionary."""
    value = _table().get(char)
    return value if isinstance(value, str) and value else None


def _initial_variants(syllable: str) -> set[str]:
    """The syllable under the initial-sound rule: ㄹ -> ㄴ or ㅇ, ㄴ -> ㅇ."""
    code = ord(syllable) - _FIRST
    if not 0 <= code <= _LAST - _FIRST:
        return {syllable}
    initial, rest = divmod(code, 21 * 28)
    swaps = {_RIEUL: (_NIEUN, _IEUNG), _NIEUN: (_IEUNG,)}.get(initial, ())
    return {syllable} | {chr(_FIRST + new * 21 * 28 + rest) for new in swaps}


def readings(char: str) -> set[str]:
    """Every syllable ``char`` may be read as in a word; empty for a character the dictionary lacks."""
    base = reading_of(char)
    if base is None:
        return set()
    found: set[str] = set()
    for reading in (base, *ALTERNATE_READINGS.get(char, ())):
        found |= _initial_variants(reading)
    return found


def check_hanja(hanja: str, syllables: str) -> str | None:
    """None when ``hanja`` reads as ``syllables`` character by character, else why not (one line)."""
    chars = [c for c in hanja if not c.isspace()]
    target = [s for s in syllables if not s.isspace()]
    if len(chars) != len(target):
        return (f"Hanja {hanja} has {len(chars)} characters but {syllables} has {len(target)} syllables")
    for char, syllable in zip(chars, target, strict=True):
        options = readings(char)
        if not options:
            return f"{char} (in {hanja}) is not a Hanja character the dictionary knows"
        if syllable not in options:
            return f"{char} (in {hanja}) reads {reading_of(char)}, not {syllable} (of {syllables})"
    return None
