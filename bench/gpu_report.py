"""Markdown table of a bench.gpu_graphs result: ``python -m bench.gpu_report FILE``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(result: dict) -> str:
    lines = [
        f"{result['device']}, torch {result['torch']}, {result['date']}",
        "",
        "| size | single step graphed b1 / b16 (ms) | eager b1 / b16 (ms) | engine c=1 graphed"
        " / eager (tok/s) | c=16 graphed / eager (tok/s) | c=1 step / sum of K single |"
        " (peak - weights) / weights, c=16 | graphed vs eager max abs | greedy agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, row in result["sizes"].items():
        r = row["ratios"]
        lines.append(
            f"| {size} | {row['single_graphed_ms_b1']:.2f} / {row['single_graphed_ms_b16']:.2f}"
            f" | {row['single_eager_ms_b1']:.1f} / {row['single_eager_ms_b16']:.1f}"
            f" | {row['engine_graphed_c1']['tokens_per_s']:.0f} /"
            f" {row['engine_eager_c1']['tokens_per_s']:.1f}"
            f" | {row['engine_graphed_c16']['tokens_per_s']:.0f} /"
            f" {row['engine_eager_c16']['tokens_per_s']:.0f}"
            f" | {r['engine_c1_step_over_sum_of_single_graphed_steps']:.2f}"
            f" | {r['peak_above_weights_over_weights_c16']:.2f}"
            f" | {row['graphed_vs_eager_static_max_abs']:.2g}"
            f" | {row['greedy_token_agreement_c16']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())))
