"""Render the docs' result tables from the committed JSON they cite, or check them.

    python -m bench.render_tables           # rewrite every marked table in README.md, docs/
    python -m bench.render_tables --check   # list the tables that differ from their JSON; exit 1

A table in a doc is marked with the file it comes from and how it is drawn:

    <!-- table: bench/results/demo_eval.json demo_eval -->
    | row | polite | ... |
    <!-- /table -->

``file.json#key`` takes one key of the file (``fit_demo.json#evaluation``); a second file
after the first is the comparison some kinds show in brackets. Everything between the two
comments is the rendering, so a table cannot drift from its file: change the JSON (rerun
the benchmark with ``--out bench/results/...``), then rerun this script.
Standard library only, so the docs test (tests/test_docs.py) runs it in no time.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import render_bench

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKED = re.compile(
    r"(?P<open><!-- table: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(?P<close><!-- /table -->)", re.S
)
SCORERS = ["polite", "concise", "upbeat"]  # the demo's, in mpo_core.demo.SCORERS order


def demo_eval(data: dict[str, Any], other: dict[str, Any] | None = None) -> str:
    """``bench.demo_eval``'s table: each row's scorer means and words (``other``'s in
    brackets, row by row, when given)."""
    lines = ["| row | " + " | ".join(SCORERS) + " | words |", "|---|" + "---:|" * 4]
    others = other["rows"] if other else [None] * len(data["rows"])
    for row, twin in zip(data["rows"], others, strict=True):
        cells = []
        for name, spec in [*((n, "+.3f") for n in SCORERS), ("words", ".1f")]:
            cell = format(row["scores"][name], spec)
            if twin is not None:
                cell += f" ({format(twin['scores'][name], spec)})"
            cells.append(cell)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_report(report: dict[str, Any]) -> str:
    """``bench.fit_demo``'s fit report (``FitReport.to_dict()``): rows and the fit's line."""
    names = report["policy_names"]
    lines = [
        "| weights | " + " | ".join(f"E[R_{n}]" for n in names) + " | min | KL | MaxMin | ESS |",
        "|---|" + "---:|" * (len(names) + 4),
    ]
    for label, row in report["rows"].items():
        rewards = " | ".join(f"{row['rewards'][n]:+.3f}" for n in names)
        lines.append(
            f"| {label} | {rewards} | {row['min']:+.3f} | {row['kl']:.3f} "
            f"| **{row['maxmin']:+.3f}** | {row['ess']:.2f} |"
        )
    fitted = ", ".join(f"{n} {w:.3f}" for n, w in report["weights"].items())
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items())
    lines += [
        "",
        f"Fitted weights: {fitted}. F = {report['objective']:.4f} on {report['num_prompts']} "
        f"prompts x {report['samples_per_prompt']} replies ({report['mean_reply_tokens']:.1f} "
        f"tokens on average), {report['iterations']} steps of size {report['step_size']:.4g}; "
        f"wall time {seconds}.",
    ]
    lines += [f"Warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _interval(estimate: dict[str, float], percent: bool = False) -> str:
    mean, low, high = estimate["mean"], estimate["low"], estimate["high"]
    if percent:
        return f"{100 * mean:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def _weights(row: dict[str, Any]) -> str:
    if row["kind"] == "mixture" and row["strength"] == 0:
        return "reference alone (strength 0)"
    weights = ", ".join(f"{n} {w:.2f}" for n, w in row["weights"].items() if w)
    if row["kind"] == "soup":
        return "soup of " + weights
    strength = row["strength"]
    return weights + (f"; strength {strength:g}" if strength not in (None, 1) else "")


def eval_rewards(report: dict[str, Any]) -> str:
    """``mpo eval``'s first table (``EvalReport.to_dict()``): mean rewards with intervals."""
    names = list(report["objectives"])
    lines = [
        "| row | weights | " + " | ".join(names) + " | worst (mean) |",
        "|---|---|" + "---:|" * (len(names) + 1),
    ]
    for row in report["rows"]:
        cells = " | ".join(_interval(row["rewards"][n]) for n in names)
        worst = row["worst_reward"]
        lines.append(
            f"| `{row['label']}` | {_weights(row)} | {cells} "
            f"| {worst['objective']} {worst['mean']:+.3f} |"
        )
    return "\n".join(lines)


def eval_wins(report: dict[str, Any]) -> str:
    """``mpo eval``'s second table: win rates against the baseline, length and KL."""
    names = list(report["objectives"])
    baseline = report["baseline"]
    has_kl = any(row["kl"] is not None for row in report["rows"])
    header = ["row"]
    if baseline is not None:
        header += [f"win vs `{baseline}`: {n}" for n in names] + ["worst win rate"]
    header += ["tokens", "words"] + (["KL(row ‖ ref)"] if has_kl else [])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in report["rows"]:
        cells = [f"`{row['label']}`"]
        if baseline is not None:
            cells += [_interval(row["win_rates"][n], percent=True) for n in names]
            worst = row["worst_win_rate"]
            cells.append(f"**{100 * worst['mean']:.0f}%** ({worst['objective']})")
        cells += [f"{row['reply_tokens']:.1f}", f"{row['reply_words']:.1f}"]
        if has_kl:
            cells.append(_interval(row["kl"]) if row["kl"] is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_run(*results: dict[str, Any]) -> str:
    """``bench.report``'s Markdown of ``bench.run`` results: each run's command, date and
    time, the table and the target ratios (several files: one table over all)."""
    from bench import report  # standard library only, like this module

    return report.markdown(*report.rows_of(results))


KINDS: dict[str, Callable[..., str]] = {
    **render_bench.KINDS,
    "bench_run": bench_run,
    "demo_eval": demo_eval,
    "fit_report": fit_report,
    "eval_rewards": eval_rewards,
    "eval_wins": eval_wins,
}


def load(reference: str) -> dict[str, Any]:
    """``bench/results/x.json`` or ``bench/results/x.json#key``, from the repository root."""
    path, _, key = reference.partition("#")
    data: dict[str, Any] = json.loads((ROOT / path).read_text())
    return data[key] if key else data


def render(spec: str) -> str:
    """The table a marker's ``spec`` (``file [file] kind``) stands for."""
    *files, kind = spec.split()
    if kind not in KINDS or not files:
        raise ValueError(f"table marker {spec!r}: give file(s) and one of {sorted(KINDS)}")
    return KINDS[kind](*(load(f) for f in files))


def marked_tables(text: str) -> list[tuple[str, str]]:
    """Each marked table of a doc: (its spec, the text the doc holds)."""
    return [(m["spec"], m["body"].rstrip("\n")) for m in MARKED.finditer(text)]


def rewrite(text: str) -> str:
    return MARKED.sub(lambda m: f"{m['open']}{render(m['spec'])}\n{m['close']}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on drift")
    args = parser.parse_args(argv)
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        for spec, body in marked_tables(text):
            if render(spec) != body:
                stale.append(f"{doc.relative_to(ROOT)}: {spec}")
        if not args.check and rewrite(text) != text:
            doc.write_text(rewrite(text))
    for line in stale:
        print(("differs from its JSON: " if args.check else "rewritten: ") + line)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
