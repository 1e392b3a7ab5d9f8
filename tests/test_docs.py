"""The docs' commands as written: every ``mpo ...`` and ``python -m bench.X ...`` they show
parses with its CLI's own argparse, and every ``bench/results/`` file they cite exists.

Commands come from README.md and docs/*.md: each line of a shell code block (continuations
joined, comments dropped, ``&&`` / ``;`` / ``|`` split, ``$(...)`` taken as a command of its
own) and each inline code span that starts with ``mpo`` or ``python -m bench.``. A code
block is something to paste, so it must parse in full; an inline span may leave out the
required arguments (``mpo eval``), but every flag it names must exist and take its values.
Nothing is run: ``ArgumentParser.parse_args`` is stopped right after it parses.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL = {"", "bash", "sh", "shell", "console"}
SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
INLINE = re.compile(r"`([^`]+)`")
PYTHON = re.compile(r"^(\S*/)?python3?$")
COMMAND_LINE = re.compile(r"^\s*([A-Z_][A-Z0-9_]*=\S*\s+)*(\S*/)?(mpo|python3?)(\s|$)")
RESULTS = re.compile(r"bench/results/[A-Za-z0-9_.\-{},*]+")


@dataclass(frozen=True)
class Command:
    doc: str  # file name, for the test id
    line: int
    argv: tuple[str, ...]  # after the program: ["serve", "--config", ...]
    program: str  # "mpo" or the bench module, "bench.run"
    strict: bool  # a code block's line (all required arguments given)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.program} {' '.join(self.argv)}"


def _words(line: str) -> list[list[str]]:
    """A shell line's simple commands, as word lists (``$(...)`` ones included)."""
    inner = SUBSTITUTION.findall(line)
    line = SUBSTITUTION.sub("SUBSTITUTED", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word and set(word) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(word)
    for text in inner:
        commands += _words(text)
    return [c for c in commands if c]


def _program(words: list[str]) -> tuple[str, list[str]] | None:
    """``("mpo", argv)`` or ``("bench.X", argv)``, or None for any other command."""
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value cmd ...
        words = words[1:]
    if not words:
        return None
    if words[0] == "mpo" or words[0].endswith("/mpo"):
        return ("mpo", words[1:]) if len(words) > 1 else None  # `mpo` alone names the CLI
    if PYTHON.match(words[0]) and words[1:2] == ["-m"] and words[2:3] != []:
        return (words[2], words[3:]) if words[2].startswith("bench.") else None
    return None


def _line_number(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def doc_commands() -> list[Command]:
    found: list[Command] = []
    for path in DOCS:
        text = path.read_text()
        for block in FENCE.finditer(text):
            if block[1] not in SHELL:
                continue
            start = _line_number(text, block.start(2))
            lines = block[2].split("\n")
            joined = ""
            for number, raw in enumerate(lines, start):
                # a block without a language may be a diagram: only its command lines count
                if block[1] == "" and not joined and not COMMAND_LINE.match(raw):
                    continue
                joined += raw
                if raw.endswith("\\"):
                    joined = joined[:-1] + " "
                    continue
                try:
                    commands = _words(joined)
                except ValueError:  # a quote opened on this line closes on a later one
                    joined += "\n"
                    continue
                for words in commands:
                    program = _program(words)
                    if program:
                        found.append(Command(path.name, number, tuple(program[1]),
                                             program[0], strict=True))  # fmt: skip
                joined = ""
            assert not joined.strip(), f"{path.name}:{start}: a quote never closes"
        prose = FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)
        for span in INLINE.finditer(prose):
            content = " ".join(span[1].split())
            # a span with a placeholder or a choice of values is a sketch, not a command
            if not re.match(r"(\S*/)?(mpo|python3?) ", content + " "):
                continue
            if any(mark in content for mark in ("...", "|", "<", "[")):
                continue
            for words in _words(content):
                program = _program(words)
                if program:
                    found.append(Command(path.name, _line_number(prose, span.start()),
                                         tuple(program[1]), program[0], strict=False))  # fmt: skip
    return found


class _Parsed(Exception):
    pass


_PARSE_ARGS = argparse.ArgumentParser.parse_args  # before any test patches it


def _relax(parser: argparse.ArgumentParser) -> None:
    """No argument or group is required, in the parser and its sub-commands."""
    for action in parser._actions:
        action.required = False
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _relax(sub)
    for group in parser._mutually_exclusive_groups:
        group.required = False


def parse(command: Command, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Run the command's ``main`` until its parser has parsed: None, or argparse's error."""
    original = _PARSE_ARGS

    def parse_only(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if not command.strict:
            _relax(self)
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    if command.program == "mpo":
        from server.cli import main
    else:
        main = importlib.import_module(command.program).main
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            main(list(command.argv))
    except _Parsed:
        return None
    except SystemExit:
        return errors.getvalue().strip().splitlines()[-1]
    raise AssertionError(f"{command}: main returned without parsing its arguments")


COMMANDS = doc_commands()


def test_the_docs_show_commands() -> None:
    """The extraction finds what the docs hold (a broken regex would pass every check)."""
    programs = {c.program for c in COMMANDS}
    assert {"mpo", "bench.run", "bench.fit_demo", "bench.personas"} <= programs
    # unlabelled blocks count too (docs/benchmarks.md's "How to run" block has no language)
    assert any(c.doc == "benchmarks.md" and c.strict and c.program == "bench.run" for c in COMMANDS)
    assert any(c.argv[:1] == ("fit",) and c.strict for c in COMMANDS)
    assert any(c.argv == ("demo", "build", "--real") for c in COMMANDS)  # from $(...)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_a_documented_command_parses(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    error = parse(command, monkeypatch)
    assert error is None, f"{command}\n  {error}"


def test_a_bad_flag_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check fails on what issue 38 found: a pasted ``[--fit-strength]``, a flag without
    its value, a flag that does not exist."""
    bad = [
        Command("x", 1, ("fit", "--config", "f.yaml", "--prompts", "p", "[--fit-strength]"),
                "mpo", True),
        Command("x", 1, ("--n",), "bench.demo_eval", False),
        Command("x", 1, ("--no-such-flag",), "bench.cpu_linear", False),
        Command("x", 1, ("fit", "--prompts", "p"), "mpo", True),  # --config is required
    ]  # fmt: skip
    for command in bad:
        assert parse(command, monkeypatch) is not None, command
    assert parse(Command("x", 1, ("fit", "--prompts", "p"), "mpo", False), monkeypatch) is None


def test_no_doc_runs_a_bench_file_as_a_script() -> None:
    """``python bench/X.py`` cannot import the ``bench`` package: ``python -m bench.X``."""
    for path in DOCS:
        for match in re.finditer(r"python3? bench/\w+\.py", path.read_text()):
            raise AssertionError(f"{path.name}: {match[0]}: write python -m bench.<name>")


def _expand(cited: str) -> list[str]:
    """``a.{json,md}`` -> ``a.json``, ``a.md``."""
    match = re.search(r"\{([^{}]*)\}", cited)
    if not match:
        return [cited]
    return list(
        itertools.chain.from_iterable(
            _expand(cited[: match.start()] + part + cited[match.end() :])
            for part in match[1].split(",")
        )
    )


def cited_results() -> list[tuple[str, str]]:
    cited = []
    for path in DOCS:
        for match in RESULTS.finditer(path.read_text()):
            name = match[0].rstrip(".,")
            if name.endswith("/"):
                continue
            cited += [(path.name, one) for one in _expand(name)]
    return sorted(set(cited))


def test_the_docs_cite_results_files() -> None:
    assert len(cited_results()) >= 10


@pytest.mark.parametrize(("doc", "cited"), cited_results())
def test_a_cited_results_file_exists(doc: str, cited: str) -> None:
    assert list(ROOT.glob(cited)), f"{doc} cites {cited}, which is not in the repository"


# -- tables rendered from their JSON (bench/render_tables.py) ----------------------------


def marked() -> list[tuple[str, str, str]]:
    from bench.render_tables import marked_tables

    return [(p.name, spec, body) for p in DOCS for spec, body in marked_tables(p.read_text())]


def test_the_docs_mark_their_result_tables() -> None:
    kinds = {spec.split()[-1] for _, spec, _ in marked()}
    assert {"demo_eval", "fit_report", "eval_rewards", "eval_wins", "eval_summary"} <= kinds
    assert {"bench_run", "adapters", "cpu_linear", "llama_cpp", "fit_speed"} <= kinds


@pytest.mark.parametrize(("doc", "spec", "body"), marked(), ids=lambda v: str(v)[:60])
def test_a_table_is_what_its_json_renders(doc: str, spec: str, body: str) -> None:
    from bench.render_tables import render

    assert body == render(spec), (
        f"{doc}: the table marked {spec!r} differs from its JSON: "
        "run `python -m bench.render_tables` (after a rerun with --out bench/results/...)"
    )


def test_a_changed_figure_is_caught(tmp_path: Path) -> None:
    from bench import render_tables

    doc, spec, body = marked()[0]
    changed = re.sub(r"\d(?=\.\d)", lambda m: str((int(m[0]) + 1) % 10), body, count=1)
    assert changed != body and changed != render_tables.render(spec)
    text = f"<!-- table: {spec} -->\n{changed}\n<!-- /table -->\n"
    assert render_tables.rewrite(text) == f"<!-- table: {spec} -->\n{body}\n<!-- /table -->\n"
