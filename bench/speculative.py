"""Speculative decoding of the mixture: tokens/s with speculation off, n-gram and draft.

On the demo family (K = 3 trained policies, uniform weights, strength 1; built under
``$MPO_HOME`` if it is not there yet), ``c`` chat requests over held-out prompts arrive
together and decode to EOS or ``--new-tokens``, greedy or at temperature 1. Every
method runs in the same process on the same loaded models, one engine each, and the
repetitions interleave the methods, so a load change on the machine hits all of them.
Reported per (method, c, temperature): median tokens/s over the repetitions, the ratio
to speculation off, the acceptance rate (accepted / drafted) and tokens per step (each
step is one forward per model). ``ngram`` and ``draft`` speculate at every batch size
(the cut-off is lifted) so that the table shows where speculation stops paying;
``default`` is the policy-set defaults as served (draft, off above the cut-off)::

    python -m bench.speculative --out bench/results/speculative_demo.json
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.demo_eval import run_meta, write_json
from mpo_core.config import SpeculativeConfig, load_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.demo import build_demo, heldout_prompts
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.runners import load_policy_set

logger = logging.getLogger(__name__)

# "draft-1l": the draft model's first decoder layer only (``draft_layers: 1``).
# "default": the policy-set defaults (draft, with the batch-size cut-off), as served.
METHODS = ("off", "ngram", "draft", "draft-1l", "default")


def chat_prompts(engine: Engine, count: int) -> list[list[int]]:
    tokenizer = engine.tokenizer
    prompts = [p.text for p in heldout_prompts()]
    out = []
    for i in range(count):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompts[i % len(prompts)]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def measure(
    engine: Engine, prompts: list[list[int]], temperature: float, new_tokens: int, seed: int
) -> dict[str, float]:
    """Run the prompts together; tokens/s, tokens per step, drafted and accepted."""
    steps, tokens = engine.stats().steps, engine.stats().generated_tokens
    spec = engine.speculator
    drafted, accepted = (spec.drafted, spec.accepted) if spec is not None else (0, 0)
    started = time.perf_counter()
    streams = [
        engine.submit(
            GenerationRequest(
                prompt,
                SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed + i),
            )
        )
        for i, prompt in enumerate(prompts)
    ]
    for stream in streams:
        for _ in stream:
            pass
    seconds = time.perf_counter() - started
    # A scoring job runs on the engine thread after the step in flight: once it returns,
    # that step is counted (the last events are pushed before the step's tally).
    engine.score([[1]], [[2]])
    stats = engine.stats()
    generated = stats.generated_tokens - tokens
    out = {
        "tokens": generated,
        "seconds": seconds,
        "tokens_per_s": generated / seconds,
        "tokens_per_step": generated / max(1, stats.steps - steps),
        "drafted": (spec.drafted - drafted) if spec is not None else 0,
        "accepted": (spec.accepted - accepted) if spec is not None else 0,
    }
    return out


def summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    drafted = sum(r["drafted"] for r in runs)
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "tokens_per_step": statistics.median(r["tokens_per_step"] for r in runs),
        "acceptance": sum(r["accepted"] for r in runs) / drafted if drafted else None,
        "tokens": statistics.median(r["tokens"] for r in runs),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--reps", type=int, default=3, help="repetitions (interleaved)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-draft-tokens", type=int, default=4)
    parser.add_argument("--draft-model", default=None, help="default: the reference `base`")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    policy_set = load_policy_set(load_config(build_demo(progress=False)))
    top = max(args.concurrency)
    engines = {}
    for method in args.methods:
        settings = SpeculativeConfig(
            method="ngram" if method == "ngram" else "off" if method == "off" else "draft",
            max_draft_tokens=args.max_draft_tokens,
            draft_model=args.draft_model,
            draft_layers=1 if method == "draft-1l" else None,
            max_batch_size=top,  # no cut-off: measure every batch size
        )
        if method == "default":
            settings = SpeculativeConfig()
        limits = EngineLimits(max_running=top, max_queued=4 * top)
        engines[method] = Engine(policy_set, limits, speculative=settings).start()
    prompts = chat_prompts(engines[args.methods[0]], top)
    for engine in engines.values():  # warm-up: first-call costs out of the figures
        measure(engine, prompts[:2], 0.0, 8, 0)

    runs: dict[tuple[str, int, float], list[dict[str, float]]] = {}
    cells = list(itertools.product(args.concurrency, args.temperatures))
    for rep in range(args.reps):
        for c, temperature in cells:
            for method in args.methods:
                run = measure(engines[method], prompts[:c], temperature, args.new_tokens, rep)
                runs.setdefault((method, c, temperature), []).append(run)
                logger.info(
                    "rep %d c=%d T=%g %-5s %.1f tok/s, %.2f tok/step",
                    rep, c, temperature, method, run["tokens_per_s"], run["tokens_per_step"],
                )  # fmt: skip
    for engine in engines.values():
        engine.stop()

    rows = []
    for c, temperature in cells:
        base = (
            summarise(runs[("off", c, temperature)])["tokens_per_s"] if "off" in engines else None
        )
        for method in args.methods:
            row = summarise(runs[(method, c, temperature)])
            row.update(method=method, concurrency=c, temperature=temperature)
            row["ratio"] = row["tokens_per_s"] / base if base else None
            rows.append(row)
    table = markdown(rows)
    print(table)
    if args.out is not None:
        meta = run_meta("-m bench.speculative", argv, args)
        meta["note"] = "2-core CPU shared with other jobs: compare the ratios, not the absolutes"
        write_json(args.out, {"meta": meta, "rows": rows, "table": table})
    return 0


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| c | temperature | method | tokens/s | vs off | acceptance | tokens/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acceptance = f"{r['acceptance']:.2f}" if r["acceptance"] is not None else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        lines.append(
            f"| {r['concurrency']} | {r['temperature']:g} | {r['method']} | "
            f"{r['tokens_per_s']:.1f} | {ratio} | {acceptance} | {r['tokens_per_step']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
