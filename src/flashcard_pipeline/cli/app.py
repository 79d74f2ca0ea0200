"""The ``flashcard-pipeline`` command line (Typer + Rich).

Exit codes: 0 every item done; 1 finished with failed items; 2 bad usage or bad input;
3 aborted (the provider refused the key, or the budget ran out); 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flashcard_pipeline.choices import AudioEngine, ExportFormat, ProviderName, Subdecks
from flashcard_pipeline.cli.options import (
    MetricsPortOption,
    ModelKindOption,
    ParamOption,
    TelemetryOption,
    TraceContentOption,
)
from flashcard_pipeline.cli.output import ExitCode, fail, money, stderr_console, warning
from flashcard_pipeline.cli.root import app
from flashcard_pipeline.errors import ConfigurationError, InputError, StructuredError

if TYPE_CHECKING:
    from rich.console import Console

    from flashcard_pipeline.resilience import CircuitBreakerConfig, RetryConfig
    from flashcard_pipeline.runner import ProcessResult
    from flashcard_pipeline.simulator import SimulatorConfig

#: ``--sim`` settings that are lists of names (comma-separated or repeated), not numbers.
_LIST_OPTIONS = frozenset({"down_models"})


def parse_sim_options(pairs: list[str]) -> SimulatorConfig:
    """``--sim latency=0.05 --sim server_error_rate=0.2`` -> a validated SimulatorConfig."""
    from flashcard_pipeline.simulator import SimulatorConfig

    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigurationError(f"--sim expects KEY=VALUE, got {pair!r}")
        key = key.strip().replace("-", "_")
        if key in _LIST_OPTIONS:
            values[key] = (*values.get(key, ()), *(v.strip() for v in value.split(",") if v.strip()))
        elif "," in value:
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
    from flashcard_pipeline.config import retry_config

    return retry_config().model_copy(update={"max_attempts": max_attempts})


def _breaker_config(max_wait: float | None) -> CircuitBreakerConfig | None:
    """``None`` lets the runner read CB_* itself; ``--breaker-max-wait`` overrides just that field."""
    if max_wait is None:
        return None
    from flashcard_pipeline.config import breaker_config

    return breaker_config().model_copy(update={"max_wait": max_wait})


def _run_async(coro: Any) -> Any:
    import asyncio

    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise fail("interrupted; run the same command again to resume where it stopped",
                    ExitCode.INTERRUPTED) from None


@app.command("process")
def process_command(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="Vocabulary list: CSV, TSV or plain text.",
                                               show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE",
                                                help="Where to write the cards (default: ./<INPUT name>.jsonl).")]
    = None,
    format: Annotated[ExportFormat | None, typer.Option(
        "--format", case_sensitive=False, help="Deck format (default: from the -o extension, else jsonl).")]
    = None,
    limit: Annotated[int | None, typer.Option(metavar="N", help="Process at most N items.", min=1)] = None,
    start_from: Annotated[int | None, typer.Option(metavar="N", help="Skip items before position N.", min=1)]
    = None,
    concurrency: Annotated[int, typer.Option(metavar="N", help="Calls in flight at once.", min=1, max=256)] = 8,
    model: Annotated[str | None, typer.Option(metavar="NAME", help="Model name (default depends on the "
                                                                   "provider).")] = None,
    provider: Annotated[ProviderName, typer.Option(help="Where requests go.")] = ProviderName.OPENROUTER,
    base_url: Annotated[str | None, typer.Option(metavar="URL", help="API base URL for openai-compatible "
                                                                     "servers.")] = None,
    api_key: Annotated[str | None, typer.Option(metavar="KEY", help="API key (default: OPENROUTER_API_KEY / "
                                                                    "OPENAI_API_KEY, else the config file).",
                                                show_default=False)] = None,
    db: Annotated[str | None, typer.Option(metavar="URL", help="Database URL or SQLite file (default: "
                                                               "FLASHCARD_DATABASE_URL, else the config file, "
                                                               "else ~/.local/share/flashcard-pipeline/"
                                                               "flashcards.db).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Ignore cached answers and ask again.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Estimate requests, tokens and cost; call "
                                                            "nothing.")] = False,
    language: Annotated[str, typer.Option(metavar="LANG", help="Language of the terms (code or name).")] = "ko",
    learner_language: Annotated[str, typer.Option(metavar="LANG", help="Language of explanations (code or "
                                                                       "name).")] = "en",
    max_cost: Annotated[float | None, typer.Option(
        metavar="USD", help="Stop (exit 3) once the run has spent this many US dollars, earlier invocations "
                            "included.")] = None,
    max_attempts: Annotated[int | None, typer.Option(metavar="N", help="Calls per request before a transient "
                                                                       "error fails the item (default: "
                                                                       "RETRY_MAX_ATTEMPTS, else 8).",
                                                     min=1)] = None,
    breaker_max_wait: Annotated[float | None, typer.Option(metavar="SECONDS", help="Seconds a request waits for "
                                                                                   "an open circuit breaker before "
                                                                                   "its item fails (default: "
                                                                                   "CB_MAX_WAIT, else 600).",
                                                           min=0)] = None,
    rpm: Annotated[float | None, typer.Option("--rpm", metavar="N", help="The provider's requests-per-minute "
                                                                         "limit (default: RL_REQUESTS_PER_MINUTE, "
                                                                         "else found adaptively).",
                                              min=0.001)] = None,
    tpm: Annotated[float | None, typer.Option("--tpm", metavar="N", help="The provider's tokens-per-minute limit "
                                                                         "(default: RL_TOKENS_PER_MINUTE, else "
                                                                         "not enforced).", min=1)] = None,
    sim: Annotated[list[str] | None, typer.Option("--sim", metavar="KEY=VALUE",
                                                   help="Simulator setting for --provider simulated "
                                                        "(e.g. latency=0.05, server_error_rate=0.1).")] = None,
    deck_name: Annotated[str | None, typer.Option(metavar="NAME", help="Anki deck name (default: '<Language> "
                                                                       "vocabulary').")] = None,
    subdecks: Annotated[Subdecks, typer.Option(help="Sub-decks by part of speech or by the input's level "
                                                    "column.")] = Subdecks.NONE,
    audio: Annotated[AudioEngine | None, typer.Option(help="Pronunciation audio (MP3) of each word and example "
                                                           "sentence in .apkg decks: espeak (offline, needs "
                                                           "espeak-ng) or openai (the provider's /audio/speech "
                                                           "with the same key).")] = None,
    timeout: Annotated[float | None, typer.Option(metavar="SECONDS", help="Seconds to wait for one answer "
                                                                          "before it counts as a timeout (default "
                                                                          "120; 10 for --provider simulated).",
                                                  min=0.001)] = None,
    encoding: Annotated[str, typer.Option(metavar="NAME", help="Text encoding of INPUT (utf-8 with or without "
                                                               "BOM; or cp949, euc-kr, latin-1, ...).")] = "utf-8",
    param: ParamOption = None,
    model_kind: ModelKindOption = None,
    telemetry: TelemetryOption = None,
    metrics_port: MetricsPortOption = None,
    trace_content: TraceContentOption = False,
    fallback_model: Annotated[list[str] | None, typer.Option(
        "--fallback-model", metavar="NAME", help="A model that takes an item over when the run's model gives up "
                                                 "(retries spent, circuit open past CB_MAX_WAIT); repeat for a chain "
                                                 "(default: RECOVERY_FALLBACK_MODELS).")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Process only the run's failed and "
                                                                      "quarantined items again.")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", metavar="N", min=0, max=256,
        help="Leave the items to N `worker` processes started here (PostgreSQL only; limits shared through "
             "Redis: RL_BACKEND=redis); 0 prepares the run for workers started elsewhere (`worker --run ID`). "
             "Default: this process does them.")] = None,
) -> None:
    """Turn a vocabulary list into flashcards (resumes an interrupted run of the same command)."""
    from flashcard_pipeline.cli.config_commands import warn_loose_key_files
    from flashcard_pipeline.cli.progress import ConsoleReporter
    from flashcard_pipeline.config import run_log_options
    from flashcard_pipeline.runner import ProcessOptions, process
    from flashcard_pipeline.stages import parse_params

    err = stderr_console()
    try:
        warn_loose_key_files()
        options = ProcessOptions(
            input_path=input_path, output=output, format=format.value if format else None, limit=limit,
            start_from=start_from, concurrency=concurrency, model=model, provider=provider.value,
            base_url=base_url, api_key=api_key, db_url=db, force=force, dry_run=dry_run, language=language,
            learner_language=learner_language, max_cost=max_cost, simulator=parse_sim_options(sim or []),
            retry=_retry_config(max_attempts), breaker=_breaker_config(breaker_max_wait), rpm=rpm, tpm=tpm,
            deck_name=deck_name, subdecks=subdecks.value, audio=audio.value if audio else None, timeout=timeout,
            encoding=encoding, params=parse_params(param or []), model_kind=model_kind,
            telemetry=telemetry.value if telemetry else None, metrics_port=metrics_port,
            trace_content=trace_content or None, fallback_models=tuple(fallback_model or ()),
            retry_failed=retry_failed, log_file=None if dry_run else run_log_options(), workers=workers)
        from flashcard_pipeline.gc_tuning import long_run_gc

        with long_run_gc():
            result: ProcessResult = _run_async(process(options, ConsoleReporter(err)))
    except (InputError, ConfigurationError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except StructuredError as exc:
        raise fail(str(exc), ExitCode.ABORTED if exc.aborts_run else ExitCode.FAILED_ITEMS) from None
    raise typer.Exit(int(_report(result, err)))


def _report(result: ProcessResult, err: Console) -> ExitCode:
    from rich.console import Console
    from rich.table import Table

    from flashcard_pipeline.storage.schema import RunStatus

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
    if result.awaiting_workers:
        out.print(f"run {outcome.run_id}: {stats.total - stats.done} of {stats.total} items wait for workers: start "
                  f"them with `flashcard-pipeline worker --run {outcome.run_id}` on any machine that reaches "
                  f"{result.database}", highlight=False, markup=False)
        return ExitCode.OK
    out.print(f"run {outcome.run_id}: {outcome.status} · {stats.done}/{stats.total} items done "
              f"({stats.already_done} before this run) · {stats.requests} API calls · "
              f"{stats.cache_hits} cache hits · {money(stats.cost_usd, simulated=stats.simulated, model=result.model)}",
              highlight=False, markup=False)
    if result.output is not None:
        out.print(f"wrote {result.cards_written} cards to {result.output}", highlight=False)
    if (incomplete := result.incomplete) is not None:
        warning(incomplete, err)
    if result.cache_write_errors:
        warning(f"{result.cache_write_errors} answers could not be written to the cache (see the log); they are "
                "kept with the run, and later runs reuse them", err)
    for text in result.export.warnings if result.export else ():
        warning(text, err)
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
    if outcome.quarantined:
        err.print(f"[red]{len(outcome.quarantined)} items quarantined[/] (their answers kept failing validation; the "
                  "last answer is kept in the ledger; `process --retry-failed` tries them again):")
        for q in outcome.quarantined:
            err.print(f"  #{q.position} {q.term}: {q.stage or '?'} {q.code}: {q.message}", highlight=False,
                      markup=False)
    if applied := stats.recoveries:
        err.print("recovery: " + ", ".join(f"{name} {count}" for name, count in sorted(applied.items())),
                  highlight=False, markup=False)
    if result.log_file is not None:
        err.print(f"log: {result.log_file}", highlight=False, markup=False)
    if outcome.status is RunStatus.ABORTED:
        err.print(f"[red]aborted:[/] {outcome.abort_reason}", highlight=False)
        return ExitCode.ABORTED
    failed = outcome.failures or outcome.quarantined
    return ExitCode.FAILED_ITEMS if failed or outcome.status is not RunStatus.COMPLETED else ExitCode.OK


@app.command("simulate")
def simulate_command(
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on (0 picks a free one).", min=0,
                                      max=65535)] = 8787,
    host: Annotated[str, typer.Option(metavar="ADDRESS", help="Address to bind.")] = "127.0.0.1",
    sim: Annotated[list[str] | None, typer.Option("--sim", metavar="KEY=VALUE",
                                                   help="Simulator setting (latency=0.05, requests_per_minute=600, "
                                                        "server_error_rate=0.1, seed=1, ...).")] = None,
) -> None:
    """Serve an OpenAI-compatible simulated provider with fault injection (Ctrl-C stops it)."""
    import asyncio

    from flashcard_pipeline.simulator import Simulator, serve

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


# The other commands live in modules of their own, each registering itself on the root `app` (cli/root.py, which
# imports none of them, so there is no import cycle).
from flashcard_pipeline.cli import (  # noqa: E402, F401
    breaker_commands,
    config_commands,
    errors_commands,
    export_commands,
    logs_commands,
    maintenance,
    monitor,
    ratelimit_commands,
    runs_commands,
    worker_commands,
)
