"""The choices the command line offers (providers, export formats, sub-decks, audio), in a module that imports
nothing heavy: every command's ``--help`` needs them, and must not wait for httpx or genanki to load."""

from __future__ import annotations

from enum import StrEnum


class ProviderName(StrEnum):
    OPENROUTER = "openrouter"
    OPENAI_COMPATIBLE = "openai-compatible"
    SIMULATED = "simulated"


class ExportFormat(StrEnum):
    """Deck file formats; ``-o``'s extension picks one (``.txt`` is Anki's text format too)."""

    APKG = "apkg"
    TSV = "tsv"
    CSV = "csv"
    JSONL = "jsonl"


class Subdecks(StrEnum):
    """How notes are split below the deck: not at all, by part of speech, or by the input's level column."""

    NONE = "none"
    POS = "pos"
    LEVEL = "level"


class AudioEngine(StrEnum):
    ESPEAK = "espeak"
    OPENAI = "openai"
