"""The schema revision this package's migrations lead to, read without Alembic (or SQLAlchemy): opening a current
database, and the status commands' quick reader, only compare it with the database's ``alembic_version``."""

from __future__ import annotations

import re
from pathlib import Path

_MIGRATIONS = Path(__file__).parent / "migrations" / "versions"
_REVISION = re.compile(r"""^(down_revision|revision)\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def head_revision() -> str | None:
    """The newest migration's id, read from the revision files without loading Alembic (None: not one head)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in _MIGRATIONS.glob("*.py"):
        for kind, value in _REVISION.findall(path.read_text(encoding="utf-8")):
            (revisions if kind == "revision" else parents).add(value)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None
