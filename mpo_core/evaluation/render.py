"""The report as files: JSON, a Markdown table, per-objective bars and the Pareto fronts.

The PNGs need matplotlib (in the ``dev`` extra); it is imported only here, lazily, with
the Agg backend, so evaluation runs on a machine without a display or without it (the
PNGs are then skipped with a warning).
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

from .run import EvalReport, RowResult
from .stats import Estimate

logger = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """Versions of what produced a report (for its JSON)."""
    from importlib import metadata

    found = {"python": platform.python_version()}
    for package in ("mpo-server", "torch", "transformers", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _cell(estimate: Estimate, percent: bool = False) -> str:
    if percent:
        return f"{100 * estimate.mean:.0f}% [{100 * estimate.low:.0f}, {100 * estimate.high:.0f}]"
    return f"{estimate.mean:+.3f} [{estimate.low:+.3f}, {estimate.high:+.3f}]"


def _weights_cell(result: RowResult) -> str:
    row = result.row
    if row.kind == "mixture" and row.strength == 0:
        return "reference alone (strength 0)"
    weights = ", ".join(f"{n} {w:.2f}" for n, w in row.weights_dict().items() if w)
    if row.kind == "soup":
        return "soup of " + weights
    return weights + (f"; strength {row.strength:g}" if row.strength != 1 else "")


def _label(result: RowResult) -> str:
    return f"`{result.row.label}`"


def markdown(report: EvalReport) -> str:
    """Two tables (mean rewards; win rates, worst objective, length, KL) and examples."""
    names = list(report.objectives)
    opts = report.options
    lines = [
        f"{len(report.prompts)} prompts x {opts.samples} replies per row, at most "
        f"{opts.max_new_tokens} new tokens, temperature {opts.temperature:g}, seed {opts.seed}; "
        f"95% bootstrap intervals over prompts ({opts.bootstrap} resamples).",
        "",
        "Mean reward per objective [95% interval]:",
        "",
        "| row | weights | " + " | ".join(names) + " | worst (mean) |",
        "|---|---|" + "---:|" * (len(names) + 1),
    ]
    for r in report.rows:
        weights = _weights_cell(r)
        cells = " | ".join(_cell(r.rewards[n]) for n in names)
        lines.append(
            f"| {_label(r)} | {weights} | {cells} | {r.worst_reward[0]} {r.worst_reward[1]:+.3f} |"
        )
    lines += ["", _second_table(report, names), ""]
    for other in report.options.compare:
        lines += [_paired_table(report, names, other), ""]
    if opts.examples:
        lines += ["Example replies (first sample of the first prompts):", ""]
        for r in report.rows:
            for prompt, reply in r.examples:
                lines.append(f"- {_label(r)} *{prompt}* → {reply or '(empty)'}")
        lines.append("")
    return "\n".join(lines)


def _second_table(report: EvalReport, names: list[str]) -> str:
    has_kl = any(r.kl is not None for r in report.rows)
    header = ["row"]
    if report.baseline is not None:
        header += [f"win vs `{report.baseline}`: {n}" for n in names] + ["worst win rate"]
    header += ["tokens", "words"] + (["KL(row ‖ ref)"] if has_kl else [])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in report.rows:
        cells = [_label(r)]
        if report.baseline is not None:
            cells += [_cell(r.win_rates[n], percent=True) for n in names]
            assert r.worst_win is not None
            cells.append(f"**{100 * r.worst_win[1]:.0f}%** ({r.worst_win[0]})")
        cells += [f"{r.reply_tokens:.1f}", f"{r.reply_words:.1f}"]
        if has_kl:
            cells.append(_cell(r.kl) if r.kl is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired_table(report: EvalReport, names: list[str], other: str) -> str:
    """Every row against ``other``, reply against reply, and the gap in worst win rates."""
    header = ["row", *(f"win vs `{other}`: {n}" for n in names)]
    if report.baseline is not None:
        header.append(f"worst win rate vs `{report.baseline}` minus `{other}`'s (points)")
    lines = [
        f"Paired against `{other}` (same prompts and seeds):",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for r in report.rows:
        cells = [_label(r), *(_cell(r.paired[other][n], percent=True) for n in names)]
        if report.baseline is not None:
            gap = r.worst_gap[other]
            cells.append(f"{100 * gap.mean:+.1f} [{100 * gap.low:+.1f}, {100 * gap.high:+.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            f"the evaluation plots need matplotlib ({exc}); install it with "
            "pip install matplotlib (it is in the dev extra)"
        ) from exc
    return plt


def plot_rewards(report: EvalReport, path: Path) -> None:
    """Per-objective bars of every row's mean reward (and win rate), with 95% intervals."""
    plt = _pyplot()
    names = list(report.objectives)
    panels = [("mean reward", "rewards")]
    if report.baseline is not None:
        panels.append((f"win rate vs {report.baseline}", "win_rates"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    width = 0.8 / len(report.rows)
    for ax, (title, attr) in zip(axes[0], panels):
        for n, r in enumerate(report.rows):
            estimates = [getattr(r, attr)[name] for name in names]
            xs = [i + (n - (len(report.rows) - 1) / 2) * width for i in range(len(names))]
            means = [e.mean for e in estimates]
            errors = [[e.mean - e.low for e in estimates], [e.high - e.mean for e in estimates]]
            ax.bar(xs, means, width, yerr=errors, capsize=2, label=r.row.label)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.axhline(0.5 if attr == "win_rates" else 0.0, color="grey", linewidth=0.8)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(report: EvalReport, path: Path) -> None:
    """The two objectives' means along the mixture and soup sweeps, other rows marked."""
    if report.pareto_objectives is None:
        raise ValueError("this report has no Pareto sweep")
    plt = _pyplot()
    first, second = report.pareto_objectives
    fig, ax = plt.subplots(figsize=(6, 5))
    for kind, style in (("mixture", "o-"), ("soup", "s--")):
        points = [r for r in report.pareto if r.row.kind == kind]
        xs = [r.rewards[first].mean for r in points]
        ys = [r.rewards[second].mean for r in points]
        label = "log-linear mixture" if kind == "mixture" else "soup (parameter average)"
        ax.plot(xs, ys, style, markersize=4, label=f"{label}, {len(points)} points")
    for r in report.rows:
        x, y = r.rewards[first], r.rewards[second]
        marker = "*" if r.row.label.startswith(("fitted", "profile:")) else "D"
        if r.row.kind == "soup":
            marker = "P"
        ax.errorbar(
            x.mean,
            y.mean,
            xerr=[[x.mean - x.low], [x.high - x.mean]],
            yerr=[[y.mean - y.low], [y.high - y.mean]],
            fmt=marker,
            markersize=11 if marker == "*" else 6,
            capsize=2,
            label=r.row.label,
        )
    ax.set_xlabel(f"mean {first} reward")
    ax.set_ylabel(f"mean {second} reward")
    ax.set_title(f"Pareto fronts: {first} vs {second} (bars: 95% intervals)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: EvalReport, out_dir: str | Path, name: str = "eval") -> list[Path]:
    """Write ``<name>.json``, ``<name>.md``, ``<name>.png`` and ``<name>_pareto.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.json", out / f"{name}.md"]
    report.meta.setdefault("versions", versions())
    written[0].write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    written[1].write_text(markdown(report))
    try:
        plot_rewards(report, out / f"{name}.png")
        written.append(out / f"{name}.png")
        if report.pareto_objectives is not None:
            plot_pareto(report, out / f"{name}_pareto.png")
            written.append(out / f"{name}_pareto.png")
    except ImportError as exc:
        logger.warning("plots skipped: %s", exc)
    return written
