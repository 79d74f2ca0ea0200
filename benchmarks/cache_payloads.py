"""Realistic stage answers for cache benchmarks, built from real text in ../shared/data/korean_10k.csv.

Every text field of a stage answer is filled with real sentences (definitions, usage hints, example
sentences and their translations) drawn from a pool of rows, never from the simulator's word banks,
whose repetition would flatter any compressor. ``pool`` selects which rows the text comes from, so a
dictionary can be trained on one half of the list and measured on the other.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from flashcard_pipeline.models import FlashcardSet, TermAnalysis

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "korean_10k.csv"
CARD_TYPES = ["Scene", "Usage-Comparison", "Grammar", "Example", "Cultural", "Formal-Casual"]


def load_rows(path: Path = DATA) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def _clip(text: str, limit: int) -> str:
    return text.strip()[:limit].strip() or "-"


def stage_payloads(rows: list[dict[str, str]], text_rows: list[dict[str, str]], seed: int) -> list[bytes]:
    """Two validated answers (analysis, cards) per row, serialised as the cache stores them."""
    rng = random.Random(seed)
    hints = [r["Usage_Hint"] for r in text_rows if r["Usage_Hint"]]
    translations = [r["Example_Sentence_Translation"] for r in text_rows if r["Example_Sentence_Translation"]]
    out: list[bytes] = []
    for row in rows:
        def hint() -> str:
            return rng.choice(hints)

        def translation() -> str:
            return rng.choice(translations)

        analysis = TermAnalysis.model_validate({
            "term": row["Hangul"], "ipa": _clip(row["IPA_Pronunciation"], 120), "pos": row["Word_Type"],
            "primary_meaning": _clip(row["Definition"], 120), "other_meanings": _clip(translation(), 400),
            "metaphor": _clip(f"{translation()} {hint()}", 400),
            "metaphor_noun": _clip(translation().split()[-1].strip(".,!?"), 120),
            "metaphor_action": _clip(" ".join(translation().split()[:3]), 120),
            "suggested_location": _clip(translation(), 120), "anchor_object": _clip(translation(), 120),
            "anchor_sensory": _clip(hint(), 400), "explanation": _clip(f"{row['Usage_Hint']} {hint()}", 1200),
            "usage_context": _clip(hint(), 400),
            "comparison": {"vs": rng.choice(text_rows)["Hangul"], "nuance": _clip(hint(), 400)}
            if rng.random() < 0.6 else None,
            "homonyms": [], "keywords": [w.strip(".,!?") or "-" for w in translation().split()[:6]],
        })
        cards = FlashcardSet.model_validate({"cards": [
            {"card_type": card_type,
             "front": _clip(f"{row['Example_Sentence'].replace(row['Hangul'], '___')} ({translation()})", 1200),
             "back": _clip(f"{row['Hangul']} [{row['IPA_Pronunciation']}] — {row['Definition']}. "
                           f"{row['Example_Sentence_Translation']}", 1200),
             "tags": [f"pos:{row['Word_Type']}", f"card:{card_type.lower()}", f"level:topik{row['TOPIK_Level']}"],
             "honorific_level": rng.choice(["formal", "casual", "neutral", "none"])}
            for card_type in rng.sample(CARD_TYPES, rng.choice([2, 3, 3, 4]))]})
        out.append(analysis.model_dump_json().encode("utf-8"))
        out.append(cards.model_dump_json().encode("utf-8"))
    return out


def split_payloads(seed: int = 1) -> tuple[list[bytes], list[bytes]]:
    """(training, measured): text pools from disjoint halves of the list."""
    rows = load_rows()
    first, second = rows[:5000], rows[5000:]
    return stage_payloads(second[:3000], second, seed + 1), stage_payloads(first[:1000], first, seed)


if __name__ == "__main__":
    train, measured = split_payloads()
    print(json.dumps({"training": len(train), "measured": len(measured),
                      "measured_raw_bytes": sum(map(len, measured))}))
