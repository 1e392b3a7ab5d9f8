"""The docs' commands, as tests/test_docs.py (parsed) and tests/test_doc_commands.py (run)
read them.

Commands come from README.md and docs/*.md: each line of a shell code block (continuations
joined, comments dropped, ``&&`` / ``;`` / ``|`` split, ``$(...)`` taken as a command of its
own) and each inline code span that starts with ``mpo`` or ``python -m bench.``. A code
block is something to paste, so it must parse in full; an inline span may leave out the
required arguments (``mpo eval``), but every flag it names must exist and take its values.
``parse`` runs a command's ``main`` only until its parser has parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
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
    source: str = ""  # the shell line it is on (a block's logical line, or the span)
    block: str = ""  # "doc:line" of its code block; "" for an inline span

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
                                             program[0], strict=True, source=joined,
                                             block=f"{path.name}:{start}"))  # fmt: skip
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
                                         tuple(program[1]), program[0], strict=False,
                                         source=content))  # fmt: skip
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
