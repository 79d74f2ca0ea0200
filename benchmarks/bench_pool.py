"""Connection pool efficiency under a full pipeline run, on SQLite and on PostgreSQL.

    python benchmarks/bench_pool.py [--terms 1000] [--concurrency 16] [--repeats 3]

Runs ``process`` over ../shared/data/korean_1000_terms.csv against the in-process simulator
(no latency, so the database carries as much load as the pipeline can put on it) and prints the
pool monitor's figures for each run: efficiency is the share of checkouts served by an idle
pooled connection, without waiting and without opening one.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from flashcard_pipeline.runner import ProcessOptions, process
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "korean_1000_terms.csv"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def run_once(db_url: str, terms: int, concurrency: int, folder: Path) -> dict[str, float]:
    options = ProcessOptions(input_path=DATA, output=folder / "deck.jsonl", provider="simulated", db_url=db_url,
                             limit=terms, concurrency=concurrency)
    started = time.perf_counter()
    result = asyncio.run(process(options))
    elapsed = time.perf_counter() - started
    assert result.outcome is not None and result.outcome.stats.done == terms
    engine = open_database(db_url)
    pool = Ledger(engine).run_metrics(result.outcome.run_id)["pool"]
    engine.dispose()
    return {"seconds": elapsed, "checkouts": pool["checkouts"], "connects": pool["connects"],
            "efficiency": pool["efficiency"], "wait_mean_ms": pool["wait_mean_ms"],
            "peak_checked_out": pool["peak_checked_out"]}


def postgres_schema() -> tuple[str, str] | None:
    try:
        admin = create_engine(POSTGRES, poolclass=NullPool)
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
    except Exception as exc:
        print(f"PostgreSQL skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None
    return schema, f"{POSTGRES}?options=-csearch_path%3D{schema}"


def drop_schema(schema: str) -> None:
    admin = create_engine(POSTGRES, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.terms} terms, concurrency {args.concurrency}, {args.repeats} fresh runs per database (medians)")
    print(f"{'database':12} {'run s':>7} {'checkouts':>10} {'connects':>9} {'efficiency':>11} {'wait ms':>8} "
          f"{'peak out':>9}")
    backends = ["sqlite", "postgresql"]
    for backend in backends:
        rows = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as folder:
                if backend == "sqlite":
                    rows.append(run_once(f"sqlite:///{folder}/ledger.db", args.terms, args.concurrency, Path(folder)))
                    continue
                made = postgres_schema()
                if made is None:
                    break
                schema, url = made
                try:
                    rows.append(run_once(url, args.terms, args.concurrency, Path(folder)))
                finally:
                    drop_schema(schema)
        if rows:
            med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
            print(f"{backend:12} {med['seconds']:>7.2f} {med['checkouts']:>10.0f} {med['connects']:>9.0f} "
                  f"{med['efficiency']:>11.4f} {med['wait_mean_ms']:>8.3f} {med['peak_checked_out']:>9.0f}")


if __name__ == "__main__":
    main()
