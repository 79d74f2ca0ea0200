"""The recovery registry: what the pipeline does about a failure beyond retrying it, per error code or category.

Two kinds of strategy, applied at two moments:

* while the retry policy still tries (how the next call is asked): ``reask_with_errors`` sends the failed answer
  back with the validation errors quoted; ``larger_budget`` gives a call cut off by ``max_tokens``
  (``finish_reason: length``) a larger output budget, once;
* once the retry policy has given up (what happens to the item): ``fallback_model`` hands it to the next model of
  the chain; ``quarantine`` sets an item whose answers keep failing validation aside with its last answer.

A code's entry wins over its category's; ``none`` switches recovery off for one. Every application is logged on
``flashcard_pipeline.recovery`` and counted in the run's metrics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from flashcard_pipeline.errors import StructuredError

log = logging.getLogger("flashcard_pipeline.recovery")


class Strategy(StrEnum):
    REASK_WITH_ERRORS = "reask_with_errors"
    LARGER_BUDGET = "larger_budget"
    FALLBACK_MODEL = "fallback_model"
    QUARANTINE = "quarantine"


R, B, F, Q = Strategy.REASK_WITH_ERRORS, Strategy.LARGER_BUDGET, Strategy.FALLBACK_MODEL, Strategy.QUARANTINE

#: The shipped registry. Keys are error codes or categories (docs/troubleshooting.md lists both).
DEFAULT_STRATEGIES: Mapping[str, tuple[Strategy, ...]] = MappingProxyType({
    "malformed_json": (R, Q),
    "schema_violation": (R, Q),
    "truncated_output": (B, F),
    "external_service": (F,),
    "network": (F,),
    "timeout": (F,),
    "rate_limit": (F,),
    "circuit_open": (F,),
    "not_found": (F,),
})

_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


def parse_strategies(text: str) -> dict[str, tuple[Strategy, ...]]:
    """``schema_violation=reask_with_errors+quarantine, timeout=none`` -> {key: strategies} (``none``: empty).
    Raises ValueError naming the bad part."""
    found: dict[str, tuple[Strategy, ...]] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not _KEY.match(key):
            raise ValueError(f"expected CODE_OR_CATEGORY=STRATEGY[+STRATEGY], got {part!r}")
        names = [name.strip().lower() for name in value.split("+") if name.strip()]
        if names == ["none"]:
            found[key] = ()
            continue
        try:
            found[key] = tuple(Strategy(name) for name in names)
        except ValueError:
            known = ", ".join(s.value for s in Strategy)
            raise ValueError(f"{part!r}: the strategies are {known} (or none)") from None
        if not found[key]:
            raise ValueError(f"{part!r}: no strategy named (use none to switch recovery off)")
    return found


@dataclass(frozen=True)
class RecoveryPlan:
    """The registry in effect: strategies per code or category, the fallback chain and the budget rule."""

    strategies: Mapping[str, tuple[Strategy, ...]] = field(default_factory=lambda: dict(DEFAULT_STRATEGIES))
    #: Models that take an item over, in order, when the run's model cannot answer it.
    fallback_models: tuple[str, ...] = ()
    #: ``larger_budget`` multiplies ``max_tokens`` by this, up to ``max_output_tokens``.
    budget_factor: float = 2.0
    max_output_tokens: int = 16384

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, tuple[Strategy, ...]] | None = None, **kwargs: object
                       ) -> RecoveryPlan:
        return cls(strategies={**DEFAULT_STRATEGIES, **(overrides or {})}, **kwargs)  # type: ignore[arg-type]

    def for_error(self, error: StructuredError) -> tuple[Strategy, ...]:
        """The error's strategies: its code's entry, else its category's, else none."""
        found = self.strategies.get(error.code)
        if found is None:
            found = self.strategies.get(error.category.value, ())
        return found

    def wants(self, strategy: Strategy, error: StructuredError) -> bool:
        return strategy in self.for_error(error)

    def larger_budget(self, max_tokens: int) -> int:
        return min(self.max_output_tokens, max(max_tokens + 1, int(max_tokens * self.budget_factor)))


def describe(plan: RecoveryPlan) -> dict[str, str]:
    """The registry as ``{key: "a+b"}`` (``none`` for an empty entry), for the run's metrics and `config show`."""
    return {key: "+".join(s.value for s in value) or "none" for key, value in sorted(plan.strategies.items())}
