"""Rate limiter benchmarks: acquire cost, sharding under thread contention, end to end against the simulator.

Parts (``--part``):

* ``acquire``: the cost of one uncontended ``acquire`` that is granted at once, against aiolimiter,
  pyrate-limiter and limits in the same run (interleaved, shuffled, medians).
* ``shards``: single bucket against sharded limiter, T threads hammering ``try_acquire`` and
  ``acquire`` on one limiter (each thread its own event loop), acquires per second.
* ``model``: the policy (requests + tokens limits, retry outermost) against the simulator's own
  sliding-window limiter on virtual time: minutes of traffic in a second, for tuning the adaptive loop.
  Scenarios ``noise5``, ``noise10``, ``noise20`` (independent 429s with Retry-After 1 s, no real limit;
  compared with the limiter disabled) and ``unknown+noise5`` (the limit R plus 5% independent 429s).
* ``e2e``: ``process`` against the real simulator over HTTP in real time, limited to R requests per
  minute, with the limit configured (``--rpm``) and unknown (adaptive, with and without
  ``x-ratelimit-*`` headers): achieved rate / R and 429s.

Not a test: CI does not run it. ``pip install -e '.[bench]'`` brings the comparison libraries.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashcard_pipeline.errors import RateLimitError
from flashcard_pipeline.resilience import (
    CallContext,
    ProviderAnswer,
    RateLimiter,
    RateLimitSettings,
    Resilience,
    RetryConfig,
    ShardedRateLimiter,
)
from flashcard_pipeline.resilience.testing import VirtualClock

# -- virtual time for the model ------------------------------------------------------------------------



@dataclass
class ModelResult:
    scenario: str
    limit_rpm: int
    minutes: float
    successes: int
    successes_after_first_minute: int
    achieved_share: float
    achieved_share_after_first_minute: float
    requests: int
    rate_limited: int
    requests_after_first_minute: int
    rate_limited_after_first_minute: int
    failed_items: int
    final_planned_rpm: float | None
    noise_429s: int = 0
    verdict: str = "-"


#: Scenarios with independent 429s (Retry-After 1 s, whatever the rate): the share, and whether the provider also
#: enforces the limit R. Without a limit the row is compared with the same provider and the limiter disabled.
NOISE = {"noise5": (0.05, False), "noise10": (0.10, False), "noise20": (0.20, False),
         "unknown+noise5": (0.05, True)}


async def _model_run(scenario: str, limit_rpm: int, *, settings: RateLimitSettings | None, minutes: float,
                     concurrency: int, latency: tuple[float, float], headers: bool, seed: int) -> ModelResult:
    from flashcard_pipeline.simulator.server import _Window

    clock = VirtualClock()
    noise, limited = NOISE.get(scenario, (0.0, True))
    window = _Window(limit_rpm, None, clock.monotonic) if limited else None
    rng = random.Random(seed)
    pipeline = Resilience(retry=RetryConfig(max_attempts=6, max_elapsed=None), ratelimit=settings, clock=clock,
                          rng=random.Random(seed))
    log: list[tuple[float, bool]] = []
    noisy: list[float] = []
    failed = 0
    duration = minutes * 60

    async def call(context: CallContext) -> str:
        entry = None
        if window is not None:
            entry, wait = window.admit(600)
            if entry is None:
                log.append((clock.monotonic(), False))
                await clock.sleep(0.005)
                raise RateLimitError("429", status_code=429, retry_after=float(max(1, math.ceil(wait))))
        if noise and rng.random() < noise:
            noisy.append(clock.monotonic())
            await clock.sleep(0.005)
            raise RateLimitError("429", status_code=429, retry_after=1.0)
        log.append((clock.monotonic(), True))
        await clock.sleep(rng.uniform(*latency))
        if window is not None:
            window.add(entry, 400)
        sent: dict[str, str] = {}
        if headers:
            sent = {"x-ratelimit-limit-requests": str(limit_rpm)}
        context.report(ProviderAnswer(1000, sent))  # what the pipeline's attempt reports: usage, headers
        return "ok"

    async def worker(index: int) -> None:
        nonlocal failed
        for item in itertools.count():
            context = CallContext("nuance", f"w{index}-{item}", "sim", "m", 2100)
            try:
                await pipeline.execute(lambda context=context: call(context), context)
            except RateLimitError:
                failed += 1

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    await clock.run(duration)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    log = [(t, success) for t, success in log if t < duration]
    ok = sum(1 for _, success in log if success)
    late = [(t, s) for t, s in log if t >= 60]
    ok_late = sum(1 for _, success in late if success)
    groups = pipeline.limit_groups
    return ModelResult(
        scenario=scenario, limit_rpm=limit_rpm, minutes=minutes, successes=ok,
        successes_after_first_minute=ok_late,
        achieved_share=ok / (limit_rpm * minutes),
        achieved_share_after_first_minute=ok_late / (limit_rpm * (minutes - 1)),
        requests=len(log), rate_limited=len(log) - ok, requests_after_first_minute=len(late),
        rate_limited_after_first_minute=len(late) - ok_late, failed_items=failed,
        final_planned_rpm=groups[0].requests.planned if groups else None,
        noise_429s=sum(1 for t in noisy if t < duration), verdict=groups[0].signal.verdict if groups else "-")


def run_model(args: argparse.Namespace) -> list[ModelResult]:
    results = []
    for limit in args.limits:
        for scenario in args.scenarios:
            overrides: dict[str, Any] = {}
            headers = scenario == "headers"
            if scenario == "configured":
                overrides["requests_per_minute"] = limit
            if scenario == "sliding":
                overrides.update(requests_per_minute=limit, algorithm="sliding_window")
            settings = RateLimitSettings(**overrides, **dict(args.set or []))
            kwargs: dict[str, Any] = dict(minutes=args.minutes, concurrency=args.concurrency, latency=(0.05, 0.4),
                                          headers=headers, seed=args.seed)
            r = asyncio.run(_model_run(scenario, limit, settings=settings, **kwargs))
            results.append(r)
            versus = ""
            if scenario in NOISE and not NOISE[scenario][1]:
                bare = asyncio.run(_model_run(scenario, limit, settings=None, **kwargs))
                versus = (f" ok after 1st min {r.successes_after_first_minute} = "
                          f"{r.successes_after_first_minute / max(1, bare.successes_after_first_minute):.1%} of the "
                          f"limiter disabled ({bare.successes_after_first_minute})")
            planned = "-" if r.final_planned_rpm is None else f"{r.final_planned_rpm:.0f}"
            print(f"{r.scenario:14} R={r.limit_rpm:5} achieved {r.achieved_share:6.1%} (after 1st min "
                  f"{r.achieved_share_after_first_minute:6.1%}) limit 429s {r.rate_limited:4}/{r.requests:6} "
                  f"after 1st min {r.rate_limited_after_first_minute:4}/{r.requests_after_first_minute:6} "
                  f"({r.rate_limited_after_first_minute / max(1, r.requests_after_first_minute):.2%}) "
                  f"independent 429s {r.noise_429s} failed {r.failed_items} planned {planned} "
                  f"verdict {r.verdict}{versus}", flush=True)
    return results


# -- acquire cost -----------------------------------------------------------------------------------------

def _contenders() -> dict[str, Callable[[], Callable[[], Awaitable[Any]]]]:
    """Factories of one ``acquire`` each, all with a limit so high that nobody ever waits."""
    huge = 10**9

    def ours() -> Callable[[], Awaitable[Any]]:
        return RateLimiter(huge, huge).acquire

    def ours_sharded() -> Callable[[], Awaitable[Any]]:
        limiter = ShardedRateLimiter(huge, huge, shards=4)
        return lambda: limiter.acquire(key="word")

    def ours_policy() -> Callable[[], Awaitable[Any]]:
        policy = Resilience(ratelimit=RateLimitSettings(requests_per_minute=huge * 60, tokens_per_minute=huge * 60))
        context = CallContext("nuance", "word", "p", "m", 1000)
        answer = ProviderAnswer(400)

        async def call() -> str:
            context.report(answer)  # as the pipeline's attempt does: the usage the refund settles against
            return "ok"

        return lambda: policy.execute(call, context)

    def aiolimiter_() -> Callable[[], Awaitable[Any]]:
        from aiolimiter import AsyncLimiter

        return AsyncLimiter(huge, 1).acquire

    def pyrate() -> Callable[[], Awaitable[Any]]:
        from pyrate_limiter import Duration, Limiter, Rate

        limiter = Limiter(Rate(huge, Duration.SECOND))
        return lambda: limiter.try_acquire_async("word")

    def limits_fixed() -> Callable[[], Awaitable[Any]]:
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import MemoryStorage
        from limits.aio.strategies import FixedWindowRateLimiter

        limiter, item = FixedWindowRateLimiter(MemoryStorage()), RateLimitItemPerSecond(huge)
        return lambda: limiter.hit(item, "word")

    def limits_moving() -> Callable[[], Awaitable[Any]]:
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import MemoryStorage
        from limits.aio.strategies import MovingWindowRateLimiter

        limiter, item = MovingWindowRateLimiter(MemoryStorage()), RateLimitItemPerSecond(huge)
        return lambda: limiter.hit(item, "word")

    return {"ours: RateLimiter.acquire": ours, "ours: ShardedRateLimiter.acquire (4 shards)": ours_sharded,
            "ours: whole policy per call (requests + tokens + refund)": ours_policy,
            "aiolimiter AsyncLimiter.acquire": aiolimiter_, "pyrate-limiter try_acquire_async": pyrate,
            "limits (aio) FixedWindow.hit": limits_fixed, "limits (aio) MovingWindow.hit": limits_moving}


async def _bare() -> None:
    return None


#: Calls between two turns of the event loop. A tight loop of awaits that never suspend would starve every
#: background task: limits' MovingWindow expires its log in one, so without these turns its row grew with
#: --iterations (8.3 µs at 5,000 calls, 26.8 µs at 200,000). Every contender, and the bare await, gets the same.
_YIELD_EVERY = 64


async def _warm_up(acquire: Callable[[], Awaitable[Any]], seconds: float = 1.2) -> None:
    """Call until more than one window has passed, so a limiter whose state grows with the calls inside its window
    (limits' MovingWindow keeps a log of the last second) is measured in its steady state, not while still empty."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await _per_call(acquire, 1_000)


async def _per_call(acquire: Callable[[], Awaitable[Any]], iterations: int) -> float:
    clock = time.perf_counter
    started = clock()
    for i in range(iterations):
        await acquire()
        if i % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
    return (clock() - started) / iterations


def run_acquire(args: argparse.Namespace) -> None:
    import importlib.metadata as md

    factories = _contenders()
    samples: dict[str, list[float]] = {name: [] for name in [*factories, "bare await"]}
    rng = random.Random(args.seed)

    async def main() -> None:
        for _ in range(args.repeats):
            order = [*factories, "bare await"]
            rng.shuffle(order)
            for name in order:
                acquire = _bare if name == "bare await" else factories[name]()
                await _warm_up(acquire)
                gc.collect()
                samples[name].append(await _per_call(acquire, args.iterations))

    asyncio.run(main())
    bare = statistics.median(samples["bare await"])
    ours = statistics.median(samples["ours: RateLimiter.acquire"]) - bare
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("aiolimiter", "pyrate-limiter", "limits"))
    print(f"Python {sys.version.split()[0]}, {versions}. {args.iterations:,} acquires x {args.repeats} repeats, "
          "medians.\n")
    print("| limiter | per acquire (µs) | over a bare await (µs) | / ours |")
    print("|---|---:|---:|---:|")
    for name, values in samples.items():
        median = statistics.median(values)
        over = median - bare
        ratio = "—" if name == "bare await" else f"{over / ours:.1f}x"
        print(f"| {name} | {median * 1e6:.2f} | {over * 1e6:.2f} | {ratio} |")


# -- single against sharded under thread contention ------------------------------------------------------

def _hammer(limiter: RateLimiter, threads: int, seconds: float, waiting: bool) -> tuple[int, float]:
    """``threads`` threads, each its own event loop, calling the limiter between one shared start and
    deadline: (granted, seconds from the start to the last call's end)."""
    granted = [0] * threads
    ended = [0.0] * threads
    window: list[float] = []
    barrier = threading.Barrier(threads + 1)

    def work(index: int) -> None:
        async def run() -> None:
            acquire, try_acquire = limiter.acquire, limiter.try_acquire
            barrier.wait()
            begin, deadline = window
            while time.perf_counter() < begin:
                pass
            n = ok = 0
            while time.perf_counter() < deadline:
                for i in range(50):
                    key = f"t{index}-{n + i}"
                    if waiting:
                        await acquire(key=key)
                        ok += 1
                    else:
                        ok += await try_acquire(key=key)
                n += 50
            granted[index], ended[index] = ok, time.perf_counter()
        asyncio.run(run())

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    begin = time.perf_counter() + 0.2
    window.extend([begin, begin + seconds])
    barrier.wait()
    for worker in workers:
        worker.join()
    return sum(granted), max(ended) - begin


def run_shards(args: argparse.Namespace) -> None:
    print(f"Python {sys.version.split()[0]} (GIL), {os.cpu_count()} cores; {args.seconds:g} s per cell, "
          f"best of {args.repeats}.\n")
    print("| threads | limiter | limit far away: acquires/s | limit 20,000/s, burst 400: admitted/s | "
          "admitted / (rate x T + burst) |")
    print("|---:|---|---:|---:|---:|")
    for threads in args.threads:
        for label, make in (("single bucket", lambda rate, burst: RateLimiter(rate, burst)),
                            ("sharded, 4 shards", lambda rate, burst: ShardedRateLimiter(rate, burst, shards=4)),
                            ("sharded, 16 shards", lambda rate, burst: ShardedRateLimiter(rate, burst, shards=16))):
            free = max(n / span for n, span in (_hammer(make(10**12, 10**12), threads, args.seconds, True)
                                                for _ in range(args.repeats)))
            bound = [_hammer(make(20_000, 400), threads, args.seconds, False) for _ in range(args.repeats)]
            admitted, span = max(bound, key=lambda result: result[0] / result[1])
            print(f"| {threads} | {label} | {free:,.0f} | {admitted / span:,.0f} | "
                  f"{admitted / (20_000 * span + 400):.1%} |", flush=True)


# -- end to end against the simulator -----------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stats(port: int) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as reply:
        return json.loads(reply.read())


def _e2e_once(limit: int, scenario: str, minutes: float, concurrency: int, words: Path) -> dict[str, Any]:
    import subprocess

    port = _free_port()
    sim = [f"requests_per_minute={limit}", "latency=0.05,0.3", "seed=3"]
    if scenario == "unknown":
        sim.append("rate_limit_headers=false")
    server = subprocess.Popen([sys.executable, "-m", "flashcard_pipeline", "simulate", "--port", str(port),
                               *[arg for pair in sim for arg in ("--sim", pair)]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                _stats(port)
                break
            except OSError:
                time.sleep(0.1)
        items = int(limit * minutes / 2)
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "flashcard_pipeline", "process", str(words), "--limit", str(items),
                       "--provider", "openai-compatible", "--base-url", f"http://127.0.0.1:{port}/v1",
                       "--model", "sim", "--db", f"sqlite:///{tmp}/ledger.db", "-o", f"{tmp}/out.jsonl",
                       "--concurrency", str(concurrency), "--max-attempts", "6"]
            if scenario == "configured":
                command += ["--rpm", str(limit)]
            env = {k: v for k, v in os.environ.items() if not k.startswith("RL_")}
            started = time.monotonic()
            run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
            series: list[tuple[float, dict[str, Any]]] = []
            while run.poll() is None:
                series.append((time.monotonic() - started, _stats(port)))
                time.sleep(0.25)
            series.append((time.monotonic() - started, _stats(port)))
            if run.returncode not in (0, 1):
                raise RuntimeError(f"process failed ({run.returncode}): {run.stderr.read() if run.stderr else ''}")
    finally:
        server.terminate()
        server.wait()

    # The active window: from the first request the simulator saw to the last (start-up and export excluded).
    end = series[-1][1]
    begin_t = next(t for t, stats in series if stats["total"] > 0)
    end_t = next(t for t, stats in series if stats["total"] == end["total"])
    minute_t = begin_t + 60.0
    first = next((stats for t, stats in series if t >= minute_t), end)
    ok, limited = end["outcomes"]["ok"], end["outcomes"]["rate_limited"]
    ok_late = ok - first["outcomes"]["ok"]
    limited_late = limited - first["outcomes"]["rate_limited"]
    late_seconds = end_t - minute_t
    return {"limit": limit, "scenario": scenario, "seconds": round(end_t - begin_t, 1), "requests": end["total"],
            "ok": ok, "rate_limited": limited, "achieved": ok / (limit * (end_t - begin_t) / 60),
            "achieved_after_first_minute": ok_late / (limit * late_seconds / 60) if late_seconds > 0 else math.nan,
            "rate_limited_after_first_minute": limited_late, "requests_after_first_minute": ok_late + limited_late}


def run_e2e(args: argparse.Namespace) -> None:
    words = Path(__file__).resolve().parents[2] / "shared" / "data" / "korean_10k.csv"
    if not words.exists():
        raise SystemExit(f"{words} not found: the end-to-end part reads the shared 10k word list")
    print("| R (req/min) | limit | run (s) | requests | 429s | achieved / R | after the 1st minute: achieved / R "
          "| 429s / requests |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for limit in args.limits:
        for scenario in args.scenarios:
            minutes = args.minutes if scenario == "configured" else args.minutes_unknown
            r = _e2e_once(limit, scenario, minutes, args.concurrency, words)
            late = r["requests_after_first_minute"]
            share = r["rate_limited_after_first_minute"] / late if late else 0.0
            label = {"configured": "configured (--rpm R)", "unknown": "unknown, no headers",
                     "headers": "unknown, x-ratelimit-* headers"}[scenario]
            print(f"| {limit} | {label} | {r['seconds']:.0f} | {r['requests']:,} | {r['rate_limited']} | "
                  f"{r['achieved']:.1%} | {r['achieved_after_first_minute']:.1%} | "
                  f"{r['rate_limited_after_first_minute']} / {late:,} ({share:.2%}) |", flush=True)


def _pair(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    return key, float(value) if value.replace(".", "", 1).isdigit() else value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["acquire", "shards", "model", "e2e"], required=True)
    parser.add_argument("--limits", type=int, nargs="+", default=[600])
    parser.add_argument("--scenarios", nargs="+", default=["configured", "unknown", "headers"])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", type=_pair, action="append", help="RateLimitSettings field=value")
    parser.add_argument("--iterations", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--minutes-unknown", type=float, default=5.0)
    args = parser.parse_args(argv)
    {"model": run_model, "acquire": run_acquire, "shards": run_shards, "e2e": run_e2e}[args.part](args)


if __name__ == "__main__":
    main()
