"""``process`` as a function: input file -> run in the ledger -> pipeline -> export.

The CLI is a thin shell around :func:`process`, which tests also call directly. A run is
identified by the input's content and every setting that changes the answers, so running the
same command again resumes the same run (and a finished run costs nothing).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import itertools
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from flashcard_pipeline.cache.backends import make_cache
from flashcard_pipeline.cache.compressed_cache import CompressedCache
from flashcard_pipeline.config import (
    CacheSettings,
    GeneralSettings,
    KeySettings,
    breaker_config,
    config_files,
    rate_limit_settings,
    read_settings,
    recovery_plan,
    retry_config,
    telemetry_settings,
)
from flashcard_pipeline.errors import ConfigurationError, InputError
from flashcard_pipeline.export import (
    FORMATS,
    AudioEngine,
    AudioStore,
    ExportReport,
    SpeechSettings,
    check_options,
    check_writable,
    resolve_format,
    write_export,
)
from flashcard_pipeline.hooks import NO_HOOKS, RunHooks
from flashcard_pipeline.ingest import RowProblem, VocabularyReader
from flashcard_pipeline.llm.capabilities import ModelKind
from flashcard_pipeline.llm.client import LLMClient
from flashcard_pipeline.llm.providers import ProviderConfig, ProviderName, resolve_provider
from flashcard_pipeline.local_workers import delegate
from flashcard_pipeline.logging_config import RunLogOptions, add_secrets, bound, run_log, run_log_directory
from flashcard_pipeline.models import VocabularyItem
from flashcard_pipeline.monitoring import progress_snapshot, publishing_progress
from flashcard_pipeline.observers import EventTally, ProgressObserver
from flashcard_pipeline.pipeline import Pipeline, RunOutcome, RunStats
from flashcard_pipeline.pricing import TYPICAL_COMPLETION_TOKENS, price_for
from flashcard_pipeline.recovery import RecoveryPlan, describe
from flashcard_pipeline.resilience import CallPolicy, CircuitBreakerConfig, RateLimitSettings, Resilience, RetryConfig
from flashcard_pipeline.services import check_redis
from flashcard_pipeline.simulator import SimulatorConfig, run_simulator
from flashcard_pipeline.stages import (
    CARDS,
    NUANCE,
    StageRequest,
    StageSettings,
    build_cards_request,
    build_nuance_request,
    language_name,
    parse_nuance,
)
from flashcard_pipeline.storage.breaker_store import BreakerStore, BreakerSync, process_owner
from flashcard_pipeline.storage.db import (
    DATABASE_URL_ENV,
    open_database,
    pool_monitor,
    require_postgresql,
    resolve_database_url,
)
from flashcard_pipeline.storage.ledger import Ledger, RunRecord
from flashcard_pipeline.storage.schema import RunStatus

if TYPE_CHECKING:
    from flashcard_pipeline.telemetry import RunScope, Telemetry

DEFAULT_MODELS = {
    ProviderName.OPENROUTER: "openai/gpt-4o-mini",
    ProviderName.OPENAI_COMPATIBLE: "gpt-4o-mini",
    ProviderName.SIMULATED: "simulated/flashcard-sim",
}
EXPORT_FORMATS = FORMATS
MODEL_KIND_ENV = "FLASHCARD_MODEL_KIND"
#: What the ``telemetry`` extra installs: missing, telemetry is a usage error that says how to get it.
TELEMETRY_PACKAGES = frozenset({"opentelemetry", "prometheus_client"})


@dataclass(frozen=True)
class ProcessOptions:
    input_path: Path
    output: Path | None = None
    format: str | None = None
    limit: int | None = None
    start_from: int | None = None
    concurrency: int = 8
    model: str | None = None
    provider: str = ProviderName.OPENROUTER.value
    base_url: str | None = None
    api_key: str | None = None
    db_url: str | None = None
    force: bool = False
    dry_run: bool = False
    language: str = "ko"
    learner_language: str = "en"
    max_cost: float | None = None
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    #: Retry settings; ``None`` reads the RETRY_* environment variables.
    retry: RetryConfig | None = None
    #: Circuit breaker settings; ``None`` reads the CB_* environment variables.
    breaker: CircuitBreakerConfig | None = None
    #: Provider limits per minute (``--rpm`` / ``--tpm``); ``None`` reads RL_REQUESTS_PER_MINUTE / RL_TOKENS_PER_MINUTE.
    rpm: float | None = None
    tpm: float | None = None
    env: dict[str, str] | None = None
    deck_name: str | None = None
    subdecks: str = "none"
    audio: str | None = None
    #: Seconds to wait for one answer (the read timeout); ``None``: 120, or 10 for the simulated provider.
    timeout: float | None = None
    #: The input file's text encoding.
    encoding: str = "utf-8"
    #: Extra request body fields (``--param KEY=VALUE``): part of the run and cache keys.
    params: dict[str, Any] = field(default_factory=dict)
    #: ``auto`` (the model-name table), ``chat`` or ``reasoning``; ``None`` reads FLASHCARD_MODEL_KIND.
    model_kind: str | None = None
    #: ``off``, ``otlp`` or ``console``; ``None`` reads FLASHCARD_TELEMETRY (default off).
    telemetry: str | None = None
    #: Serve metrics for Prometheus on this port; ``None`` reads FLASHCARD_METRICS_PORT (default: not served).
    metrics_port: int | None = None
    #: Put prompts and answers on spans; ``None`` reads FLASHCARD_TRACE_CONTENT.
    trace_content: bool | None = None
    #: Models that take an item over when the run's model gives up (``--fallback-model``); empty: RECOVERY_*.
    fallback_models: tuple[str, ...] = ()
    #: The recovery registry; ``None`` reads RECOVERY_* (with ``fallback_models``).
    recovery: RecoveryPlan | None = None
    #: Process only the run's failed and quarantined items (``--retry-failed``).
    retry_failed: bool = False
    #: The run's own log file; ``None``: none.
    log_file: RunLogOptions | None = None
    #: ``--workers N``: leave the items to N local ``worker`` processes (0: to workers started elsewhere);
    #: ``None``: this process does them. PostgreSQL only.
    workers: int | None = None

    @property
    def export_format(self) -> str:
        return resolve_format(self.format, self.output)

    @property
    def output_path(self) -> Path:
        return self.output or Path.cwd() / f"{self.input_path.stem}.{self.export_format}"


class Reporter(Protocol):
    """What the CLI shows; tests pass a silent one."""

    def problems(self, problems: list[RowProblem]) -> None: ...
    def started(self, run: RunRecord, *, resumed: bool, to_process: int, database: str) -> None: ...
    def live(self, stats: RunStats) -> contextlib.AbstractAsyncContextManager[None]: ...


class SilentReporter:
    def problems(self, problems: list[RowProblem]) -> None:
        pass

    def started(self, run: RunRecord, *, resumed: bool, to_process: int, database: str) -> None:
        pass

    @contextlib.asynccontextmanager
    async def live(self, stats: RunStats) -> AsyncIterator[None]:
        yield


@dataclass(frozen=True)
class DryRunEstimate:
    items: int
    requests: int
    cached_stages: int
    prompt_tokens: int
    completion_tokens: int
    max_completion_tokens: int
    cost_usd: float | None
    problems: list[RowProblem]
    #: The simulated provider would spend nothing: the cost is the named model's, as an estimate.
    simulated: bool = False


@dataclass(frozen=True)
class ProcessResult:
    outcome: RunOutcome | None
    output: Path | None
    cards_written: int
    problems: list[RowProblem]
    resumed: bool = False
    estimate: DryRunEstimate | None = None
    export: ExportReport | None = None
    #: The database the run lives in (password hidden), so the user knows where `export` finds it.
    database: str = ""
    #: Cache writes that failed this invocation (the answers are in the ledger all the same).
    cache_write_errors: int = 0
    model: str | None = None
    #: This invocation's log file (rotated copies beside it), if one was written.
    log_file: Path | None = None
    #: ``--workers 0``: the run is ready and its items wait for ``worker`` processes.
    awaiting_workers: bool = False

    @property
    def incomplete(self) -> str | None:
        """Why the written deck lacks terms (or why none was written), or None when it holds the whole run."""
        if self.outcome is None:
            return None
        stats = self.outcome.stats
        missing = stats.total - stats.done
        again = ("run the same command again with --retry-failed to try the quarantined items again"
                 if self.outcome.quarantined and missing <= len(self.outcome.quarantined)
                 else "run the same command again to complete it")
        if self.output is None:
            return f"no deck written: none of the run's {stats.total} terms has cards yet; {again}"
        if missing <= 0:
            return None
        return (f"the deck is partial: {stats.done} of {stats.total} terms ({missing} missing: "
                f"{stats.failed} failed, {max(0, missing - stats.failed)} not processed); {again}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _selected(reader: VocabularyReader, options: ProcessOptions) -> Iterator[VocabularyItem]:
    items: Iterator[VocabularyItem] = iter(reader)
    if options.start_from is not None:
        items = (item for item in items if item.position >= options.start_from)
    if options.limit is not None:
        items = itertools.islice(items, options.limit)
    return items


#: Runs that stopped before their end: killed (still marked running) or aborted (budget, refused key).
_INTERRUPTED = frozenset({RunStatus.RUNNING, RunStatus.ABORTED})


def _nothing_selected(options: ProcessOptions, skipped: int) -> str:
    if options.start_from is not None:
        why = f"no term at position {options.start_from} or after it"
    elif skipped:
        why = f"every row was skipped ({skipped}, listed above)"
    else:
        why = "no terms"
    return f"{options.input_path}: nothing to process: {why}"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _validate(options: ProcessOptions) -> None:
    if options.concurrency < 1:
        raise ConfigurationError("--concurrency must be at least 1")
    if options.limit is not None and options.limit < 1:
        raise ConfigurationError("--limit must be at least 1")
    if options.start_from is not None and options.start_from < 1:
        raise ConfigurationError("--start-from must be at least 1")
    if options.workers is not None and options.workers < 0:
        raise ConfigurationError("--workers must be 0 or more")
    if options.max_cost is not None and options.max_cost <= 0:
        raise ConfigurationError("--max-cost must be a positive amount of US dollars")
    options.export_format  # noqa: B018 - validates the format early
    check_options(options.subdecks, options.audio)
    if not options.dry_run:
        if _same_file(options.output_path, options.input_path):
            raise ConfigurationError(f"-o {options.output_path} is the input list: the cards would overwrite your "
                                     "vocabulary; choose another output file")
        check_writable(options.output_path)


#: The in-process simulator answers in milliseconds, so a call that takes this long is one of its injected hangs.
SIMULATED_READ_TIMEOUT = 10.0


def _provider(options: ProcessOptions, simulator_url: str | None) -> ProviderConfig:
    kwargs: dict[str, Any] = {} if options.env is None else {"env": options.env}
    if options.provider == ProviderName.SIMULATED:
        # --base-url: a simulator serving elsewhere (`simulate`, or the one `process --workers` shares).
        return resolve_provider(ProviderName.SIMULATED,
                                base_url=simulator_url or options.base_url or "http://127.0.0.1:9/v1",
                                read_timeout=options.timeout or SIMULATED_READ_TIMEOUT, **kwargs)
    api_key = options.api_key
    if api_key is None and options.env is None:  # the environment's key, else the config file's
        api_key = read_settings(KeySettings).key_for(options.provider)
    return resolve_provider(options.provider, base_url=options.base_url, api_key=api_key,
                            read_timeout=options.timeout, require_key=not options.dry_run, **kwargs)


def model_kind_setting(explicit: str | None, env: Mapping[str, str] | None = None) -> str:
    """``--model-kind``, else FLASHCARD_MODEL_KIND, else the config file's, else ``auto``."""
    if explicit:
        return explicit
    if env is None:
        return read_settings(GeneralSettings).model_kind
    return env.get(MODEL_KIND_ENV, "").strip() or ModelKind.AUTO.value


def _settings(options: ProcessOptions, provider: ProviderConfig) -> StageSettings:
    model = options.model or DEFAULT_MODELS[provider.name]
    return StageSettings(provider=provider.name.value, model=model, language=language_name(options.language),
                         learner_language=language_name(options.learner_language),
                         extra_body=dict(provider.extra_body), params=dict(options.params),
                         model_kind=model_kind_setting(options.model_kind, options.env))


def _run_key(options: ProcessOptions, settings: StageSettings, input_sha: str, provider: ProviderConfig) -> str:
    material = {
        "input": input_sha, "provider": settings.provider, "model": settings.model,
        "base_url": provider.base_url if provider.name is ProviderName.OPENAI_COMPATIBLE else None,
        "language": settings.language, "learner": settings.learner_language, "prompts": settings.prompt_versions,
        "limit": options.limit, "start_from": options.start_from,
        # The encoding decides what the terms are: a list re-read in the right one is a different run.
        "encoding": codecs.lookup(options.encoding).name,
        **settings.run_key_material,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


async def process(options: ProcessOptions, reporter: Reporter | None = None,
                  policy: CallPolicy | None = None, telemetry: Telemetry | None = None) -> ProcessResult:
    """Run (or resume) the pipeline for ``options`` and export what is done.

    Without a ``policy`` every provider call goes through :func:`default_policy`. When the policy used is (or
    holds) a :class:`Resilience` engine, its events feed the progress display and the run's metrics (and
    telemetry), its breakers obey `breaker` commands and its limits are published for `ratelimit status`.
    Without ``telemetry`` the options (else FLASHCARD_TELEMETRY and the OTEL_* variables) say whether to start
    one for this call; one passed in stays the caller's to shut down.
    """
    reporter = reporter or SilentReporter()
    _validate(options)
    recovery = options.recovery or recovery_plan(list(options.fallback_models))
    policy = policy or default_policy(options)
    session = telemetry if telemetry is not None else start_telemetry(options)
    try:
        return await _process(options, reporter, policy, session, recovery)
    finally:
        if session is not None and telemetry is None:
            await asyncio.to_thread(session.shutdown)  # the last export may take a network round trip


def start_telemetry(options: ProcessOptions) -> Telemetry | None:
    """The telemetry ``options`` ask for, or None; OpenTelemetry is imported only when it is on."""
    settings = telemetry_settings(mode=options.telemetry, metrics_port=options.metrics_port,
                                  capture_content=options.trace_content)
    if not settings.enabled or options.dry_run:
        return None
    try:
        from flashcard_pipeline.telemetry import Telemetry
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in TELEMETRY_PACKAGES:
            raise
        raise ConfigurationError(f"telemetry needs OpenTelemetry ({exc.name} is not installed): "
                                 "pip install 'flashcard-pipeline[telemetry]'") from None
    return Telemetry.start(settings)


async def _process(options: ProcessOptions, reporter: Reporter, policy: CallPolicy,
                   session: Telemetry | None, recovery: RecoveryPlan) -> ProcessResult:
    cache_settings = read_settings(CacheSettings)  # every setting is checked before the run starts
    reader = VocabularyReader(options.input_path, encoding=options.encoding)
    reader.detect()
    provider = _provider(options, None)
    add_secrets(provider.secrets())
    settings = _settings(options, provider)
    engine = Resilience.find(policy)
    limits = engine.ratelimit.settings if engine is not None and engine.ratelimit is not None else None
    await asyncio.to_thread(_check_services, cache_settings, None if options.dry_run else limits)

    if options.workers is not None and not options.dry_run:
        require_postgresql(resolve_database_url(options.db_url), f"--workers {options.workers}")
        if (problem := shared_limits_problem(policy)) is not None:
            raise ConfigurationError(problem)
    engine = await asyncio.to_thread(open_database, options.db_url)
    database = engine.url.render_as_string(hide_password=True)
    if session is not None:
        session.instrument_database(engine)
    try:
        ledger = Ledger(engine)
        if options.dry_run:
            cache = make_cache(ledger, cache_settings)
            try:
                estimate = await _estimate(options, reader, settings, ledger, cache)
            finally:
                await cache.aclose()
            reporter.problems(estimate.problems)
            return ProcessResult(outcome=None, output=None, cards_written=0, problems=estimate.problems,
                                 estimate=estimate, database=database)

        input_sha = await asyncio.to_thread(file_sha256, options.input_path)
        run_key = _run_key(options, settings, input_sha, provider)
        run = await asyncio.to_thread(ledger.find_run, run_key)
        if options.force and run is not None and not (run.settings.get("force") and run.status in _INTERRUPTED):
            run = None  # --force starts afresh, but an interrupted --force run of this command resumes
        resumed = run is not None
        problems: list[RowProblem] = []
        if run is None and options.retry_failed:
            raise ConfigurationError("--retry-failed: this command has no run yet, so nothing failed; run it without "
                                     "--retry-failed")
        if run is None:
            items = _selected(reader, options)
            first = await asyncio.to_thread(next, items, None)
            if first is None:  # refused before a run exists, so `export` and the rest never pick an empty one
                problems = list(reader.problems)
                reporter.problems(problems)
                raise InputError(_nothing_selected(options, skipped=len(problems)))
            run = await asyncio.to_thread(
                ledger.create_run, run_key=run_key, input_path=str(options.input_path.resolve()),
                input_sha256=input_sha, provider=settings.provider, model=settings.model,
                settings={"prompts": settings.prompt_versions, "limit": options.limit,
                          "start_from": options.start_from, "force": options.force,
                          **settings.run_key_material},
                target_language=settings.language, learner_language=settings.learner_language,
                simulated=provider.name is ProviderName.SIMULATED, items=itertools.chain([first], items))
            problems = list(reader.problems)
            reporter.problems(problems)
        only: frozenset[int] | None = None
        if options.retry_failed:
            only = frozenset(await asyncio.to_thread(ledger.retry_failed, run.id))
            to_process = len(only)
        else:
            to_process = await asyncio.to_thread(ledger.prepare_resume, run.id)
        reporter.started(run, resumed=resumed, to_process=to_process, database=database)

        log_options = options.log_file if to_process else None
        if log_options is not None:
            log_options = replace(log_options, directory=run_log_directory(log_options.directory, database))
        if options.workers == 0:
            stats = RunStats(total=run.total_items, done=run.total_items - to_process)
            return ProcessResult(outcome=RunOutcome(run.id, RunStatus.RUNNING, stats, []), output=None,
                                 cards_written=0, problems=problems, resumed=resumed, database=database,
                                 model=run.model, awaiting_workers=True)
        with bound(run_id=run.id), run_log(log_options, run.id) as log_file:
            if to_process and options.workers:
                outcome, cache_stats = await _delegate(options, ledger, run, engine.url, reporter), {}
            elif to_process:
                outcome, cache_stats = await _execute(options, provider, settings, ledger, run, reporter, policy,
                                                      cache_settings, recovery, only, session, resumed=resumed)
            else:  # nothing left to do: the statistics of the invocation that did the work stay as they are
                outcome, cache_stats = await asyncio.to_thread(_finished, ledger, run), {}
        if outcome.stats.done == 0:
            return ProcessResult(outcome=outcome, output=None, cards_written=0, problems=problems, resumed=resumed,
                                 database=database, model=run.model, log_file=log_file)
        output = options.output_path
        results = ledger.results(run.id)
        try:
            async with speech_settings(options, provider, ledger, run) as speech:
                report = await asyncio.to_thread(
                    write_export, options.export_format, results, output, deck_name=options.deck_name,
                    subdecks=options.subdecks, language=run.target_language, simulated=run.simulated,
                    audio=options.audio, source=options.input_path.stem, speech=speech)
        except OSError as exc:  # the folder went away or filled up during the run; the cards are stored
            raise ConfigurationError(f"cannot write {output}: {exc.strerror or exc}; the cards are stored, "
                                     f"`flashcard-pipeline export --run {run.id} -o FILE` writes them") from exc
        write_errors = sum(int(m.get("write_errors", 0)) for m in cache_stats.values())
        return ProcessResult(outcome=outcome, output=output, cards_written=report.cards, problems=problems,
                             resumed=resumed, export=report, database=database, cache_write_errors=write_errors,
                             model=run.model, log_file=log_file)
    finally:
        engine.dispose()


@contextlib.asynccontextmanager
async def speech_settings(options: ProcessOptions, provider: ProviderConfig, ledger: Ledger,
                          run: RunRecord) -> AsyncIterator[SpeechSettings]:
    """Audio goes through the run's own provider and key (``--audio openai``; for the simulated provider a
    simulator serves the export), and is cached and billed in the run's ledger."""
    store = AudioStore(ledger, run.id)
    if options.audio != AudioEngine.OPENAI.value:
        yield SpeechSettings(store=store)
        return
    if provider.name is ProviderName.SIMULATED:
        async with run_simulator(options.simulator) as simulator:
            yield SpeechSettings(base_url=simulator.base_url, provider=provider.name.value, store=store)
        return
    key = provider.api_key.get_secret_value() if provider.api_key is not None else None
    yield SpeechSettings(base_url=provider.base_url, api_key=key, provider=provider.name.value, store=store)


def _check_services(cache: CacheSettings, limits: RateLimitSettings | None) -> None:
    """Every Redis the run will use answers, or one line says which and why, before any call."""
    if cache.backend == "redis":
        check_redis(cache.redis_url, "CACHE_BACKEND=redis")
    if limits is not None and limits.backend == "redis":
        check_redis(limits.redis_url, "RL_BACKEND=redis")


def _finished(ledger: Ledger, run: RunRecord) -> RunOutcome:
    """The outcome of a run with nothing left to process, without touching what its working runs recorded."""
    summary = ledger.summary(run.id)
    # Nothing left to do, but quarantined items (set aside until --retry-failed) keep the run from completing.
    status = RunStatus.FAILED if summary.quarantined else RunStatus.COMPLETED
    if run.status != status:
        ledger.set_run_status(run.id, status)
    stats = RunStats(total=summary.total, done=summary.done, already_done=summary.done, failed=summary.quarantined,
                     quarantined=summary.quarantined, simulated=run.simulated)
    return RunOutcome(run_id=run.id, status=status, stats=stats, failures=[],
                      flagged=ledger.flagged(run.id), quarantined=ledger.quarantined(run.id))


def default_policy(options: ProcessOptions) -> Resilience:
    """The engine ``options`` (else the RETRY_*, CB_* and RL_* settings) ask for: retry outermost, so each attempt
    passes the circuit breaker (one per provider and model) again, and the rate limiter innermost, so only calls
    actually sent take from the provider's limits."""
    breaker = options.breaker or breaker_config()
    settings = rate_limit_settings(rpm=options.rpm, tpm=options.tpm)
    if options.provider == ProviderName.SIMULATED:
        # The simulator's limits are not unknown: they are its settings. Nothing to discover.
        settings = settings.model_copy(update={
            "requests_per_minute": settings.requests_per_minute or options.simulator.requests_per_minute,
            "tokens_per_minute": settings.tokens_per_minute or options.simulator.tokens_per_minute,
            "adaptive": False})
    return Resilience(retry=options.retry or retry_config(), breaker=breaker if breaker.enabled else None,
                      ratelimit=settings if settings.enabled else None)


async def _execute(options: ProcessOptions, provider: ProviderConfig, settings: StageSettings, ledger: Ledger,
                   run: RunRecord, reporter: Reporter, policy: CallPolicy | None,
                   cache_settings: CacheSettings, recovery: RecoveryPlan, only: frozenset[int] | None,
                   session: Telemetry | None = None, resumed: bool = False,
                   attach: Callable[[Pipeline], contextlib.AbstractAsyncContextManager[Any]] | None = None,
                   ) -> tuple[RunOutcome, dict[str, Any]]:
    """Run the pipeline on ``run`` with the engine's observers, the heartbeat and the run's metrics; ``attach`` is
    entered around the run with the pipeline (a worker's leases: its item source and its heartbeat)."""
    async with contextlib.AsyncExitStack() as stack:
        if provider.name is ProviderName.SIMULATED and options.base_url is None:
            simulator = await stack.enter_async_context(run_simulator(options.simulator))
            provider = _provider(options, simulator.base_url)
        client = await stack.enter_async_context(LLMClient(provider, max_connections=max(options.concurrency, 10)))
        cache = make_cache(ledger, cache_settings)
        stack.push_async_callback(cache.aclose)
        hooks = NO_HOOKS if session is None else session.hooks(provider=settings.provider, model=settings.model,
                                                               base_url=provider.base_url)
        pipeline = Pipeline(ledger=ledger, client=client, settings=settings, policy=policy, cache=cache,
                            concurrency=options.concurrency, force=options.force, max_cost=options.max_cost,
                            recovery=recovery, only=only, hooks=hooks)
        pipeline.stats.simulated = run.simulated
        if attach is not None:
            await stack.enter_async_context(attach(pipeline))
        engine = Resilience.find(policy)
        tally = EventTally()
        if engine is not None:
            ProgressObserver(pipeline.stats).attach(engine.events)
            tally.attach(engine.events)
            if session is not None:
                session.listen(engine.events)
            if engine.breaker_config is not None:
                with hooks.background():
                    await stack.enter_async_context(BreakerSync(BreakerStore(ledger.engine), engine, run_id=run.id,
                                                                poll_interval=engine.breaker_config.poll_interval))
            if engine.ratelimit is not None:
                # Published every RL_PUBLISH_INTERVAL s for `ratelimit status` in another terminal.
                stack.push_async_callback(engine.aclose)
                with hooks.background():
                    await stack.enter_async_context(engine.publishing(
                        lambda snapshot: asyncio.to_thread(ledger.merge_run_metrics, run.id, {"ratelimit": snapshot})))
        # A heartbeat for `monitor` and `runs` in another terminal (live counters, pause reason, options); its last
        # beat is written before the pool statistics below are taken, so none of its connections is counted.
        owner, invocation = process_owner(), _invocation_options(options)
        heartbeat = publishing_progress(
            lambda snapshot: asyncio.to_thread(ledger.merge_run_metrics, run.id, {"progress": snapshot}),
            lambda active: progress_snapshot(pipeline.stats, owner=owner, options=invocation, active=active))
        async with contextlib.AsyncExitStack() as beating:
            with hooks.background():  # housekeeping, like the limit publishing: not traced
                await beating.enter_async_context(heartbeat)
            async with reporter.live(pipeline.stats):
                with _traced(session, hooks, run, pipeline, engine, resumed=resumed) as scope:
                    outcome = await pipeline.run(run)
                    if scope is not None:
                        scope.outcome(outcome)
        await cache.aclose()  # the run's reads are done: its connection is back before the pool is measured
        monitor = pool_monitor(ledger.engine)
        metrics: dict[str, Any] = {"cache": cache.stats(), "pool": monitor.snapshot().to_dict() if monitor else None,
                                   "recovery": {"applied": dict(sorted(pipeline.stats.recoveries.items())),
                                                "fallback_models": list(recovery.fallback_models),
                                                "registry": describe(recovery)}}
        if engine is not None:
            metrics["resilience_events"] = tally.to_dict()
            if engine.breaker_config is not None:
                metrics["circuit_breakers"] = engine.breaker_snapshot()
        await asyncio.to_thread(ledger.merge_run_metrics, run.id, metrics)
        return outcome, metrics["cache"]
    raise AssertionError("unreachable")  # pragma: no cover


def shared_limits_problem(policy: CallPolicy) -> str | None:
    """Why workers using ``policy`` would not share the provider's limits, or None."""
    engine = Resilience.find(policy)
    if engine is None or engine.ratelimit is None:
        return None
    limits = engine.ratelimit.settings
    if limits.backend == "redis" or (limits.requests_per_minute is None and limits.tokens_per_minute is None
                                     and not limits.adaptive):
        return None
    return ("workers share the provider's limits through Redis: set RL_BACKEND=redis (and RL_REDIS_URL) for every "
            "worker, or RL_ENABLED=false; with RL_BACKEND=memory each worker would spend the whole limit alone")


async def _delegate(options: ProcessOptions, ledger: Ledger, run: RunRecord, url: Any,
                    reporter: Reporter) -> RunOutcome:
    """``--workers N``: N local workers do the run; a simulated provider is one simulator they all call."""
    assert options.workers
    async with contextlib.AsyncExitStack() as stack:
        if options.provider == ProviderName.SIMULATED and options.base_url is None:
            simulator = await stack.enter_async_context(run_simulator(options.simulator))
            options = replace(options, base_url=simulator.base_url)
        args, env = _worker_command(options, run, url)
        return await delegate(ledger, run, options.workers, args, env, live=reporter.live)
    raise AssertionError("unreachable")  # pragma: no cover


def _worker_command(options: ProcessOptions, run: RunRecord, url: Any) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment of `process --workers`' local workers: this invocation's options, the
    database and the key in the environment (a command line is readable by every user of the machine)."""
    args = ["--run", str(run.id), "--concurrency", str(options.concurrency)]
    rpm, tpm = options.rpm, options.tpm
    if options.provider == ProviderName.SIMULATED:
        rpm = rpm or options.simulator.requests_per_minute
        tpm = tpm or options.simulator.tokens_per_minute
    for flag, value in (("--base-url", options.base_url), ("--timeout", options.timeout), ("--rpm", rpm),
                        ("--tpm", tpm), ("--max-cost", options.max_cost), ("--model-kind", options.model_kind),
                        ("--max-attempts", options.retry.max_attempts if options.retry else None),
                        ("--breaker-max-wait", options.breaker.max_wait if options.breaker else None)):
        if value is not None:
            args += [flag, str(value)]
    for model in options.fallback_models:
        args += ["--fallback-model", model]
    env = {**(options.env if options.env is not None else os.environ),
           DATABASE_URL_ENV: url.render_as_string(hide_password=False)}
    if options.api_key:
        env["OPENROUTER_API_KEY" if options.provider == ProviderName.OPENROUTER else "OPENAI_API_KEY"] = \
            options.api_key
    return args, env


def _invocation_options(options: ProcessOptions) -> dict[str, Any]:
    """The options of this invocation that shape how (not what) it runs, for `runs show` and `monitor`."""
    return {"concurrency": options.concurrency, "max_cost": options.max_cost, "rpm": options.rpm, "tpm": options.tpm,
            "timeout": options.timeout, "force": options.force, "output": str(options.output_path),
            "format": options.export_format,
            "max_attempts": options.retry.max_attempts if options.retry else None,
            "breaker_max_wait": options.breaker.max_wait if options.breaker else None,
            "fallback_models": list(options.fallback_models), "retry_failed": options.retry_failed,
            "config_files": [str(path) for path in config_files()]}


def _traced(session: Telemetry | None, hooks: RunHooks, run: RunRecord, pipeline: Pipeline,
            engine: Resilience | None, *, resumed: bool) -> contextlib.AbstractContextManager[RunScope | None]:
    """The run's span and gauges when telemetry is on."""
    if session is None:
        return contextlib.nullcontext()
    from flashcard_pipeline.telemetry import TelemetryHooks

    assert isinstance(hooks, TelemetryHooks)
    return session.run(run, hooks, pipeline.stats, spent=lambda: pipeline.spent, max_cost=pipeline.max_cost,
                       pool=pool_monitor(pipeline.ledger.engine), resumed=resumed,
                       limit_groups=(lambda: engine.limit_groups) if engine is not None else tuple)


async def _estimate(options: ProcessOptions, reader: VocabularyReader, settings: StageSettings, ledger: Ledger,
                    cache: CompressedCache) -> DryRunEstimate:
    """What a run would send, reading answers already paid for where a run would find them: the configured
    cache (Redis included), else the answers stored with earlier runs."""

    async def paid(staged: StageRequest) -> str | None:
        if options.force:
            return None
        value = await cache.get(staged.cache_key, staged.stage, count=False)
        if value is not None or cache.backend.restores:
            return None if value is None else value.decode("utf-8")
        return await asyncio.to_thread(ledger.payload_for_cache_key, staged.cache_key,
                                       newer_than=cache.retired_before(staged.stage))

    items = requests = cached = prompt_tokens = completion_tokens = max_completion = 0
    for item in await asyncio.to_thread(list, _selected(reader, options)):
        items += 1
        staged = build_nuance_request(item, settings)
        prompt = staged.estimated_tokens - staged.request.max_tokens
        answer = await paid(staged)
        if answer is not None:
            cached += 1
            cards = build_cards_request(item, parse_nuance(answer, item), settings)
            if await paid(cards) is not None:
                cached += 1
                continue
        else:
            requests += 1
            prompt_tokens += prompt
            completion_tokens += TYPICAL_COMPLETION_TOKENS[NUANCE]
            max_completion += staged.request.max_tokens
        # Stage 2 carries the analysis in its prompt: roughly stage 1's prompt plus its answer.
        requests += 1
        prompt_tokens += prompt + TYPICAL_COMPLETION_TOKENS[NUANCE]
        completion_tokens += TYPICAL_COMPLETION_TOKENS[CARDS]
        max_completion += settings.cards_prompt.max_tokens
    price = price_for(settings.provider, settings.model)
    cost = price.cost(prompt_tokens, completion_tokens) if price else None
    return DryRunEstimate(items=items, requests=requests, cached_stages=cached, prompt_tokens=prompt_tokens,
                          completion_tokens=completion_tokens, max_completion_tokens=max_completion,
                          cost_usd=cost, problems=list(reader.problems),
                          simulated=settings.provider == ProviderName.SIMULATED)
