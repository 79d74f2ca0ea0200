"""Shared fixtures: the real vocabulary data, a fresh database per test, and service checks."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from sqlalchemy.pool import NullPool

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UNDER_CI = os.environ.get("CI", "").lower() == "true"

# CI replays the same examples every run (a red build is then reproducible, not a lucky draw); local runs keep
# exploring new ones and print the blob to replay any failure they find.
settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if UNDER_CI else "dev")


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or a skip (with the reason) when the checkout has none beside it; under CI,
    where ../shared always sits beside the clone, its absence is a failure."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"{path} not found: the shared test data sits beside the checkout"
        if UNDER_CI:
            pytest.fail(message + "; CI must run this test")
        pytest.skip(message)
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


@contextlib.contextmanager
def json_server(answer: Callable[[Any], tuple[int, Any]]) -> Iterator[str]:
    """A local HTTP server whose every POST gets ``answer(request JSON)`` as (status, JSON body); yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            status, reply = answer(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or "null"))
            body = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


POSTGRES_URL = os.environ.get("FLASHCARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FLASHCARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the test PostgreSQL database, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL)
    require_service(url.host or "127.0.0.1", url.port or 5432, "PostgreSQL")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = create_engine(url, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same tests against the embedded default and against the real PostgreSQL server."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing a test runs may touch the developer's real database, keys or working tree."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.chdir(home)
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))  # the developer's config file stays out
    for variable in ("FLASHCARD_DATABASE_URL", "FLASHCARD_CONFIG", "FLASHCARD_MODEL_KIND", "OPENROUTER_API_KEY",
                     "OPENAI_API_KEY"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def col(tmp_path: Path) -> Iterator[Any]:
    """A fresh Anki collection (the official ``anki`` package), closed after the test."""
    from anki.collection import Collection

    folder = tmp_path / "anki"
    folder.mkdir()
    collection = Collection(str(folder / "collection.anki2"))
    yield collection
    collection.close()
