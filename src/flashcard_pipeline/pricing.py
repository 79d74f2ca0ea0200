"""Prices for ``--dry-run`` estimates. Real runs use the cost the provider reports, not this table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    prompt: float
    completion: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1_000_000


#: Published list prices when this table was written; a model missing here gets no cost estimate.
KNOWN_PRICES: dict[str, Price] = {
    "openai/gpt-4o-mini": Price(0.15, 0.60),
    "openai/gpt-4o": Price(2.50, 10.00),
    "openai/gpt-4.1-mini": Price(0.40, 1.60),
    "openai/gpt-4.1-nano": Price(0.10, 0.40),
    "anthropic/claude-3.5-haiku": Price(0.80, 4.00),
    "anthropic/claude-3.5-sonnet": Price(3.00, 15.00),
    "google/gemini-2.0-flash-001": Price(0.10, 0.40),
}

#: Typical answer sizes, measured on the simulator's schema-shaped answers and rounded up.
TYPICAL_COMPLETION_TOKENS = {"nuance": 650, "cards": 700}


def price_for(provider: str, model: str) -> Price | None:
    if provider == "simulated":
        from flashcard_pipeline.simulator.server import COMPLETION_PRICE_PER_MILLION, PROMPT_PRICE_PER_MILLION

        return Price(PROMPT_PRICE_PER_MILLION, COMPLETION_PRICE_PER_MILLION)
    return KNOWN_PRICES.get(model) or KNOWN_PRICES.get(f"openai/{model}")
