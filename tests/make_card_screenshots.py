"""Screenshots of every card template for docs/cards.md: ``python -m tests.make_card_screenshots docs/cards``.

The same cards the rendering tests check (tests/test_card_rendering.py): imported from an .apkg with the official
anki package, rendered by it, photographed by headless Chromium at 360 px.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from anki.collection import Collection

from flashcard_pipeline.export import write_export
from tests.card_pages import Side, screenshot
from tests.test_card_rendering import TEMPLATES, rich_results
from tests.test_export_anki import T0, import_apkg

#: Which word shows each template (학교 has every optional type; 먹다 shows a verb's conjugations).
SHOWN_BY = {"Grammar": "먹다"}


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        col = Collection(str(Path(tmp) / "collection.anki2"))
        try:
            write_export("apkg", rich_results(), Path(tmp) / "deck.apkg", timestamp=T0)
            import_apkg(col, Path(tmp) / "deck.apkg")
            for template in TEMPLATES:
                term = SHOWN_BY.get(template, "학교")
                card = next(c for c in (col.get_card(cid) for cid in col.find_cards(f"Term:{term}"))
                            if c.template()["name"] == template)
                slug = template.lower()
                screenshot(Side(template, card.question()), folder / f"{slug}-front.png", night=False, height=520)
                screenshot(Side(template, card.answer()), folder / f"{slug}-back.png", night=False, height=900)
                screenshot(Side(template, card.answer()), folder / f"{slug}-back-night.png", night=True,
                           height=900, unfold=True)
                print(template, term)
        finally:
            col.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/cards").resolve())
