"""The success-metrics benchmark at tiny sizes, so it cannot rot: both sides run the workload and every row of the
plan's table is filled."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "success_metrics.py"


@pytest.mark.slow
def test_the_smoke_run_fills_every_row_of_the_plans_table(capsys: pytest.CaptureFixture[str]) -> None:
    shared_file("korean_1000_terms.csv")
    spec = importlib.util.spec_from_file_location("success_metrics", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["success_metrics"] = module
    spec.loader.exec_module(module)
    rows = module.run(["--smoke"])
    metrics = [row[0] for row in rows]
    assert metrics == ["error rate (items failed)", "p95 item latency (s)", "p99 item latency (s)",
                       "circuit breaker trips", "requests sent into the outage", "429s received", "pool efficiency",
                       "cache hit rate, second run", "cache hits on words the first run answered",
                       "words finished, both runs", "total cost (simulated $)", "cost per finished word (simulated $)",
                       "wall time (s)"]
    by_metric = {row[0]: row for row in rows}
    assert by_metric["cache hit rate, second run"][1] == "0%", "the baseline has no cache"
    hit_rate = int(by_metric["cache hit rate, second run"][2].rstrip("%"))
    assert hit_rate >= 50, "70% of the second list's words were answered in the first run"
    assert by_metric["pool efficiency"][2].endswith("%")
    repeated = by_metric["cache hits on words the first run answered"]
    assert repeated[2] == "100%", "a word paid for once is never paid again"
    assert int(by_metric["words finished, both runs"][2]) >= 8
    assert all(row[1] and row[2] for row in rows)
    assert "| metric | baseline | project |" in capsys.readouterr().out
