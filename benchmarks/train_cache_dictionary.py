"""Train the preset dictionary the cache's zlib codec ships with (a development tool, not a benchmark).

    python benchmarks/train_cache_dictionary.py   # needs: pip install -e '.[bench]'

Trains on answers whose text comes from the second half of the 10k list only, so the cache
benchmark, which measures the first half, is not flattered. Writes
src/flashcard_pipeline/cache/dictionaries/<name>.zdict; a new dictionary needs a new name, because
entries stored with the old one can only be read with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_payloads import split_payloads

NAME = "stage-v1"
SIZE = 32 * 1024

if __name__ == "__main__":
    training, _ = split_payloads()
    dictionary = zstandard.train_dictionary(SIZE, training)
    target = (Path(__file__).resolve().parents[1] / "src" / "flashcard_pipeline" / "cache" / "dictionaries"
              / f"{NAME}.zdict")
    target.write_bytes(dictionary.as_bytes())
    print(f"wrote {target} ({len(dictionary.as_bytes())} bytes from {len(training)} answers)")
