"""Where the pipeline tells an observer what it is doing: each item, stage, provider attempt and ledger batch.

The default :class:`RunHooks` does nothing, with one shared null context per call, so a run without telemetry
neither imports nor pays for OpenTelemetry. ``flashcard_pipeline.telemetry`` subclasses it with spans and metrics.
Each hook is a context manager around the work it names; what it yields (a :class:`Note`) takes what the pipeline
learns inside the block (a cache hit, the provider's answer, the item's outcome). An exception leaving the block is
the work's failure, except :class:`LeaseLost`, which says the work moved to another worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from flashcard_pipeline.resilience import CallNotMade

if TYPE_CHECKING:
    from flashcard_pipeline.errors import StructuredError
    from flashcard_pipeline.llm.types import ChatRequest, ChatResponse
    from flashcard_pipeline.models import VocabularyItem
    from flashcard_pipeline.resilience import CallContext


class LeaseLost(CallNotMade):
    """Raised before a paid call when this worker no longer holds the item's lease: the item is another worker's
    now, so the stage stops here without failing (no retry, no breaker verdict, no failure recorded, and the
    rate-limit slot goes back)."""


class Note:
    """What the pipeline reports inside a hook's block; this one forgets it."""

    __slots__ = ()

    def cache_hit(self, source: str) -> None:
        """The stage's answer came from ``source`` (``cache``, ``in_flight``, ``ledger``) instead of a call."""

    def cache_miss(self) -> None:
        """The stage's answer was not stored anywhere: it is asked for."""

    def answered(self, response: ChatResponse) -> None:
        """The attempt's provider answered (usage, finish reason, model)."""

    def flagged(self, problems: list[str]) -> None:
        """The answer was kept although it still fails content checks."""

    def failed(self, error: StructuredError) -> None:
        """The item failed with ``error`` (handled: the run goes on)."""

    def handed_over(self) -> None:
        """The item was dropped before a paid call: another worker holds its lease now and finishes it."""


NOTE = Note()
_NOTHING: AbstractContextManager[Note] = contextlib.nullcontext(NOTE)


class RunHooks:
    """The no-op hooks: every method returns the same null context."""

    def item(self, item: VocabularyItem) -> AbstractContextManager[Note]:
        return _NOTHING

    def stage(self, stage: str, item: VocabularyItem) -> AbstractContextManager[Note]:
        return _NOTHING

    def attempt(self, context: CallContext, request: ChatRequest, attempt: int) -> AbstractContextManager[Note]:
        """One call to the provider (``attempt`` counts from 1 for each stage request, re-asks included)."""
        return _NOTHING

    def ledger_batch(self, operations: int) -> AbstractContextManager[Note]:
        return _NOTHING

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Tasks started inside this block are housekeeping (breaker polls, limit publishing): not traced."""
        yield


NO_HOOKS = RunHooks()
