"""Start-up time of the command line: how long `--help`, `--version` and the status commands take from the
shell's point of view (a fresh interpreter each time, as a user or a script runs them).

Each command runs N times in a subprocess (hyperfine-style: one warm-up, then N timed runs); the table gives the
minimum and the median wall time, and the median as a multiple of two baselines measured in the same run:
`python -c pass` (the interpreter alone) and `python -c "import sqlalchemy, pydantic_settings, typer"` (what a
command that reads the database and its settings the full way loads). A third baseline, `import typer,
rich.console, rich.table`, is what every command loads, the floor of the status commands' quick path. The status
commands read a database that a simulated `process` run fills first (not timed). `--compare SRC` also times the
commands that exist there with another source tree on PYTHONPATH (the main branch's `src`, say), in the same run,
so that a busy machine slows both alike and the ratio still holds.

    PYTHONPATH=src python benchmarks/bench_startup.py [--runs 15] [--compare ../main/src]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable
CLI = [PYTHON, "-m", "flashcard_pipeline"]


def timed(command: list[str], env: dict[str, str], cwd: Path, runs: int) -> list[float]:
    subprocess.run(command, env=env, cwd=cwd, capture_output=True, check=True)  # warm-up: page cache, .pyc
    found = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, env=env, cwd=cwd, capture_output=True, check=True)
        found.append(time.perf_counter() - start)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--compare", type=Path, help="another source tree to time the same commands with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        env = {**os.environ, "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
               "HOME": str(home), "PYTHONPATH": absolute_path(os.environ.get("PYTHONPATH", ""))}
        for variable in ("FLASHCARD_DATABASE_URL", "FLASHCARD_CONFIG", "PYTHONDONTWRITEBYTECODE"):
            env.pop(variable, None)
        # The warm-up writes the .pyc files an installed package has (here, not beside either source tree), or
        # every run would compile the package's modules from source again.
        env["PYTHONPYCACHEPREFIX"] = str(home / "pycache")
        words = home / "words.csv"
        words.write_text("position,term,type\n1,학교,noun\n2,먹다,verb\n3,빨리,adverb\n", encoding="utf-8")
        subprocess.run([*CLI, "process", str(words), "--provider", "simulated", "-o", str(home / "deck.jsonl")],
                       env=env, cwd=home, capture_output=True, check=True)
        cases: list[tuple[str, list[str]]] = [
            ("python -c pass", [PYTHON, "-c", "pass"]),
            ("import sqlalchemy, pydantic_settings, typer", [PYTHON, "-c",
                                                              "import sqlalchemy, pydantic_settings, typer"]),
            ("import typer, rich.console, rich.table", [PYTHON, "-c", "import typer, rich.console, rich.table"]),
            ("flashcard-pipeline --help", [*CLI, "--help"]),
            ("flashcard-pipeline --version", [*CLI, "--version"]),
            ("flashcard-pipeline process --help", [*CLI, "process", "--help"]),
            ("flashcard-pipeline config show", [*CLI, "config", "show"]),
        ]
        for status in (["runs", "list"], ["runs", "show", "1"], ["breaker", "status"], ["ratelimit", "status"],
                       ["monitor", "--once"]):
            for as_json in ([], ["--json"]):
                command = [*status, *as_json]
                cases.append((" ".join(["flashcard-pipeline", *command]), [*CLI, *command]))
        results: dict[str, list[float]] = {}
        before: dict[str, list[float]] = {}
        other = {**env, "PYTHONPATH": str(args.compare.resolve())} if args.compare else None
        for name, command in cases:  # interleaved, so both trees see the same load
            results[name] = timed(command, env, home, args.runs)
            if other is not None and command[:3] == CLI and _exists(command, other, home):
                before[name] = timed(command, other, home, args.runs)
    bare = statistics.median(results["python -c pass"])
    floor = statistics.median(results["import sqlalchemy, pydantic_settings, typer"])
    print(f"{args.runs} runs each, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    compare = f" {'compared s':>10} {'speed-up':>9}" if before else ""
    print(f"{'command':<44} {'min s':>7} {'median s':>9} {'x python':>9} {'x imports':>10}{compare}")
    for name, times in results.items():
        median = statistics.median(times)
        row = f"{name:<44} {min(times):>7.3f} {median:>9.3f} {median / bare:>9.1f} {median / floor:>10.2f}"
        if name in before:
            then = statistics.median(before[name])
            row += f" {then:>10.3f} {then / median:>8.1f}x"
        print(row)


def absolute_path(value: str) -> str:
    """PYTHONPATH with its entries made absolute: the commands run in a temporary folder, where a relative
    ``src`` names nothing and the installed package would be timed instead."""
    return os.pathsep.join(str(Path(entry).resolve()) for entry in value.split(os.pathsep) if entry)


def _exists(command: list[str], env: dict[str, str], cwd: Path) -> bool:
    """Whether the other tree has this command (an older one may lack `runs` or `--version`)."""
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True).returncode == 0


if __name__ == "__main__":
    main()
