"""``flashcard-pipeline worker --run ID``: one more process on a run stored in PostgreSQL, on any machine."""

from __future__ import annotations

from typing import Annotated

import typer

from flashcard_pipeline.cli.options import DbOption, ModelKindOption
from flashcard_pipeline.cli.output import ExitCode, fail, stderr_console
from flashcard_pipeline.cli.root import app
from flashcard_pipeline.errors import ConfigurationError, InputError, StructuredError


@app.command("worker")
def worker_command(
    run: Annotated[int, typer.Option("--run", metavar="ID", help="The run to work on (`process` made it; `runs "
                                                                  "list` shows them).", min=1, show_default=False)],
    db: DbOption = None,
    concurrency: Annotated[int, typer.Option(metavar="N", help="Calls in flight at once in this worker.", min=1,
                                             max=256)] = 8,
    base_url: Annotated[str | None, typer.Option(metavar="URL", help="API base URL for openai-compatible servers "
                                                                     "(or a simulator serving for --provider "
                                                                     "simulated runs).")] = None,
    api_key: Annotated[str | None, typer.Option(metavar="KEY", help="API key (default: OPENROUTER_API_KEY / "
                                                                    "OPENAI_API_KEY, else the config file).",
                                                show_default=False)] = None,
    timeout: Annotated[float | None, typer.Option(metavar="SECONDS", help="Seconds to wait for one answer (default "
                                                                          "120; 10 for simulated runs).",
                                                  min=0.001)] = None,
    rpm: Annotated[float | None, typer.Option("--rpm", metavar="N", help="The provider's requests-per-minute limit, "
                                                                         "shared by all workers through Redis "
                                                                         "(default: RL_REQUESTS_PER_MINUTE).",
                                              min=0.001)] = None,
    tpm: Annotated[float | None, typer.Option("--tpm", metavar="N", help="The provider's tokens-per-minute limit "
                                                                         "(default: RL_TOKENS_PER_MINUTE).",
                                              min=1)] = None,
    max_attempts: Annotated[int | None, typer.Option(metavar="N", help="Calls per request before a transient error "
                                                                       "fails the item (default: "
                                                                       "RETRY_MAX_ATTEMPTS, else 8).", min=1)] = None,
    breaker_max_wait: Annotated[float | None, typer.Option(metavar="SECONDS", help="Seconds a request waits for an "
                                                                                   "open circuit breaker (default: "
                                                                                   "CB_MAX_WAIT, else 600).",
                                                           min=0)] = None,
    max_cost: Annotated[float | None, typer.Option(metavar="USD", help="Stop this worker (exit 3) once the run has "
                                                                       "spent this many US dollars.")] = None,
    fallback_model: Annotated[list[str] | None, typer.Option(
        "--fallback-model", metavar="NAME", help="A model that takes an item over when the run's model gives up "
                                                 "(default: RECOVERY_FALLBACK_MODELS).")] = None,
    model_kind: ModelKindOption = None,
    lease: Annotated[float | None, typer.Option(metavar="SECONDS", help="How long this worker's items stay its own "
                                                                        "without a heartbeat: a killed worker's "
                                                                        "items go to the others after this "
                                                                        "(default: WORKER_LEASE_SECONDS, else 60).",
                                                min=1)] = None,
) -> None:
    """Work on a run beside any number of other workers, on any machine (PostgreSQL only): items are leased from
    the ledger, a killed worker's items are taken over when its lease expires, and the provider's limits are
    shared through Redis (RL_BACKEND=redis). Exits when the run has no item left: 0 completed, 1 failed items,
    3 aborted."""
    import asyncio
    import signal

    from flashcard_pipeline.config import breaker_config, retry_config
    from flashcard_pipeline.gc_tuning import long_run_gc
    from flashcard_pipeline.storage.schema import RunStatus
    from flashcard_pipeline.worker import WorkerOptions, run_worker

    err = stderr_console()
    try:
        options = WorkerOptions(
            run_id=run, db_url=db, concurrency=concurrency, base_url=base_url, api_key=api_key, timeout=timeout,
            rpm=rpm, tpm=tpm, max_cost=max_cost, fallback_models=tuple(fallback_model or ()),
            model_kind=model_kind, lease_seconds=lease,
            retry=None if max_attempts is None else retry_config().model_copy(update={"max_attempts": max_attempts}),
            breaker=None if breaker_max_wait is None else breaker_config().model_copy(
                update={"max_wait": breaker_max_wait}))
        # SIGTERM (Kubernetes, systemd, docker stop) as Ctrl-C: the worker gives its items back before it exits.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            with long_run_gc():
                result = asyncio.run(run_worker(options))
        except KeyboardInterrupt:  # the items it held went back to the run (released, not left to expire)
            raise fail("interrupted; the run's other workers go on, and its items wait for them or the next "
                       "worker", ExitCode.INTERRUPTED) from None
    except (InputError, ConfigurationError) as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    except StructuredError as exc:
        raise fail(str(exc), ExitCode.ABORTED if exc.aborts_run else ExitCode.FAILED_ITEMS) from None
    outcome = result.outcome
    stats = outcome.stats
    typer.echo(f"worker {result.worker_id} on run {outcome.run_id}: {result.items_done} items done here · run "
               f"{outcome.status} · {stats.done}/{stats.total} items done · {stats.requests} API calls here")
    if outcome.status is RunStatus.ABORTED:
        err.print(f"[red]aborted:[/] {outcome.abort_reason}", highlight=False)
        raise typer.Exit(int(ExitCode.ABORTED))
    raise typer.Exit(int(ExitCode.OK if outcome.status is RunStatus.COMPLETED else ExitCode.FAILED_ITEMS))
