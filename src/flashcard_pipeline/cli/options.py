"""Options shared by several commands: ``--db`` and ``--json`` of the read-only commands, and those of commands
that build stage requests (``process``, ``cache warm``), which must address a request the same way, or their
cache keys would differ."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

ParamOption = Annotated[list[str] | None, typer.Option(
    "--param", metavar="KEY=VALUE", help="Another request body field the provider takes (repeatable; VALUE is "
    "JSON when it parses, else text): reasoning_effort=low, top_p=0.9, seed=7. Part of the run and cache keys.")]
ModelKindOption = Annotated[str | None, typer.Option(
    "--model-kind", metavar="auto|chat|reasoning", help="How to address the model: reasoning models get "
    "max_completion_tokens and no temperature (default: FLASHCARD_MODEL_KIND, else auto: from its name).")]

DbOption = Annotated[str | None, typer.Option(
    "--db", metavar="URL", help="Database URL or SQLite file (default: FLASHCARD_DATABASE_URL, else the config file, "
    "else ~/.local/share/flashcard-pipeline/flashcards.db).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]

class TelemetryChoice(StrEnum):
    OFF = "off"
    OTLP = "otlp"
    CONSOLE = "console"


TelemetryOption = Annotated[TelemetryChoice | None, typer.Option(
    "--telemetry", help="Export traces and metrics: otlp (to OTEL_EXPORTER_OTLP_ENDPOINT, default "
    "http://localhost:4318) or console; default FLASHCARD_TELEMETRY, else off. The OTEL_* variables configure the "
    "rest (docs/observability.md).", show_default=False)]
MetricsPortOption = Annotated[int | None, typer.Option(
    "--metrics-port", metavar="PORT", min=1, max=65535, help="Serve the run's metrics for Prometheus on "
    "http://127.0.0.1:PORT/metrics while it runs (default FLASHCARD_METRICS_PORT; FLASHCARD_METRICS_HOST binds "
    "another address).", show_default=False)]
TraceContentOption = Annotated[bool, typer.Option(
    "--trace-content", help="Put prompts and answers on the spans (also FLASHCARD_TRACE_CONTENT or "
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT; off by default).", show_default=False)]
