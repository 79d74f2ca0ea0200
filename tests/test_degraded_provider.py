"""The degraded-provider benchmark at CI size: independent 429s (Retry-After 1 s), 5xx, hangs and resets, end to end
against the simulator, with the defaults and with the limiter and the breaker disabled. Counts only, never timings:
every word is settled the same way in both runs (the simulator's faults are a function of the payload and the
attempt), no request goes out before its Retry-After and no good answer is paid twice."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.conftest import shared_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_degraded.py"


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bench_degraded", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_degraded"] = module
    spec.loader.exec_module(module)
    return module


async def test_a_degraded_provider_is_survived_the_same_with_and_without_limiter_and_breaker() -> None:
    shared_file("korean_1000_terms.csv")
    bench = _bench()
    config = bench.provider(seed=7, latency=(0.0, 0.05), timeout=0.5)
    rows = await bench.measure(8, 4, 1, config, read_timeout=0.5)
    by_label = {row.label: row for row in rows}
    ours, bare = by_label["defaults"], by_label["limiter and breaker disabled"]
    assert bare.rate_limited > 0 and ours.rate_limited > 0, "the provider did answer 429s"
    for row in rows:
        assert row.early_retries == 0, f"{row.label}: a request went out before its Retry-After"
        assert row.paid_twice == 0, f"{row.label}: a good answer was paid twice"
        assert row.done + row.failed == row.words
    assert ours.done == bare.done, "the limiter and the breaker lose no word the provider would answer"
    assert ours.circuit_opened == 0, "a provider failing a quarter of calls does not open the circuit"
