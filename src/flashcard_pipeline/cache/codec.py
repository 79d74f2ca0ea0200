"""How cached values are stored: as they are, zlib, or zlib with a shipped preset dictionary.

The codec name is stored with every entry, so entries written with any codec stay readable
whatever the current settings are. A preset dictionary (trained on realistic stage answers by
benchmarks/train_cache_dictionary.py) is what makes short JSON answers shrink: plain zlib
barely compresses a 900-byte answer, because the redundancy is across answers, not within one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

IDENTITY = "identity"
ZLIB = "zlib"
DICTIONARY_NAME = "stage-v1"
ZLIB_DICT = f"zlib+{DICTIONARY_NAME}"


class CodecError(ValueError):
    """A stored value cannot be decoded (unknown codec or corrupt bytes): treat it as a miss."""


@cache
def _dictionary(name: str) -> bytes:
    return resources.files(__package__).joinpath("dictionaries", f"{name}.zdict").read_bytes()


@cache
def _primed(level: int, name: str) -> Any:
    """A compressor that has read the preset dictionary: each value compresses with a copy of it (the same bytes as
    a fresh one), since reading 32 KiB of dictionary cost more than compressing the answer."""
    return zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, _dictionary(name))


@dataclass(frozen=True)
class Codec:
    enabled: bool = True
    level: int = 6
    min_bytes: int = 256
    use_dictionary: bool = True

    def encode(self, raw: bytes) -> tuple[str, bytes]:
        """(codec name, stored bytes); compression is kept only when it actually saves space."""
        if not self.enabled or len(raw) < self.min_bytes:
            return IDENTITY, raw
        if self.use_dictionary:
            compressor = _primed(self.level, DICTIONARY_NAME).copy()
            name, stored = ZLIB_DICT, compressor.compress(raw) + compressor.flush()
        else:
            name, stored = ZLIB, zlib.compress(raw, self.level)
        return (name, stored) if len(stored) < len(raw) else (IDENTITY, raw)

    @staticmethod
    def decode(name: str, stored: bytes) -> bytes:
        try:
            if name == IDENTITY:
                return stored
            if name == ZLIB:
                return zlib.decompress(stored)
            if name.startswith("zlib+"):
                decompressor = zlib.decompressobj(-15, _dictionary(name.removeprefix("zlib+")))
                return decompressor.decompress(stored) + decompressor.flush()
        except (zlib.error, FileNotFoundError) as exc:
            raise CodecError(f"cannot decode a {name} value: {exc}") from exc
        raise CodecError(f"unknown codec {name!r}")
