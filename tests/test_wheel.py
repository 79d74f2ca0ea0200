"""The package as users get it: build the sdist and the wheel from a copy of the checkout (the wheel from the
sdist, as ``python -m build`` does), check that both hold every file of the package, install the wheel into a
fresh virtual environment outside the checkout and run the tool from there, with a clean environment.

A runtime file missing from the package data (the cache's compression dictionary, Alembic's script template, a
prompt) fails ``test_wheel_and_sdist_hold_every_package_file`` by name, and most of them the smoke test too.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "flashcard_pipeline"
PACKAGE_PREFIX = f"src/{PACKAGE}/"
ZDICT = f"{PACKAGE}/cache/dictionaries/stage-v1.zdict"

#: Never part of a source tree; what the walk skips when there is no git to ask.
NOT_SOURCE_DIRS = {".git", "__pycache__", "build", "dist", ".venv", "venv", ".tox", ".nox", ".hypothesis",
                   ".pytest_cache", ".ruff_cache", ".mypy_cache", "htmlcov"}
NOT_SOURCE_SUFFIXES = (".pyc", ".pyo")

WORDS = "position,term,type\n1,학교,noun\n2,먹다,verb\n3,빨리,adverb\n4,사과,noun\n"
TERMS = ("학교", "먹다", "빨리", "사과")

def source_files(root: Path = ROOT, *, use_git: bool = True) -> list[str]:
    """The checkout's files as a commit would hold them (POSIX paths relative to ``root``): what git tracks plus
    untracked files it does not ignore, those that exist; without git, every file outside caches and build
    output."""
    names: Iterable[str] | None = None
    git = shutil.which("git") if use_git else None
    if git and (root / ".git").exists():
        listed = subprocess.run([git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=root, capture_output=True, check=False)
        if listed.returncode == 0:
            names = listed.stdout.decode("utf-8").split("\0")
    if names is None:
        names = (path.relative_to(root).as_posix() for path in root.rglob("*") if not _not_source(path, root))
    return sorted({name for name in names if name and (root / name).is_file()})


def _not_source(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return (any(part in NOT_SOURCE_DIRS or part.endswith(".egg-info") for part in parts[:-1])
            or path.name.endswith(NOT_SOURCE_SUFFIXES) or path.name.startswith(".coverage"))


def package_files(files: Iterable[str]) -> list[str]:
    """The files under ``src/flashcard_pipeline``, as paths inside a wheel (``flashcard_pipeline/...``)."""
    return sorted(name.removeprefix("src/") for name in files if name.startswith(PACKAGE_PREFIX))


def missing_from(required: Iterable[str], names: Iterable[str]) -> list[str]:
    """The required paths that an archive listing lacks."""
    return sorted(set(required) - set(names))


# ---------------------------------------------------------------------------------------------- the check itself


def test_the_file_check_names_a_runtime_file_missing_from_a_build() -> None:
    required = package_files(source_files())
    for runtime in (ZDICT, f"{PACKAGE}/storage/migrations/script.py.mako", f"{PACKAGE}/prompts/cards.v1.toml",
                    f"{PACKAGE}/prompts/nuance.v1.toml", f"{PACKAGE}/py.typed",
                    f"{PACKAGE}/storage/migrations/versions/0001_ledger_and_cache.py", f"{PACKAGE}/cli/app.py"):
        assert runtime in required
    without_zdict = [name for name in required if name != ZDICT] + [f"{PACKAGE}-0.1.0.dist-info/RECORD"]
    assert missing_from(required, without_zdict) == [ZDICT]
    assert missing_from(required, [*required, "extra"]) == []


def test_without_git_the_walk_finds_the_package_files_git_lists() -> None:
    walked = package_files(source_files(use_git=False))
    assert set(package_files(source_files())) <= set(walked)
    assert not [name for name in walked if "__pycache__" in name or name.endswith(".pyc")]


# ------------------------------------------------------------------------------------------ build and install


@dataclass(frozen=True)
class Dists:
    files: list[str]
    sdist: Path
    wheel: Path


@dataclass(frozen=True)
class Venv:
    root: Path
    bin: Path

    @property
    def python(self) -> Path:
        return self.bin / ("python.exe" if os.name == "nt" else "python")

    @property
    def tool(self) -> Path:
        return self.bin / ("flashcard-pipeline.exe" if os.name == "nt" else "flashcard-pipeline")


def run(args: Sequence[object], *, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    """Run a command; a non-zero exit fails the test with the command and the tail of its output."""
    command = [str(arg) for arg in args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=timeout, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}\n--- stdout\n{done.stdout[-6000:]}\n"
                    f"--- stderr\n{done.stderr[-6000:]}", pytrace=False)
    return done.stdout


def build_env() -> dict[str, str]:
    """The environment for building and pip: this one (pip's index settings), without anything that would put
    the checkout, this virtual environment or coverage into the child processes."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTHON", "COV_CORE_", "FLASHCARD_", "VIRTUAL_ENV", "PIP_USER", "PIP_TARGET",
                                   "PIP_PREFIX", "PIP_REQUIRE_VIRTUALENV"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def tool_env(venv: Venv, home: Path) -> dict[str, str]:
    """A clean environment for the installed tool: the venv first on PATH, HOME and the XDG folders in ``home``,
    no PYTHONPATH, no FLASHCARD_* / DB_* / CACHE_* / provider settings."""
    env = {"PATH": os.pathsep.join([str(venv.bin), os.defpath]), "HOME": str(home), "USERPROFILE": str(home),
           "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
           "XDG_CACHE_HOME": str(home / "cache"), "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
           "NO_COLOR": "1", "TERM": "dumb"}
    env.update({name: os.environ[name] for name in ("SYSTEMROOT", "TMPDIR", "TEMP", "TMP") if name in os.environ})
    return env


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    """sdist and wheel built once from a copy of the checkout (nothing is written into the checkout, and stale
    build state in it, such as an old egg-info's SOURCES.txt, cannot add files the configuration would miss)."""
    base = tmp_path_factory.mktemp("dists")
    tree = base / "checkout"
    files = source_files()
    for name in files:
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    out = base / "dist"
    # No --sdist/--wheel: build makes the sdist, then the wheel from the unpacked sdist, so a file missing from
    # either shows.
    run([sys.executable, "-m", "build", "--outdir", out, tree], cwd=base, env=build_env())
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dists(files=files, sdist=sdist, wheel=wheel)


@pytest.fixture(scope="module")
def venv(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh virtual environment outside the checkout with the wheel installed (dependencies from the index)."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    env = build_env()
    run([sys.executable, "-m", "venv", root], cwd=root.parent, env=env)
    made = Venv(root=root, bin=root / ("Scripts" if os.name == "nt" else "bin"))
    run([made.python, "-m", "pip", "install", "--quiet", dists.wheel], cwd=root.parent, env=env)
    return made


# ------------------------------------------------------------------------------------------------- the tests


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_and_sdist_hold_every_package_file(dists: Dists) -> None:
    required = package_files(dists.files)
    with zipfile.ZipFile(dists.wheel) as wheel:
        wheel_names = wheel.namelist()
    missing = missing_from(required, wheel_names)
    assert not missing, f"missing from {dists.wheel.name} (see [tool.setuptools.package-data]): {missing}"
    assert len(wheel_names) == len(set(wheel_names)), "the wheel holds a file twice"
    dist_info = f"{dists.wheel.name.split('-')[0]}-{dists.wheel.name.split('-')[1]}.dist-info/"
    stray = [name for name in wheel_names
             if not name.startswith((f"{PACKAGE}/", dist_info)) or "__pycache__" in name or name.endswith(".pyc")]
    assert not stray, f"the wheel holds files outside the package: {stray}"

    with tarfile.open(dists.sdist) as sdist:
        inside = [str(PurePosixPath(*PurePosixPath(name).parts[1:])) for name in sdist.getnames()]
    missing = missing_from(["pyproject.toml", "README.md", *(f"src/{name}" for name in required)], inside)
    assert not missing, f"missing from {dists.sdist.name}: {missing}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_installed_package_is_imported_not_the_checkout(venv: Venv, tmp_path: Path) -> None:
    where = "import flashcard_pipeline, pathlib; print(pathlib.Path(flashcard_pipeline.__file__))"
    out = run([venv.python, "-c", where], cwd=tmp_path, env=tool_env(venv, tmp_path / "home"))
    location = Path(out.strip()).resolve()
    assert location.is_relative_to(venv.root.resolve()), location
    assert not location.is_relative_to(ROOT), location


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_installed_tool_processes_exports_and_reports(venv: Venv, tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    (work / "words.csv").write_text(WORDS, encoding="utf-8")
    env = tool_env(venv, home)

    def tool(*args: str) -> str:
        return run([venv.tool, *args], cwd=work, env=env, timeout=300)

    tool("process", "words.csv", "--provider", "simulated", "-o", "deck.apkg")
    tool("export", "-o", "again.apkg")
    for deck in ("deck.apkg", "again.apkg"):
        notes = apkg_notes(work / deck, tmp_path / deck)
        assert len(notes) >= len(TERMS), (deck, notes)
        assert {term for term in TERMS if any(term in fields for fields in notes)} == set(TERMS), deck

    database = home / "data" / "flashcard-pipeline" / "flashcards.db"
    cache = json.loads(tool("cache", "stats", "--json"))
    filled = [row for row in cache["types"] if row["entries"]]
    assert {row["cache_type"] for row in filled} == {"nuance", "cards"}, cache
    # Short JSON answers shrink only with the shipped preset dictionary: it was found and used.
    assert all(row["stored_bytes"] < row["raw_bytes"] for row in filled), cache
    with closing(sqlite3.connect(database)) as db:
        codecs = {codec for (codec,) in db.execute("SELECT DISTINCT codec FROM cache_entries")}
    assert codecs == {"zlib+stage-v1"}

    stats = json.loads(tool("db", "stats", "--json"))
    assert stats["dialect"] == "sqlite"
    assert stats["database"] == f"sqlite:///{database}", stats["database"]
    assert stats["run"] == 1


def apkg_notes(apkg: Path, scratch: Path) -> list[str]:
    """The fields of every note in an .apkg (a zip around an Anki SQLite collection)."""
    with zipfile.ZipFile(apkg) as package:
        assert "collection.anki2" in package.namelist(), package.namelist()
        package.extract("collection.anki2", scratch)
    with closing(sqlite3.connect(scratch / "collection.anki2")) as collection:
        notes = [fields for (fields,) in collection.execute("SELECT flds FROM notes")]
        cards = collection.execute("SELECT count(*) FROM cards").fetchone()[0]
    assert cards >= len(notes)
    return notes
