"""The built-in provider simulator: an OpenAI-compatible server with deterministic answers and
injectable faults, for tests, benchmarks and the offline demo."""

from flashcard_pipeline.simulator.content import analysis_for, cards_for, hangul_ipa, part_of_speech
from flashcard_pipeline.simulator.server import (
    COMPLETION_PRICE_PER_MILLION,
    DEFAULT_PORT,
    MODEL_IDS,
    PROMPT_PRICE_PER_MILLION,
    Flavor,
    Outcome,
    Simulator,
    SimulatorConfig,
    SimulatorStats,
    Stage,
    estimate_tokens,
    run_simulator,
    serve,
)

__all__ = [
    "COMPLETION_PRICE_PER_MILLION",
    "DEFAULT_PORT",
    "MODEL_IDS",
    "PROMPT_PRICE_PER_MILLION",
    "Flavor",
    "Outcome",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "Stage",
    "analysis_for",
    "cards_for",
    "estimate_tokens",
    "hangul_ipa",
    "part_of_speech",
    "run_simulator",
    "serve",
]
