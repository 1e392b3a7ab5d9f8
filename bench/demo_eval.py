"""Score the demo family: what each policy, the reference and the uniform mixture write.

For every row (the reference alone at strength 0, each aligned policy alone, the
uniform mixture at strength 1) it samples ``--n`` replies to the corpus's held-out
prompts through the engine (``Engine.submit``), scores them with every demo scorer and
prints a markdown table of the means, then three example replies per row. The same
figures, every reply and the run's settings go to ``--out`` as JSON.

    python -m bench.demo_eval --n 200 --seed 0     # writes bench/out/demo_eval.json

The output is what docs/demo.md shows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import scratch
from bench.render_tables import demo_eval
from mpo_core.config import load_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.demo import SCORERS, build_demo, heldout_prompts
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.runners import load_policy_set

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


def scores(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Each scorer's mean over the replies, and the mean reply length in words."""
    replies = [reply for _, reply in pairs]
    means = {name: statistics.fmean(scorer(r) for r in replies) for name, scorer in SCORERS.items()}
    return {**means, "words": statistics.fmean(len(r.split()) for r in replies)}


def markdown(results: list[tuple[Row, list[tuple[str, str]]]], examples: int) -> str:
    lines = [demo_eval({"rows": results_json(results)})]  # what docs/demo.md renders
    lines.append("")
    for row, pairs in results:
        lines.append(f"**{row.label}**")
        lines.append("")
        for prompt, reply in pairs[:examples]:
            lines.append(f"- *{prompt}* → {reply}")
        lines.append("")
    return "\n".join(lines)


def results_json(results: list[tuple[Row, list[tuple[str, str]]]]) -> list[dict[str, Any]]:
    """The rows as JSON: settings, the table's figures and every (prompt, reply) pair."""
    return [
        {
            "label": row.label,
            "weights": row.weights,
            "strength": row.strength,
            "scores": scores(pairs),
            "replies": [list(pair) for pair in pairs],
        }
        for row, pairs in results
    ]


def run_meta(script: str, argv: list[str] | None, args: argparse.Namespace) -> dict[str, Any]:
    """Where and how a result was made: date, the command, the machine, the arguments."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "logical_cpus": __import__("os").cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    logger.info("results written to %s", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="replies per row")
    parser.add_argument("--seed", type=int, default=0, help="demo build seed and sampling seed")
    parser.add_argument("--variant", default="full", help="demo variant (full or small)")
    parser.add_argument("--home", default=None, help="MPO_HOME override")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--examples", type=int, default=3, help="example replies per row")
    parser.add_argument("--out", type=Path, default=scratch("demo_eval.json"))
    parser.add_argument(
        "--adapters", action="store_true", help="the demo built as LoRA adapters of the reference"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    meta = run_meta("bench/demo_eval.py", argv, args)
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
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out, {"meta": meta, "rows": results_json(results)})
    sys.stdout.write(markdown(results, args.examples) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
