"""flashcard-pipeline: vocabulary lists in, rich AI-generated flashcards out, on a resilient LLM engine."""

__version__ = "0.1.0"
