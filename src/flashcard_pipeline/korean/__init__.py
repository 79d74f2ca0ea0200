"""Korean language tools computed offline from the text: morphology (kiwipiepy), pronunciation (ko-pron) and
Hanja readings (the ``hanja`` dictionary). Content checks and exports use them instead of trusting the model."""

from __future__ import annotations

from flashcard_pipeline.korean.analyzer import Span, head_candidates, is_hangul, locate, morphemes, pos_classes
from flashcard_pipeline.korean.hanja_readings import check_hanja, reading_of
from flashcard_pipeline.korean.pronunciation import Pronunciation, pronounce

__all__ = ["Pronunciation", "Span", "check_hanja", "head_candidates", "is_hangul", "locate", "morphemes",
           "pos_classes", "pronounce", "reading_of"]
