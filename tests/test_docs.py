"""The documentation tells the truth: every shell example in README.md and docs/ runs (offline, with the simulated
provider), the troubleshooting guide explains every error code there is, and the error format reference lists
exactly what `to_dict` writes."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import flashcard_pipeline.export.ankiconnect
import flashcard_pipeline.llm.client as client
import flashcard_pipeline.resilience.breaker  # registers CircuitWaitExceededError
from flashcard_pipeline.errors import ErrorCategory, StructuredError

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
#: `# needs: api-key` (a real provider), `anki` (a running Anki), `network` (the package index), `postgres` (a
#: PostgreSQL server and Redis), `minutes` (a benchmark or the test suite): such a line is not run; its program's
#: `--help` must list every option it uses.
NEEDS = re.compile(r"#\s*needs:\s*([\w-]+)")
KNOWN_NEEDS = {"api-key", "anki", "network", "minutes", "postgres"}


@dataclass(frozen=True)
class Block:
    document: Path
    language: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}: {self.text.strip().splitlines()[0][:60]}"


def blocks(document: Path) -> list[Block]:
    return [Block(document, m.group(1), m.group(2)) for m in FENCE.finditer(document.read_text(encoding="utf-8"))]


ALL_BLOCKS = [block for document in DOCUMENTS for block in blocks(document)]


def test_every_fenced_block_says_what_it_is() -> None:
    """A shell example that is not tagged `bash` would escape the test below."""
    untagged = [b.name for b in ALL_BLOCKS if b.language not in ("bash", "text", "python", "toml", "json")]
    assert not untagged, untagged
    assert sum(b.language == "bash" for b in ALL_BLOCKS) >= 10


def _program(tokens: list[str]) -> list[str]:
    """The words before the first option: `flashcard-pipeline cache clear`, `python benchmarks/x.py`."""
    head = tokens[:3] if tokens[:2] == ["python", "-m"] else tokens[:1]
    rest = tokens[len(head):]
    while rest and not rest[0].startswith("-"):
        head, rest = [*head, rest[0]], rest[1:]
    return head


def check_options(line: str, env: dict[str, str]) -> None:
    """A line that cannot run here: its program exists and its `--help` lists every option the line uses."""
    tokens = shlex.split(line, comments=True)
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # `PYTHONPATH=src python ...`
        tokens = tokens[1:]
    if not tokens or tokens[0] == "export":
        return
    program = _program(tokens)
    if tokens[0] == "python":
        program[0] = sys.executable
    elif shutil.which(tokens[0], path=env["PATH"]) is None:
        return  # pipx and friends: nothing of ours to check
    result = subprocess.run([*program, "--help"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, f"{line}: {result.stderr}"
    for option in (t.split("=", 1)[0] for t in tokens[len(program):] if t.startswith("-")):
        assert re.search(rf"(^|[\s,/\[]){re.escape(option)}\b", result.stdout, re.MULTILINE), \
            f"{line}: {option} is not in `{' '.join(program)} --help`"


@pytest.fixture
def shell_env(tmp_path: Path) -> dict[str, str]:
    """A user's shell: `flashcard-pipeline` on PATH (this checkout's), an empty home, no keys."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "flashcard-pipeline"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flashcard_pipeline "$@"\n')
    shim.chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FLASHCARD_", "OPENROUTER", "OPENAI", "CB_", "RL_", "RETRY_", "CACHE_", "DB_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HOME=str(tmp_path / "home"),
               XDG_DATA_HOME=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path / "config"), COLUMNS="100",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("document", [d for d in DOCUMENTS if any(b.language == "bash" for b in blocks(d))],
                         ids=lambda d: d.name)
def test_every_shell_example_runs(document: Path, tmp_path: Path, shell_env: dict[str, str]) -> None:
    """Each document's bash blocks run in order in one fresh folder (a later block may use an earlier one's
    files), under `bash -e`; a line marked `# needs: ...` is checked instead of run."""
    work = tmp_path / "work"
    work.mkdir()
    for block in (b for b in blocks(document) if b.language == "bash"):
        script = []
        for line in block.text.splitlines():
            if need := NEEDS.search(line):
                assert need.group(1) in KNOWN_NEEDS, f"{block.name}: unknown marker {need.group(0)!r}"
                check_options(line, shell_env)
                continue
            script.append(line)
        result = subprocess.run(["bash", "-e", "-c", "\n".join(script)], cwd=work, env=shell_env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{block.name}\n{result.stdout}\n{result.stderr}"


def _all_codes() -> set[str]:
    """Every code the pipeline itself gives an error: class defaults, literals in the source, the client's
    tables for HTTP statuses, timeouts and connection failures."""
    classes, queue = [], [StructuredError]
    while queue:
        cls = queue.pop()
        classes.append(cls)
        queue.extend(cls.__subclasses__())
    codes = {cls.default_code for cls in classes}
    for path in (ROOT / "src" / "flashcard_pipeline").rglob("*.py"):
        codes |= set(re.findall(r'\bcode="([a-z_]+)"', path.read_text(encoding="utf-8")))
    codes |= {code for _, code in (*client._TIMEOUT_CODES, *client._NETWORK_CODES)}
    codes |= {code for status in range(400, 600) if (code := client._status_class(status, None)[1])}
    codes |= {"content_filter", "moderation_flagged"}  # chosen at run time from the answer
    assert flashcard_pipeline.export.ankiconnect.AnkiNotRunningError.default_code in codes
    return codes


def test_the_troubleshooting_guide_explains_every_category_and_code() -> None:
    guide = (ROOT / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    for category in ErrorCategory:
        assert f"\n## {category.value}\n" in guide, category
    documented = set(re.findall(r"^\| `([a-z_]+)`(?: / `([a-z_]+)`)? \|", guide, re.MULTILINE))
    names = {name for pair in documented for name in pair if name}
    missing = _all_codes() - names
    assert not missing, f"codes without an entry in docs/troubleshooting.md: {sorted(missing)}"


def test_the_error_format_reference_lists_exactly_what_to_dict_writes() -> None:
    reference = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", reference, re.MULTILINE))
    written: set[str] = set()
    queue = [StructuredError]
    while queue:
        cls = queue.pop()
        queue.extend(cls.__subclasses__())
        written |= {"type", "category", "code", "message", "details", "retry_after", "retryable", "aborts_run",
                    "timestamp", "cause", *cls.extra_fields}
    assert documented == written
    assert set(StructuredError("x").to_dict()) <= documented
    example = next(b.text for b in blocks(ROOT / "docs" / "errors.md") if b.language == "python")
    exec(compile(example, "docs/errors.md", "exec"), {})
