"""Circuit breaker benchmark: overhead per call and the cost of a rejection, against pybreaker,
aiobreaker, circuitbreaker and purgatory in the same run.

    pip install -e '.[bench]'
    python benchmarks/bench_breaker.py                      # both parts, markdown tables on stdout
    python benchmarks/bench_breaker.py --part overhead --iterations 50000 --repeats 9

Part 1 (overhead) wraps a no-op coroutine that succeeds, with every breaker closed, and times N
awaited calls per contender; the contenders run interleaved in a shuffled order in every repeat so
that machine noise hits them alike, and a bare ``await`` timed the same way is subtracted, leaving
each breaker's own cost per call. Part 2 (rejection) forces every breaker open and times N calls
that it refuses, catching the exception each time: what a caller pays to learn "not now".

Each library is used the way its documentation shows for asyncio: pybreaker's ``calling()``
context manager (its ``call_async`` needs Tornado), aiobreaker's ``call_async``, circuitbreaker's
``@circuit`` decorator on a coroutine function, purgatory's ``AsyncCircuitBreakerFactory`` decorator.
Ours is timed twice: a bare :class:`CircuitBreaker` and the engine the pipeline uses, :class:`Resilience`
with a breaker only (the pipeline of the call's provider and model looked up on every call).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import platform
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from importlib.metadata import version
from typing import Any

from flashcard_pipeline.errors import ServerError
from flashcard_pipeline.resilience import CallContext, CircuitBreaker, CircuitBreakerConfig, Resilience

CONTEXT = CallContext(stage="nuance", item_key="bench", provider="bench", model="bench", estimated_tokens=1)
THRESHOLD = 5
#: Long enough that an opened breaker stays open for the whole rejection run.
OPEN_SECONDS = 3600.0
LIBRARIES = ("pybreaker", "aiobreaker", "circuitbreaker", "purgatory")


async def noop() -> int:
    return 1


async def boom() -> int:
    raise ServerError("down", status_code=503)


Contender = Callable[[], Awaitable[int]]


def contenders(failing: bool) -> dict[str, Contender]:
    """One zero-argument coroutine function per breaker, all configured alike: trip after ~5 failures,
    stay open for an hour. With ``failing`` the wrapped call raises (used to force them open)."""
    import aiobreaker
    import circuitbreaker
    import purgatory
    import pybreaker

    target = boom if failing else noop
    ours = CircuitBreaker(CircuitBreakerConfig(min_throughput=THRESHOLD, failure_ratio=0.5,
                                               break_duration=OPEN_SECONDS, max_break_duration=OPEN_SECONDS),
                          name="bench/bench")
    ours_execute = ours.execute
    policy = Resilience(breaker=CircuitBreakerConfig(min_throughput=THRESHOLD, break_duration=OPEN_SECONDS,
                                                     max_break_duration=OPEN_SECONDS, max_wait=0.0))
    policy_execute = policy.execute

    def with_ours() -> Awaitable[int]:
        return ours_execute(target)

    def with_policy() -> Awaitable[int]:
        return policy_execute(target, CONTEXT)

    py = pybreaker.CircuitBreaker(fail_max=THRESHOLD, reset_timeout=OPEN_SECONDS)
    calling = py.calling

    async def with_pybreaker() -> int:
        with calling():
            return await target()

    aio = aiobreaker.CircuitBreaker(fail_max=THRESHOLD, timeout_duration=timedelta(seconds=OPEN_SECONDS))
    aio_call = aio.call_async

    def with_aiobreaker() -> Awaitable[int]:
        return aio_call(target)

    @circuitbreaker.circuit(failure_threshold=THRESHOLD, recovery_timeout=OPEN_SECONDS, expected_exception=Exception)
    async def with_circuitbreaker() -> int:
        return await target()

    factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=THRESHOLD, default_ttl=OPEN_SECONDS)

    @factory(circuit="bench")
    async def with_purgatory() -> int:
        return await target()

    return {"ours (CircuitBreaker)": with_ours, "ours (engine: the model's breaker)": with_policy,
            "pybreaker": with_pybreaker, "aiobreaker": with_aiobreaker, "circuitbreaker": with_circuitbreaker,
            "purgatory": with_purgatory}


async def _time_ok(fn: Contender, iterations: int) -> float:
    started = time.perf_counter()
    for _ in range(iterations):
        await fn()
    return time.perf_counter() - started


async def _time_refused(fn: Contender, iterations: int) -> float:
    started = time.perf_counter()
    for _ in range(iterations):
        try:  # noqa: SIM105 - contextlib.suppress would add its own cost to every sample
            await fn()
        except Exception:  # every library has its own "open" exception
            pass
    return time.perf_counter() - started


async def _force_open(fns: dict[str, Contender]) -> None:
    for name, fn in fns.items():
        for _ in range(THRESHOLD * 4):
            with contextlib.suppress(Exception):
                await fn()
        try:
            await fn()
        except Exception:
            continue
        raise RuntimeError(f"{name} did not open")


def _medians(samples: dict[str, list[float]], iterations: int) -> dict[str, float]:
    return {name: statistics.median(values) / iterations * 1e6 for name, values in samples.items()}


async def _interleaved(fns: dict[str, Any], timer: Any, iterations: int, repeats: int,
                       seed: int) -> dict[str, float]:
    """Warm every contender up, then time them in a shuffled order per repeat; medians per call."""
    for fn in fns.values():  # warm-up: first-call allocations, lazily built state
        await timer(fn, min(iterations, 2000))
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            samples[name].append(await timer(fns[name], iterations))
    return _medians(samples, iterations)


async def overhead(iterations: int, repeats: int, seed: int) -> dict[str, float]:
    return await _interleaved({"bare call": noop, **contenders(failing=False)}, _time_ok, iterations, repeats, seed)


async def rejection(iterations: int, repeats: int, seed: int) -> dict[str, float]:
    fns = contenders(failing=True)
    await _force_open(fns)
    return await _interleaved(fns, _time_refused, iterations, repeats, seed)


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    parts += [f"{name} {version(name)}" for name in LIBRARIES]
    return ", ".join(parts)


def print_overhead(per_call: dict[str, float], iterations: int, repeats: int) -> None:
    bare = per_call["bare call"]
    ours = per_call["ours (CircuitBreaker)"] - bare
    print(f"{_versions()}. {iterations:,} calls x {repeats} repeats, medians.\n")
    print("| breaker | per call (µs) | overhead over a bare call (µs) | overhead / ours |")
    print("|---|---:|---:|---:|")
    for name, value in per_call.items():
        extra = value - bare
        ratio = "—" if name == "bare call" else f"{extra / ours:.1f}x"
        print(f"| {name} | {value:.2f} | {extra:.2f} | {ratio} |")


def print_rejection(per_call: dict[str, float], iterations: int, repeats: int) -> None:
    ours = per_call["ours (CircuitBreaker)"]
    print(f"\n{iterations:,} refused calls x {repeats} repeats, medians (raise and catch included).\n")
    print("| breaker | per refused call (µs) | / ours |")
    print("|---|---:|---:|")
    for name, value in per_call.items():
        print(f"| {name} | {value:.2f} | {value / ours:.1f}x |")


def main() -> None:
    logging.disable(logging.WARNING)  # the breakers' own trip warnings would drown the tables
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("overhead", "rejection", "both"), default="both")
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.part in ("overhead", "both"):
        print_overhead(asyncio.run(overhead(args.iterations, args.repeats, args.seed)), args.iterations, args.repeats)
    if args.part in ("rejection", "both"):
        print_rejection(asyncio.run(rejection(args.iterations, args.repeats, args.seed)), args.iterations,
                        args.repeats)


if __name__ == "__main__":
    main()
