"""The ``flashcard-pipeline`` command line (Typer + Rich).

Exit codes: 0 every item done; 1 finished with failed items; 2 bad usage or bad input;
3 aborted (the provider refused the key, or the budget ran out); 130 interrupted.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from flashcard_pipeline.cli.breaker_commands import breaker_app
from flashcard_pipeline.cli.export_commands import export_command, push_command
from flashcard_pipeline.cli.maintenance import cache_app, db_app
from flashcard_pipeline.cli.options import (
    MetricsPortOption,
    ModelKindOption,
    ParamOption,
    TelemetryOption,
    TraceContentOption,
)
from flashcard_pipeline.cli.output import ExitCode, OneLineErrors, fail, money, stderr_console
from flashcard_pipeline.cli.progress import ConsoleReporter
from flashcard_pipeline.cli.ratelimit_commands import ratelimit_app
from flashcard_pipeline.config import breaker_config, retry_config
from flashcard_pipeline.errors import ConfigurationError, InputError, StructuredError
from flashcard_pipeline.export import AudioEngine, Subdecks
from flashcard_pipeline.llm.providers import ProviderName
from flashcard_pipeline.resilience import CircuitBreakerConfig, RetryConfig
from flashcard_pipeline.runner import ProcessOptions, ProcessResult, process
from flashcard_pipeline.simulator import Simulator, SimulatorConfig, serve
from flashcard_pipeline.stages import parse_params
from flashcard_pipeline.storage.schema import RunStatus

app = typer.Typer(
    name="flashcard-pipeline",
    help="Turn vocabulary lists into rich, AI-generated flashcards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)


def parse_sim_options(pairs: list[str]) -> SimulatorConfig:
    """``--sim latency=0.05 --sim server_error_rate=0.2`` -> a validated SimulatorConfig."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"--sim expects KEY=VALUE, got {pair!r}")
        key = key.strip().replace("-", "_")
        if "," in value:
            parts = [v.strip() for v in value.split(",")]
            if any("=" in part for part in parts):
                raise ConfigurationError(f"--sim takes one KEY=VALUE each; repeat --sim for every setting "
                                         f"(e.g. --sim {pair.split(',')[0]} --sim {parts[1]}), got {pair!r}")
            try:
                values[key] = [float(part) for part in parts]
            except ValueError:
                raise ConfigurationError(f"--sim {key}: a comma-separated value is a range of numbers (e.g. "
                                         f"latency=0.01,0.05), got {value!r}") from None
        else:
            values[key] = value.strip()
    try:
        return SimulatorConfig.model_validate(values)
    except Exception as exc:
        first = str(exc).splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) if len(first) > 1 else str(exc)
        raise ConfigurationError(f"invalid --sim option: {detail}") from exc


def _retry_config(max_attempts: int | None) -> RetryConfig | None:
    """``None`` lets the runner read RETRY_* itself; ``--max-attempts`` overrides just that field."""
    if max_attempts is None:
        return None
    return retry_config().model_copy(update={"max_attempts": max_attempts})


def _breaker_config(max_wait: float | None) -> CircuitBreakerConfig | None:
    """``None`` lets the runner read CB_* itself; ``--breaker-max-wait`` overrides just that field."""
    if max_wait is None:
        return None
    return breaker_config().model_copy(update={"max_wait": max_wait})


def _run_async(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise fail("interrupted; run the same command again to resume where it stopped",
                    ExitCode.INTERRUPTED) from None


@app.command("process")
def process_command(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Vocabulary list: CSV, TSV or plain text.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the cards.")] = None,
    format: Annotated[str | None, typer.Option("--format", help="apkg | tsv | csv | jsonl (default: from the -o "
                                                                "extension, else jsonl).")] = None,
    limit: Annotated[int | None, typer.Option(help="Process at most N items.", min=1)] = None,
    start_from: Annotated[int | None, typer.Option(help="Skip items before position N.", min=1)] = None,
    concurrency: Annotated[int, typer.Option(help="Calls in flight at once.", min=1, max=256)] = 8,
    model: Annotated[str | None, typer.Option(help="Model name (default depends on the provider).")] = None,
    provider: Annotated[ProviderName, typer.Option(help="Where requests go.")] = ProviderName.OPENROUTER,
    base_url: Annotated[str | None, typer.Option(help="API base URL for openai-compatible servers.")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (default: OPENROUTER_API_KEY / OPENAI_API_KEY).",
                                                show_default=False)] = None,
    db: Annotated[str | None, typer.Option(help="Database URL or SQLite file (default: FLASHCARD_DATABASE_URL, "
                                                "else ~/.local/share/flashcard-pipeline/flashcards.db).")] = None,
    force: Annotated[bool, typer.Option(help="Ignore cached answers and ask again.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Estimate requests, tokens and cost; call nothing.")] = False,
    language: Annotated[str, typer.Option(help="Language of the terms (code or name).")] = "ko",
    learner_language: Annotated[str, typer.Option(help="Language of explanations (code or name).")] = "en",
    max_cost: Annotated[float | None, typer.Option(
        help="Stop (exit 3) once the run has spent this many US dollars, earlier invocations included.")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Calls per request before a transient error fails the "
                                                          "item (default: RETRY_MAX_ATTEMPTS, else 3).",
                                                     min=1)] = None,
    breaker_max_wait: Annotated[float | None, typer.Option(help="Seconds a request waits for an open circuit "
                                                               "breaker before its item fails (default: "
                                                               "CB_MAX_WAIT, else 600).", min=0)] = None,
    rpm: Annotated[float | None, typer.Option("--rpm", help="The provider's requests-per-minute limit (default: "
                                                            "RL_REQUESTS_PER_MINUTE, else found adaptively).",
                                              min=0.001)] = None,
    tpm: Annotated[float | None, typer.Option("--tpm", help="The provider's tokens-per-minute limit (default: "
                                                            "RL_TOKENS_PER_MINUTE, else found adaptively).",
                                              min=1)] = None,
    sim: Annotated[list[str] | None, typer.Option("--sim", metavar="KEY=VALUE",
                                                   help="Simulator setting for --provider simulated "
                                                        "(e.g. latency=0.05, server_error_rate=0.1).")] = None,
    deck_name: Annotated[str | None, typer.Option(help="Anki deck name (default: '<Language> vocabulary').")] = None,
    subdecks: Annotated[Subdecks, typer.Option(help="Sub-decks by part of speech or by the input's level "
                                                    "column.")] = Subdecks.NONE,
    audio: Annotated[AudioEngine | None, typer.Option(help="Pronunciation audio (MP3) of each word and example "
                                                           "sentence in .apkg decks: espeak (offline, needs "
                                                           "espeak-ng) or openai (the provider's /audio/speech "
                                                           "with the same key).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for one answer before it counts as a "
                                                       "timeout (default 120; 10 for --provider simulated).",
                                                  min=0.001)] = None,
    encoding: Annotated[str, typer.Option(help="Text encoding of INPUT (utf-8 with or without BOM; or cp949, "
                                               "euc-kr, latin-1, ...).")] = "utf-8",
    param: ParamOption = None,
    model_kind: ModelKindOption = None,
    telemetry: TelemetryOption = None,
    metrics_port: MetricsPortOption = None,
    trace_content: TraceContentOption = None,
) -> None:
    """Turn a vocabulary list into flashcards (resumes an interrupted run of the same command)."""
    err = stderr_console()
    try:
        options = ProcessOptions(
            input_path=input_path, output=output, format=format, limit=limit, start_from=start_from,
            concurrency=concurrency, model=model, provider=provider.value, base_url=base_url, api_key=api_key,
            db_url=db, force=force, dry_run=dry_run, language=language, learner_language=learner_language,
            max_cost=max_cost, simulator=parse_sim_options(sim or []), retry=_retry_config(max_attempts),
            breaker=_breaker_config(breaker_max_wait), rpm=rpm, tpm=tpm,
            deck_name=deck_name, subdecks=subdecks.value, audio=audio.value if audio else None, timeout=timeout,
            encoding=encoding, params=parse_params(param or []), model_kind=model_kind,
            telemetry=telemetry.value if telemetry else None, metrics_port=metrics_port, trace_content=trace_content)
        result: ProcessResult = _run_async(process(options, ConsoleReporter(err)))
    except (InputError, ConfigurationError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except StructuredError as exc:
        raise fail(str(exc), ExitCode.ABORTED if exc.aborts_run else ExitCode.FAILED_ITEMS) from None
    raise typer.Exit(int(_report(result, err)))


def _report(result: ProcessResult, err: Console) -> ExitCode:
    out = Console(soft_wrap=True)
    if result.estimate is not None:
        e = result.estimate
        table = Table(title="dry run: nothing was sent", show_header=False)
        table.add_row("items", f"{e.items:,}")
        table.add_row("requests", f"{e.requests:,} ({e.cached_stages:,} stage answers already cached)")
        table.add_row("prompt tokens (est.)", f"{e.prompt_tokens:,}")
        table.add_row("completion tokens (est.)", f"{e.completion_tokens:,} (at most {e.max_completion_tokens:,})")
        table.add_row("cost (est.)", "unknown for this model" if e.cost_usd is None
                      else money(e.cost_usd, simulated=e.simulated))
        out.print(table)
        out.print(f"database {result.database}", highlight=False, markup=False)
        return ExitCode.OK
    outcome = result.outcome
    assert outcome is not None
    stats = outcome.stats
    out.print(f"run {outcome.run_id}: {outcome.status} · {stats.done}/{stats.total} items done "
              f"({stats.already_done} before this run) · {stats.requests} API calls · "
              f"{stats.cache_hits} cache hits · {money(stats.cost_usd, simulated=stats.simulated, model=result.model)}",
              highlight=False, markup=False)
    if result.output is not None:
        out.print(f"wrote {result.cards_written} cards to {result.output}", highlight=False)
    if (incomplete := result.incomplete) is not None:
        err.print(f"[yellow]warning:[/] {incomplete}", highlight=False)
    if result.cache_write_errors:
        err.print(f"[yellow]warning:[/] {result.cache_write_errors} answers could not be written to the cache "
                  "(see the log); they are kept with the run, and later runs reuse them", highlight=False)
    for warning in result.export.warnings if result.export else ():
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if outcome.failures:
        err.print(f"[red]{len(outcome.failures)} items failed:[/]")
        for f in outcome.failures:
            err.print(f"  #{f.position} {f.term}: {f.stage or '?'} {f.category}/{f.code}: {f.message}",
                      highlight=False, markup=False)
    if outcome.flagged:
        err.print(f"[yellow]{len(outcome.flagged)} items kept for review[/] (their answers failed content checks "
                  "after a re-ask; tagged needs-review, `export --flagged` writes only them):")
        for item in outcome.flagged:
            err.print(f"  #{item.position} {item.term}: {'; '.join(item.flags)}", highlight=False, markup=False)
    if outcome.status is RunStatus.ABORTED:
        err.print(f"[red]aborted:[/] {outcome.abort_reason}", highlight=False)
        return ExitCode.ABORTED
    return ExitCode.FAILED_ITEMS if outcome.failures or outcome.status is not RunStatus.COMPLETED else ExitCode.OK


@app.command("simulate")
def simulate_command(
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one).", min=0, max=65535)] = 8787,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    sim: Annotated[list[str] | None, typer.Option("--sim", metavar="KEY=VALUE",
                                                   help="Simulator setting (latency=0.05, requests_per_minute=600, "
                                                        "server_error_rate=0.1, seed=1, ...).")] = None,
) -> None:
    """Serve an OpenAI-compatible simulated provider with fault injection (Ctrl-C stops it)."""
    config = parse_sim_options(sim or [])
    err = stderr_console()

    def announce(simulator: Simulator) -> None:
        err.print(f"simulated provider on {simulator.base_url} (Ctrl-C to stop)", highlight=False)

    try:
        asyncio.run(serve(config, host, port, ready=announce))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}", ExitCode.USAGE) from None


app.add_typer(db_app, name="db")
app.add_typer(cache_app, name="cache")
app.add_typer(breaker_app, name="breaker")
app.command("export")(export_command)
app.command("push")(push_command)
app.add_typer(ratelimit_app, name="ratelimit")


def main() -> None:
    """Console-script entry point: one line on stderr for unexpected errors unless FLASHCARD_DEBUG is set."""
    try:
        app()
    except Exception as exc:  # pragma: no cover - last resort
        if os.environ.get("FLASHCARD_DEBUG"):
            raise
        stderr_console().print(f"[red]internal error:[/] {type(exc).__name__}: {exc} "
                               "(set FLASHCARD_DEBUG=1 for details)", highlight=False)
        sys.exit(1)
