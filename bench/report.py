"""Turn ``bench.run`` results into the table, the target ratios and the plot.

    python -m bench.report bench/results/tiny.json bench/results/100m.json \
        --markdown bench/results/tables.md --plot docs/benchmarks_throughput.png

Figures are medians over runs. Each ratio is computed within one run (both sides from
the same run index), then the median over runs is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Key = tuple[str, str, int, int]  # size, mode, K, concurrency
TARGET_OVERHEAD = 0.9
TARGET_BATCHING = 4.0
TARGET_SERVING = 0.85
TARGET_MEMORY = 1.2


def load(paths: Iterable[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return rows_of(json.loads(path.read_text()) for path in paths)


def rows_of(results: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows and the metas of ``bench.run`` results (parsed JSON), rows labelled by size."""
    rows, metas = [], []
    for data in results:
        tokens = data["meta"].get("new_tokens", 64)
        kv = data["meta"].get("kv_cache_dtype", "auto")
        for row in data["rows"]:  # a shorter run is its own group, never mixed with 64
            if tokens != 64:
                row["size"] = f"{row['size']} ({tokens} tok)"
            if kv != "auto":  # so is a run with a narrower KV cache
                row["size"] = f"{row['size']} (kv {kv})"
        rows += data["rows"]
        metas.append(data["meta"])
    return rows, metas


def _median(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else float("nan")


def grouped(rows: list[dict[str, Any]]) -> dict[Key, list[dict[str, Any]]]:
    groups: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["size"], row["mode"], row["k"], row["concurrency"])].append(row)
    return groups


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| size | mode | K | c | tokens/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms "
        "| peak RSS MiB | runs |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"
    )
    lines = [header]
    order = {"single": 0, "diy-mix": 1, "engine": 2, "http": 3}
    for key in sorted(grouped(rows), key=lambda k: (k[0], k[2], order[k[1]], k[3])):
        group = grouped(rows)[key]
        med = {f: _median([r[f] for r in group]) for f in _FIELDS}
        size, mode, k, c = key
        lines.append(
            f"| {size} | {mode} | {k} | {c} | {med['tokens_per_s']:.1f} | "
            f"{med['ttft_ms_p50']:.1f} | {med['itl_ms_p50']:.1f} | {med['itl_ms_p99']:.1f} | "
            f"{med['peak_rss_mb']:.0f} | {len(group)} |"
        )
    return "\n".join(lines)


_FIELDS = ("tokens_per_s", "ttft_ms_p50", "itl_ms_p50", "itl_ms_p99", "peak_rss_mb")


def _by_run(rows: list[dict[str, Any]], size: str, mode: str, k: int, c: int) -> dict[int, Any]:
    return {
        r["run"]: r
        for r in rows
        if (r["size"], r["mode"], r["k"], r["concurrency"]) == (size, mode, k, c)
    }


def _paired(
    rows: list[dict[str, Any]],
    a: tuple[str, int, int],
    b: tuple[str, int, int],
    size: str,
    ratio: Callable[[dict[str, Any], dict[str, Any]], float],
) -> list[float]:
    left, right = _by_run(rows, size, *a), _by_run(rows, size, *b)
    return [ratio(left[run], right[run]) for run in sorted(left) if run in right]


def _pairs(row: dict[str, Any]) -> list[dict[str, Any]]:
    """(engine c = 1, bare step times) pairs of one run: the measurement and its step
    times, then the alternated extra pairs (``--overhead-pairs``) where recorded."""
    first = {**row, "policy_step_s": row["extra"].get("policy_step_s")}
    return [first, *row["extra"].get("overhead_pairs", [])]


def overhead_ratios(rows: list[dict[str, Any]], size: str, k: int) -> list[float]:
    """Engine tokens/s at c = 1 over 1 / (sum of the policies' bare step times): per run,
    the median over that run's pairs."""
    out = []
    for row in _by_run(rows, size, "engine", k, 1).values():
        values = [
            p["tokens_per_s"] * sum(p["policy_step_s"]) for p in _pairs(row) if p["policy_step_s"]
        ]
        if values:
            out.append(statistics.median(values))
    return out


def decode_ratios(rows: list[dict[str, Any]], size: str, k: int) -> list[float]:
    """Like ``overhead_ratios`` but without the prefill: bare step sum / engine's ITL p50."""
    out = []
    for row in _by_run(rows, size, "engine", k, 1).values():
        values = [
            1000 * sum(p["policy_step_s"]) / p["itl_ms_p50"]
            for p in _pairs(row)
            if p["policy_step_s"] and p["itl_ms_p50"]
        ]
        if values:
            out.append(statistics.median(values))
    return out


def memory_check(row: dict[str, Any]) -> tuple[float, bool]:
    """(peak - baseline) / parameter bytes, and whether peak <= 1.2 x params + baseline."""
    extra = row["peak_rss_mb"] - row["baseline_rss_mb"]
    return extra / row["param_mb"], row["peak_rss_mb"] <= (
        TARGET_MEMORY * row["param_mb"] + row["baseline_rss_mb"]
    )


def _fmt(
    values: list[float],
    target: float,
    at_least: bool = True,
    judged: bool = True,
    note: str = "info (targets are for 100m)",
) -> str:
    """Median (per-run values) and a verdict; the targets are set for the 100M model only."""
    if not values:
        return "| not measured | |"
    med = statistics.median(values)
    ok = med >= target if at_least else med <= target
    runs = ", ".join(f"{v:.2f}" for v in values)
    verdict = ("met" if ok else "MISSED") if judged else note
    if judged and len(values) < 3:
        verdict += f" ({len(values)} run{'s' if len(values) > 1 else ''}, not 3)"
    return f"| {med:.2f} ({runs}) | {verdict} |"


def ratios(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | target | K | median (per run) | verdict |",
        "|---|---|--:|---|---|",
    ]
    sizes = sorted({r["size"] for r in rows})
    for size in sizes:
        ks = sorted({r["k"] for r in rows if r["size"] == size and r["mode"] != "single"})
        for k in ks:
            lines.append(
                f"| {size} | 1. overhead: engine c=1 tok/s x sum step time >= 0.9 | {k} "
                + _fmt(
                    overhead_ratios(rows, size, k),
                    TARGET_OVERHEAD,
                    judged=not size.startswith("tiny"),
                )
            )
        for k in ks:
            decode_only = decode_ratios(rows, size, k)
            if decode_only:
                lines.append(
                    f"| {size} | 1b. overhead, decode only: sum step time / engine ITL p50 "
                    f"at c=1 (info) | {k} "
                    + _fmt(decode_only, TARGET_OVERHEAD, judged=False, note="info")
                )
        for k in ks:
            batching = _paired(
                rows,
                ("engine", k, 16),
                ("diy-mix", k, 16),
                size,
                lambda a, b: a["tokens_per_s"] / b["tokens_per_s"],
            )
            if batching:
                lines.append(
                    f"| {size} | 2. batching: engine / diy-mix at c=16 >= 4 | {k} "
                    + _fmt(batching, TARGET_BATCHING, judged=not size.startswith("tiny"))
                )
        for k in ks:
            serving = _paired(
                rows,
                ("http", k, 16),
                ("engine", k, 16),
                size,
                lambda a, b: a["tokens_per_s"] / b["tokens_per_s"],
            )
            if serving:
                lines.append(
                    f"| {size} | 3. serving: http / engine at c=16 >= 0.85 | {k} "
                    + _fmt(serving, TARGET_SERVING, judged=not size.startswith("tiny"))
                )
        for k in ks:
            for c in sorted({1, max_c(rows, size)}):
                engine = list(_by_run(rows, size, "engine", k, c).values())
                if engine:
                    values = [memory_check(r)[0] for r in engine]
                    lines.append(
                        f"| {size} | 4. memory: (peak RSS - baseline) / param bytes <= 1.2, "
                        f"engine c={c} | {k} "
                        + _fmt(values, TARGET_MEMORY, False, judged=not size.startswith("tiny"))
                    )
    return "\n".join(lines)


def max_c(rows: list[dict[str, Any]], size: str) -> int:
    return max(r["concurrency"] for r in rows if r["size"] == size)


_COLORS = {"single": "tab:gray", "diy-mix": "tab:orange", "engine": "tab:blue", "http": "tab:green"}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Throughput against concurrency, one panel per (size, K), one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped(rows)
    panels = sorted({(s, k) for s, m, k, _ in groups if m != "single"})
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False, sharey=False
    )
    for ax, (size, k) in zip(axes[0], panels):
        for mode in ("single", "diy-mix", "engine", "http"):
            kk = 1 if mode == "single" else k
            points = sorted(
                (c, _median([r["tokens_per_s"] for r in g]))
                for (s, m, gk, c), g in groups.items()
                if (s, m, gk) == (size, mode, kk)
            )
            if points:
                label = "single (K=1)" if mode == "single" else mode
                ax.plot(*zip(*points), marker="o", label=label, color=_COLORS[mode])
        ax.set_xscale("log", base=2)
        ticks = sorted({c for (s, _, gk, c) in groups if s == size})
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.set_title(f"{size}, K = {k}")
        ax.set_xlabel("concurrency")
        ax.set_ylabel("tokens/s")
        ax.grid(True, alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict[str, Any]], metas: list[dict[str, Any]]) -> str:
    """Each run's command, date and time, the table and the target ratios."""
    commands = [f"- `{m['command']}` ({m['date']}, {m['elapsed_s']:.0f} s)" for m in metas]
    return "\n".join([*commands, "", table(rows), "", ratios(rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    parser.add_argument("--plot", type=Path, default=None, help="write the PNG here")
    args = parser.parse_args(argv)
    rows, metas = load(args.results)
    text = markdown(rows, metas) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
