"""The docs' commands as written: every ``mpo ...`` and ``python -m bench.X ...`` they show
parses with its CLI's own argparse, and every ``bench/results/`` file they cite exists.

Commands come from README.md and docs/*.md as tests/doc_extract.py finds them. Nothing is
run here: ``ArgumentParser.parse_args`` is stopped right after it parses
(tests/test_doc_commands.py runs them, at smoke size).
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import pytest

# --import-mode=importlib does not put test folders on sys.path; the doc-check shares this.
sys.path.insert(0, str(Path(__file__).parent))

from doc_extract import DOCS, RESULTS, ROOT, Command, doc_commands, parse  # noqa: E402

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
