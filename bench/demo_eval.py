"""Score the demo family: what each policy, the reference and the uniform mixture write.

For every row (the reference alone at strength 0, each aligned policy alone, the
uniform mixture at strength 1) it samples ``--n`` replies to the corpus's held-out
prompts through the engine (``Engine.submit``), scores them with every demo scorer and
prints a markdown table of the means, then three example replies per row.

    python bench/demo_eval.py --n 200 --seed 0

The output is what docs/demo.md shows.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass

from mpo_core.config import load_config
from mpo_core.demo import SCORERS, build_demo, heldout_prompts
from mpo_core.engine import Engine, EngineLimits, GenerationRequest
from mpo_core.policies import load_policy_set
from mpo_core.sampling import SamplingParams

logger = logging.getLogger("demo_eval")


@dataclass
class Row:
    label: str
    weights: dict[str, float] | None  # None: uniform
    strength: float


def rows_for(policy_names: list[str]) -> list[Row]:
    rows = [Row("reference `base` (strength 0)", None, 0.0)]
    rows += [Row(f"`{name}` alone", {name: 1.0}, 1.0) for name in policy_names]
    rows.append(Row("uniform mixture (strength 1)", None, 1.0))
    return rows


def sample_row(
    engine: Engine, prompts: list[str], row: Row, n: int, seed: int, args: argparse.Namespace
) -> list[tuple[str, str]]:
    """``n`` (prompt, reply) pairs, cycling through the prompts, seeded per reply."""
    tokenizer = engine.tokenizer
    streams = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        request = GenerationRequest(
            prompt_ids=tokenizer.encode(text, add_special_tokens=False),
            sampling=SamplingParams(
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=seed * 1_000_003 + i,
            ),
            mixture=engine.mixture(row.weights, row.strength),
        )
        streams.append((prompt, engine.submit(request)))
    return [(prompt, "".join(e.text for e in stream).strip()) for prompt, stream in streams]


def markdown(results: list[tuple[Row, list[tuple[str, str]]]], examples: int) -> str:
    names = list(SCORERS)
    lines = [
        "| row | " + " | ".join(names) + " | words |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for row, pairs in results:
        replies = [reply for _, reply in pairs]
        means = [statistics.fmean(SCORERS[name](r) for r in replies) for name in names]
        words = statistics.fmean(len(r.split()) for r in replies)
        lines.append(
            f"| {row.label} | " + " | ".join(f"{m:+.3f}" for m in means) + f" | {words:.1f} |"
        )
    lines.append("")
    for row, pairs in results:
        lines.append(f"**{row.label}**")
        lines.append("")
        for prompt, reply in pairs[:examples]:
            lines.append(f"- *{prompt}* → {reply}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="replies per row")
    parser.add_argument("--seed", type=int, default=0, help="demo build seed and sampling seed")
    parser.add_argument("--variant", default="full", help="demo variant (full or small)")
    parser.add_argument("--home", default=None, help="MPO_HOME override")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--examples", type=int, default=3, help="example replies per row")
    parser.add_argument(
        "--adapters", action="store_true", help="the demo built as LoRA adapters of the reference"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    started = time.perf_counter()
    config_path = build_demo(
        home=args.home, variant=args.variant, seed=args.seed, adapters=args.adapters
    )
    logger.info("family ready in %.1f s: %s", time.perf_counter() - started, config_path)
    config = load_config(config_path)
    config.device = "cpu"  # the documented numbers are CPU float32
    config.dtype = "float32"
    policy_set = load_policy_set(config)
    prompts = [p.text for p in heldout_prompts()]
    limits = EngineLimits(max_running=64, max_queued=max(64, args.n))
    results = []
    with Engine(policy_set, limits) as engine:
        for row in rows_for(policy_set.names):
            row_started = time.perf_counter()
            results.append((row, sample_row(engine, prompts, row, args.n, args.seed, args)))
            logger.info("%s: %.1f s", row.label, time.perf_counter() - row_started)
    sys.stdout.write(markdown(results, args.examples) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
