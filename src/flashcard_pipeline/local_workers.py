"""``process --workers N``: N ``worker`` processes on this machine, started and awaited by ``process``.

They are ordinary ``flashcard-pipeline worker`` processes (the same as on other machines), so a local run and a
run spread over many machines behave alike. Secrets travel in their environment, never on their command line
(which any user of the machine can read); Ctrl-C reaches each as SIGINT, so each gives its items back.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.pipeline import RunOutcome, RunStats
from flashcard_pipeline.storage.ledger import Ledger, RunRecord, RunSummary
from flashcard_pipeline.storage.schema import RunStatus

#: Seconds a worker gets to give its items back after Ctrl-C before it is killed (its leases then expire).
STOP_GRACE = 10.0


async def run_local_workers(count: int, args: Sequence[str], env: Mapping[str, str]) -> list[int]:
    """Start ``count`` × ``flashcard-pipeline worker ARGS`` and return their exit codes once all have ended."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(count):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "flashcard_pipeline", "--quiet", "worker", *args, env=dict(env),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL))
        return list(await asyncio.gather(*(proc.wait() for proc in procs)))
    finally:
        await _stop(procs)


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    """Interrupt the workers still running (cancelled, or one failed to start), then kill the slow ones."""
    running = [proc for proc in procs if proc.returncode is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    for proc in running:
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def delegate(ledger: Ledger, run: RunRecord, count: int, args: Sequence[str], env: Mapping[str, str], *,
                   live: Callable[[RunStats], contextlib.AbstractAsyncContextManager[None]],
                   interval: float = 1.0) -> RunOutcome:
    """Run ``count`` local workers on ``run`` and return the run's outcome as the ledger has it afterwards; the
    progress display follows the ledger meanwhile (the workers' counters live in their processes)."""
    before = await asyncio.to_thread(ledger.summary, run.id)
    stats = RunStats(total=before.total, done=before.done, already_done=before.done, simulated=run.simulated)

    def follow(summary: RunSummary) -> None:
        stats.done, stats.failed, stats.quarantined = summary.done, summary.failed, summary.quarantined
        stats.requests, stats.api_errors = summary.api_calls - before.api_calls, summary.api_errors - before.api_errors
        stats.tokens_in, stats.tokens_out = summary.tokens_in - before.tokens_in, summary.tokens_out - before.tokens_out
        stats.cost_usd = summary.cost_usd - before.cost_usd
        stats.cache_hits = summary.cached_stages - before.cached_stages

    async def poll() -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                follow(await asyncio.to_thread(ledger.summary, run.id))

    async with live(stats):
        poller = asyncio.create_task(poll(), name="workers-progress")
        try:
            codes = await run_local_workers(count, args, env)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
    if codes and all(code == 2 for code in codes):
        raise ConfigurationError(f"the {count} workers refused to start (their reason is above)")
    after = await asyncio.to_thread(ledger.summary, run.id)
    follow(after)
    if any(code == 3 for code in codes):
        status = RunStatus.ABORTED
    else:
        status = RunStatus.COMPLETED if after.pending == 0 and after.failed == 0 else RunStatus.FAILED
    await asyncio.to_thread(ledger.set_run_status, run.id, status)
    return RunOutcome(run_id=run.id, status=status, stats=stats,
                      failures=await asyncio.to_thread(ledger.failures, run.id),
                      abort_reason="a worker stopped the run (its reason is above)" if status is RunStatus.ABORTED
                      else None,
                      flagged=await asyncio.to_thread(ledger.flagged, run.id),
                      quarantined=await asyncio.to_thread(ledger.quarantined, run.id))
