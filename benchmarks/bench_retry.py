"""Retry benchmarks: happy-path overhead against tenacity, stamina and backoff, and a contention model.

    pip install -e '.[bench]'
    python benchmarks/bench_retry.py                 # both parts, markdown tables on stdout
    python benchmarks/bench_retry.py --part overhead --iterations 50000 --repeats 9

Part 1 wraps a no-op coroutine that succeeds at once and times N awaited calls per wrapper, with
the wrappers interleaved in every repeat so that machine noise hits them alike; the bare call is
timed the same way and subtracted, leaving each library's own cost per call. The table reports
medians over the repeats and each overhead as a multiple of ours.

Part 2 is a discrete-event model on a virtual clock (nothing sleeps): N clients send one request
each at the same instant to a server that admits C requests per sliding second and answers the
rest with a bare 429; every client retries until admitted with the delays of our RetryConfig under
each jitter strategy. It reports total calls (load put on the server) and when the last and the
median client got through, as medians over several seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import platform
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from flashcard_pipeline.errors import StructuredError
from flashcard_pipeline.resilience import CallContext
from flashcard_pipeline.resilience.retry import JitterStrategy, RetryConfig, RetryPolicy

CONTEXT = CallContext(stage="nuance", item_key="bench", provider="bench", model="bench", estimated_tokens=1)


async def noop() -> int:
    return 1


def wrappers() -> dict[str, Callable[[], Awaitable[int]]]:
    """One zero-argument coroutine function per contender, each configured like ours: 3 attempts,
    exponential back-off with jitter, retry on StructuredError."""
    import backoff
    import stamina
    import tenacity

    policy = RetryPolicy(RetryConfig())
    execute = policy.execute

    def ours() -> Awaitable[int]:
        return execute(noop, CONTEXT)

    @tenacity.retry(stop=tenacity.stop_after_attempt(3),
                    wait=tenacity.wait_random_exponential(multiplier=1, max=60),
                    retry=tenacity.retry_if_exception_type(StructuredError), reraise=True)
    async def with_tenacity() -> int:
        return await noop()

    @stamina.retry(on=StructuredError, attempts=3, wait_initial=1.0, wait_max=60.0)
    async def with_stamina() -> int:
        return await noop()

    @backoff.on_exception(backoff.expo, StructuredError, max_tries=3, max_value=60, jitter=backoff.full_jitter)
    async def with_backoff() -> int:
        return await noop()

    return {"bare call": noop, "ours (RetryPolicy)": ours, "tenacity": with_tenacity, "stamina": with_stamina,
            "backoff": with_backoff}


async def _time(fn: Callable[[], Awaitable[int]], iterations: int) -> float:
    started = time.perf_counter()
    for _ in range(iterations):
        await fn()
    return time.perf_counter() - started


async def measure_overhead(iterations: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds per call and median overhead per call over the bare call, per contender."""
    contenders = wrappers()
    for fn in contenders.values():  # warm-up: imports, caches, first-call paths
        await _time(fn, min(iterations, 2_000))
    per_call: dict[str, list[float]] = {name: [] for name in contenders}
    overhead: dict[str, list[float]] = {name: [] for name in contenders}
    for repeat in range(repeats):
        names = list(contenders)
        random.Random(repeat).shuffle(names)
        elapsed = {name: await _time(contenders[name], iterations) / iterations for name in names}
        for name, seconds in elapsed.items():
            per_call[name].append(seconds)
            overhead[name].append(seconds - elapsed["bare call"])
    return {name: (statistics.median(per_call[name]), statistics.median(overhead[name])) for name in contenders}


def overhead_table(results: dict[str, tuple[float, float]], iterations: int, repeats: int) -> str:
    ours = results["ours (RetryPolicy)"][1]
    lines = [f"{iterations:,} calls x {repeats} repeats, medians.", "",
             "| wrapper | per call (µs) | overhead over a bare call (µs) | overhead / ours |",
             "|---|---:|---:|---:|"]
    for name, (call, extra) in results.items():
        ratio = "—" if name == "bare call" else f"{extra / ours:.1f}x"
        lines.append(f"| {name} | {call * 1e6:.2f} | {max(extra, 0.0) * 1e6:.2f} | {ratio} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class ContentionResult:
    calls: int
    last_done: float
    median_done: float


def simulate_contention(config: RetryConfig, *, clients: int, capacity: int, seed: int,
                        service_time: float = 0.05, reject_time: float = 0.01) -> ContentionResult:
    """Every client needs one admitted request; the server admits ``capacity`` per sliding second."""
    rng = random.Random(seed)
    events: list[tuple[float, int]] = [(0.0, client) for client in range(clients)]
    heapq.heapify(events)
    admitted: deque[float] = deque()
    retries = [0] * clients
    previous: list[float | None] = [None] * clients
    done: list[float] = []
    calls = 0
    while events:
        now, client = heapq.heappop(events)
        calls += 1
        while admitted and admitted[0] <= now - 1.0:
            admitted.popleft()
        if len(admitted) < capacity:
            admitted.append(now)
            done.append(now + service_time)
            continue
        retries[client] += 1
        delay = config.delay(retries[client], rng, previous[client])
        previous[client] = delay
        heapq.heappush(events, (now + reject_time + delay, client))
    return ContentionResult(calls=calls, last_done=max(done), median_done=statistics.median(done))


STRATEGIES = {
    "no jitter": RetryConfig(jitter_enabled=False),
    "plan: d*(0.5+U/2)": RetryConfig(jitter_strategy=JitterStrategy.PLAN),
    "full: U(0,d)": RetryConfig(jitter_strategy=JitterStrategy.FULL),
    "decorrelated": RetryConfig(jitter_strategy=JitterStrategy.DECORRELATED),
}


def contention_table(scenarios: list[tuple[int, int]], seeds: int) -> str:
    lines = [f"Delays: RetryConfig defaults (1 s initial, x2, 60 s cap); medians over {seeds} seeds. "
             "Ideal: N calls, last client done at about N/C s.", "",
             "| clients N | capacity C/s | strategy | total calls | calls per client | last done (s) "
             "| median done (s) |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for clients, capacity in scenarios:
        for name, config in STRATEGIES.items():
            runs = [simulate_contention(config, clients=clients, capacity=capacity, seed=seed)
                    for seed in range(seeds)]
            calls = statistics.median(r.calls for r in runs)
            lines.append(f"| {clients} | {capacity} | {name} | {calls:,.0f} | {calls / clients:.1f} | "
                         f"{statistics.median(r.last_done for r in runs):.1f} | "
                         f"{statistics.median(r.median_done for r in runs):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("overhead", "contention", "all"), default="all")
    parser.add_argument("--iterations", type=int, default=20_000, help="calls per wrapper per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per contention scenario")
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()} on {platform.machine()}, {sys.platform}")
    if args.part in ("overhead", "all"):
        print("\n## Happy-path overhead\n")
        results = asyncio.run(measure_overhead(args.iterations, args.repeats))
        print(overhead_table(results, args.iterations, args.repeats))
    if args.part in ("contention", "all"):
        print("\n## Contention\n")
        print(contention_table([(100, 10), (1000, 50)], args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
