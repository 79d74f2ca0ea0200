"""What one call carries through the policies: who it is for, and what the layers tell each other about it.

One :class:`CallContext` is made per request (both stages make their own) and passed to every policy of the
pipeline, outermost to innermost. Besides the identity the policies key on (provider and model) and log (stage,
item), it holds the little state the layers exchange during that one request: the seconds inner layers spent
waiting (so the retry deadline skips them), whether a retry loop already runs (so a nested one does not
multiply calls) and what the provider answered (so the limiter settles tokens and reads rate-limit headers).
A context belongs to one request at a time: share it between concurrent requests and they mix their state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


class CallNotMade(Exception):
    """Raised by a call that decided, before sending anything, not to be made (its work belongs to someone else
    now). Not a provider outcome: no retry, no breaker verdict, and the rate-limit slot it was granted goes back."""


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """What an attempt reports about a successful answer: the tokens the provider counted and its headers."""

    total_tokens: int
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class CallContext:
    """One request as the policies see it."""

    stage: str
    item_key: str
    provider: str
    model: str
    #: Prompt estimate plus ``max_tokens``: the most this call can draw from a token budget.
    estimated_tokens: int
    #: Run by a retry policy before each retry, outside every inner layer; an error it raises ends the loop
    #: (the pipeline's budget check: a retry costs money, but refusing it must not look like a provider outcome
    #: to a breaker or take a rate-limit slot).
    before_retry: Callable[[], None] | None = field(default=None, repr=False)
    #: Seconds inner policies held the request (an open circuit, a rate limit) since the retry loop began.
    paused: float = field(default=0.0, init=False, repr=False)
    #: True while a retry loop runs this request: a retry policy further in then calls straight through.
    retrying: bool = field(default=False, init=False, repr=False)
    #: What the last attempt's provider answered, if it reported it (see :meth:`report`).
    answer: ProviderAnswer | None = field(default=None, init=False, repr=False)
    #: ``(provider, model)``: the key of this call's pipeline.
    key: tuple[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = (self.provider, self.model)

    def record_pause(self, seconds: float) -> None:
        """An inner policy held the call for ``seconds``: waiting, not trying, so no retry deadline counts it."""
        if seconds > 0:
            self.paused += seconds

    def report(self, answer: ProviderAnswer) -> None:
        """The attempt tells the policies what the provider answered (usage, headers)."""
        self.answer = answer
