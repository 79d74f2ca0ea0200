"""Shared fixtures: the real vocabulary data, a fresh database per test, and service checks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UNDER_CI = os.environ.get("CI", "").lower() == "true"


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or a skip (with the reason) when the checkout has none beside it."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not found: the shared test data sits beside the checkout")
    return path


def require_service(host: str, port: int, name: str) -> None:
    """Skip when a server is unreachable, except under CI, where its absence is a failure."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        message = f"{name} not reachable on {host}:{port} ({exc})"
        if UNDER_CI:
            pytest.fail(message + "; CI must run this test")
        pytest.skip(message)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a test runs may touch the developer's real database or keys."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    for variable in ("FLASHCARD_DATABASE_URL", "OPENROUTER_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
