"""``worker`` as a function: join a run that lives in PostgreSQL and work on its items beside any other workers.

The run (made by ``process``) says what to ask: provider, model, languages, prompts, ``--param`` values. A worker
brings how to reach the provider (base URL, key) and how hard to push (concurrency), takes items by lease
(:mod:`.leasing`), and shares the provider's limits with the other workers through Redis (``RL_BACKEND=redis``)
and the paid answers through the cache (the ledger's, or ``CACHE_BACKEND=redis``). It stops when the run has no
open item left; exporting stays with ``process`` or ``export --run``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from flashcard_pipeline import checks
from flashcard_pipeline.config import CacheSettings, WorkerSettings, read_settings, recovery_plan
from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.leasing import LeaseTiming, WorkerLease
from flashcard_pipeline.logging_config import add_secrets, bound
from flashcard_pipeline.pipeline import RunOutcome
from flashcard_pipeline.resilience import CallPolicy, CircuitBreakerConfig, Resilience, RetryConfig
from flashcard_pipeline.runner import (
    ProcessOptions,
    Reporter,
    SilentReporter,
    _check_services,
    _execute,
    _provider,
    _settings,
    default_policy,
    shared_limits_problem,
)
from flashcard_pipeline.simulator import SimulatorConfig
from flashcard_pipeline.storage.db import open_database, require_postgresql, resolve_database_url
from flashcard_pipeline.storage.leases import LeaseStore
from flashcard_pipeline.storage.ledger import Ledger
from flashcard_pipeline.storage.schema import RunStatus, utcnow


@dataclass(frozen=True)
class WorkerOptions:
    run_id: int
    db_url: str | None = None
    concurrency: int = 8
    base_url: str | None = None
    api_key: str | None = None
    timeout: float | None = None
    rpm: float | None = None
    tpm: float | None = None
    retry: RetryConfig | None = None
    breaker: CircuitBreakerConfig | None = None
    max_cost: float | None = None
    fallback_models: tuple[str, ...] = ()
    model_kind: str | None = None
    #: Seconds the worker's leases last without a heartbeat; ``None`` reads WORKER_LEASE_SECONDS.
    lease_seconds: float | None = None
    #: For a simulated run without ``base_url``: this worker's own simulator.
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    env: dict[str, str] | None = None


@dataclass(frozen=True)
class WorkerResult:
    outcome: RunOutcome
    worker_id: int | None
    #: Items this worker finished (the run's other workers did the rest).
    items_done: int
    database: str


def lease_timing(lease_seconds: float | None = None) -> LeaseTiming:
    settings = read_settings(WorkerSettings)
    lease = lease_seconds if lease_seconds is not None else settings.lease_seconds
    heartbeat = min(settings.heartbeat_interval, lease / 3)
    return LeaseTiming(lease_seconds=lease, heartbeat_interval=heartbeat,
                       poll_interval=min(settings.poll_interval, lease / 3))


async def run_worker(options: WorkerOptions, reporter: Reporter | None = None, policy: CallPolicy | None = None, *,
                     clock: Callable[[], datetime] = utcnow,
                     sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                     monotonic: Callable[[], float] = time.monotonic) -> WorkerResult:
    """Work on run ``options.run_id`` until it has no open item left."""
    if options.concurrency < 1:
        raise ConfigurationError("--concurrency must be at least 1")
    if options.lease_seconds is not None and options.lease_seconds < 1:
        raise ConfigurationError("--lease must be at least 1 second")
    url = resolve_database_url(options.db_url)
    require_postgresql(url, "worker")
    timing = lease_timing(options.lease_seconds)
    engine = await asyncio.to_thread(open_database, url)
    database = engine.url.render_as_string(hide_password=True)
    try:
        ledger = Ledger(engine)
        run = await asyncio.to_thread(ledger.get_run, options.run_id)
        if run is None:
            raise ConfigurationError(f"there is no run {options.run_id} in {database}")
        process_options = ProcessOptions(
            input_path=Path(run.input_path), provider=run.provider, model=run.model, base_url=options.base_url,
            api_key=options.api_key, db_url=url, concurrency=options.concurrency, language=run.target_language,
            learner_language=run.learner_language, max_cost=options.max_cost, rpm=options.rpm, tpm=options.tpm,
            retry=options.retry, breaker=options.breaker, timeout=options.timeout,
            params=dict(run.settings.get("params") or {}), model_kind=options.model_kind,
            fallback_models=options.fallback_models, simulator=options.simulator, env=options.env)
        provider = _provider(process_options, None)
        add_secrets(provider.secrets())
        settings = _settings(process_options, provider)
        _same_requests(run.settings, settings.prompt_versions, settings.run_key_material)
        policy = policy or default_policy(process_options)
        if (problem := shared_limits_problem(policy)) is not None:
            raise ConfigurationError(problem)
        cache_settings = read_settings(CacheSettings)
        engine_policy = Resilience.find(policy)
        limits = engine_policy.ratelimit.settings if engine_policy and engine_policy.ratelimit else None
        await asyncio.to_thread(_check_services, cache_settings, limits)
        store = LeaseStore(engine)
        if (await asyncio.to_thread(store.open_items, run.id, clock())).open and run.status != RunStatus.RUNNING:
            await asyncio.to_thread(ledger.set_run_status, run.id, RunStatus.RUNNING)
        await asyncio.to_thread(checks.warm, run.target_language)
        lease = WorkerLease(store, run.id, concurrency=options.concurrency, timing=timing, clock=clock, sleep=sleep,
                            monotonic=monotonic)
        with bound(run_id=run.id):
            outcome, _ = await _execute(process_options, provider, settings, ledger, run,
                                        reporter or SilentReporter(), policy, cache_settings,
                                        recovery_plan(list(options.fallback_models)), None, resumed=True,
                                        attach=lease.attach)
        stats = outcome.stats
        return WorkerResult(outcome=outcome, worker_id=lease.worker_id, items_done=stats.done - stats.already_done,
                            database=database)
    finally:
        engine.dispose()


def _same_requests(run_settings: dict[str, Any], prompts: dict[str, str], material: dict[str, Any]) -> None:
    """A worker must make the very requests the run's other workers make (same prompts, same model kind), or
    one run would mix answers to different questions."""
    if run_settings.get("prompts") not in (None, prompts):
        raise ConfigurationError(f"this worker's prompts {prompts} are not the run's {run_settings['prompts']}: "
                                 "run workers of the same flashcard-pipeline version")
    if run_settings.get("capabilities") != material.get("capabilities"):
        raise ConfigurationError("this worker would address the model otherwise than the run does: give it the "
                                 "same --model-kind (or FLASHCARD_MODEL_KIND) as the run's `process`")
