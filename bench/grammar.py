"""Grammar mask cost per decoding step, on the demo family at c = 16.

Two measurements, each repeated and interleaved so that both sides see the same load:

1. **Engine**: c requests decode together, once all with a JSON-schema grammar and once
   all plain (same prompts, seeds and lengths). The time spent in the grammar code of a
   step (``constrain`` before sampling, ``advance`` after) is timed inside the engine;
   the report gives it per step, as a share of the grammar run's step time, and the
   step-time ratio grammar / plain. Target: mask cost < 10% of step time at c = 16.
2. **Libraries**: the replies of the grammar run replayed through llguidance (the one
   the engine uses: rows in turn, and its parallel executor) and xgrammar (if installed,
   its batched matcher): the median time to fill the masks of all c rows for one step.
   These replays run back to back on an idle thread; inside the engine the same fill
   costs more (caches are cold after each forward), which part 1 measures.

    python -m bench.grammar --out bench/results/grammar.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import mpo_core.decoding.choose as choose_module
from bench.common import scratch
from mpo_core.config import load_config
from mpo_core.decoding import grammar as grammar_module
from mpo_core.decoding.grammar import GrammarSpec
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.models.policies import PolicySet
from mpo_core.runners import load_policy_set

logger = logging.getLogger("bench.grammar")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 40},
        "polite": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
    },
    "required": ["answer", "polite", "score", "tags"],
    "additionalProperties": False,
}
PROMPTS = [
    "How do I keep houseplants healthy?",
    "Any tips for a rainy day?",
    "What should I cook tonight?",
    "How can I sleep better?",
]


class GrammarTimer:
    """Wraps the engine's grammar calls and adds up their wall time per step."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def install(self) -> None:
        constrain, advance = grammar_module.constrain, grammar_module.advance

        def timed_constrain(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return constrain(*args)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        def timed_advance(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return advance(*args)
            finally:
                self.seconds += time.perf_counter() - start

        # the engine's step chooses its tokens in decoding.choose, which calls both
        choose_module.constrain = timed_constrain  # type: ignore[assignment]
        choose_module.advance = timed_advance  # type: ignore[assignment]


class StepCounter:
    def __init__(self) -> None:
        self.steps = 0

    def on_step(self, batch_size: int, forward_seconds: dict[str, float]) -> None:
        self.steps += 1


def run_batch(
    engine: Engine, prompts: list[list[int]], grammar: Any, max_new: int, plain_len: list[int]
) -> tuple[float, list[list[int]]]:
    """Decode every prompt together; the wall time and each reply's token ids."""
    requests = []
    for i, prompt in enumerate(prompts):
        if grammar is not None:
            sampling = SamplingParams(max_new_tokens=max_new, temperature=1.0, seed=i)
        else:  # the same number of tokens as the grammar run gave, without a grammar
            sampling = SamplingParams(
                max_new_tokens=plain_len[i], temperature=1.0, seed=i, ignore_eos=True
            )
        requests.append(GenerationRequest(prompt, sampling, grammar=grammar))
    start = time.perf_counter()
    streams = [engine.submit(r) for r in requests]
    replies = [[e.token_id for e in stream] for stream in streams]
    return time.perf_counter() - start, replies


def engine_rounds(
    policy_set: PolicySet, concurrency: int, rounds: int, max_new: int
) -> tuple[dict[str, Any], list[list[int]]]:
    timer, counter = GrammarTimer(), StepCounter()
    timer.install()
    tok = policy_set.tokenizer
    prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(concurrency)]
    limits = EngineLimits(max_running=concurrency, max_queued=concurrency)
    grammar_steps, plain_steps, mask_steps = [], [], []
    replies: list[list[int]] = []
    with Engine(policy_set, limits, observer=counter) as engine:
        grammar = engine.compile_grammar(GrammarSpec("json_schema", SCHEMA))
        run_batch(engine, prompts, grammar, max_new, [])  # warm-up (and the mask tables)
        for _ in range(rounds):
            timer.seconds, counter.steps = 0.0, 0
            wall, replies = run_batch(engine, prompts, grammar, max_new, [])
            steps = max(counter.steps, 1)
            grammar_steps.append(wall / steps)
            mask_steps.append(timer.seconds / steps)
            lengths = [len(r) for r in replies]
            counter.steps = 0
            wall, _ = run_batch(engine, prompts, None, max_new, lengths)
            plain_steps.append(wall / max(counter.steps, 1))
    g, p, m = (statistics.median(x) for x in (grammar_steps, plain_steps, mask_steps))
    result = {
        "concurrency": concurrency,
        "rounds": rounds,
        "grammar_step_ms": 1000 * g,
        "plain_step_ms": 1000 * p,
        "mask_ms_per_step": 1000 * m,
        "mask_share_of_step": m / g,
        "step_ratio_grammar_over_plain": g / p,
        "reply_tokens_median": statistics.median(len(r) for r in replies),
    }
    return result, replies


def replay_llguidance(
    policy_set: PolicySet, replies: list[list[int]], parallel: bool = False
) -> list[float]:
    """The engine's fill (one row after another), or llguidance's parallel executor."""
    import llguidance

    executor = llguidance.LLExecutor() if parallel else None
    compiler = grammar_module.GrammarCompiler(
        policy_set.tokenizer, policy_set.vocab_size, policy_set.eos_token_ids
    )
    grammar = compiler.compile(GrammarSpec("json_schema", SCHEMA))
    rows = [grammar.matcher() for _ in replies]
    device = torch.device("cpu")
    times = []
    for step in range(max(len(r) for r in replies)):
        live = [(row, r[step]) for row, r in zip(rows, replies) if step < len(r)]
        start = time.perf_counter()
        if executor is None:
            grammar_module.allowed_tokens([row for row, _ in live], policy_set.vocab_size, device)
        else:
            words = (policy_set.vocab_size + 31) // 32
            bitmask = torch.zeros(len(live), words, dtype=torch.int32)  # [G, W]
            matchers = [(row.matcher, i) for i, (row, _) in enumerate(live)]
            executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), words * 4, len(live))
        times.append(time.perf_counter() - start)
        for row, token in live:
            row.advance(token)
    return times


def replay_xgrammar(policy_set: PolicySet, replies: list[list[int]]) -> list[float] | None:
    try:
        import xgrammar
    except ImportError:
        return None
    info = xgrammar.TokenizerInfo.from_huggingface(
        policy_set.tokenizer,
        vocab_size=policy_set.vocab_size,
        stop_token_ids=policy_set.eos_token_ids or None,
    )
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")
    )
    matchers = [xgrammar.GrammarMatcher(compiled) for _ in replies]
    batch = xgrammar.BatchGrammarMatcher()
    bitmask = xgrammar.allocate_token_bitmask(len(replies), policy_set.vocab_size)
    times = []
    for step in range(max(len(r) for r in replies)):
        live = [i for i, r in enumerate(replies) if step < len(r)]
        start = time.perf_counter()
        batch.batch_fill_next_token_bitmask([matchers[i] for i in live], bitmask, live)
        times.append(time.perf_counter() - start)
        for i in live:
            if not matchers[i].accept_token(replies[i][step]):
                logger.warning("xgrammar refused a token llguidance allowed (row %d)", i)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="policy-set YAML (default: the demo family)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default=scratch("grammar.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.config is None:
        from mpo_core.demo import build_demo

        args.config = str(build_demo(progress=False))
    policy_set = load_policy_set(load_config(args.config))
    engine_result, replies = engine_rounds(
        policy_set, args.concurrency, args.rounds, args.max_new_tokens
    )
    libraries: dict[str, Any] = {}
    replays: dict[str, Any] = {
        "llguidance (engine: rows in turn, bits to a bool mask)": replay_llguidance,
        "llguidance parallel executor (bitmask only)": lambda ps, r: replay_llguidance(ps, r, True),
        "xgrammar BatchGrammarMatcher (bitmask only)": replay_xgrammar,
    }
    for name, replay in replays.items():
        times = [replay(policy_set, replies) for _ in range(args.rounds)]
        if times[0] is None:
            continue
        per_step = [statistics.median(t) for t in times if t is not None]
        libraries[name] = {"mask_fill_ms_per_step_median": 1000 * statistics.median(per_step)}
    result = {
        "benchmark": "grammar",
        "config": args.config,
        "device": str(policy_set.device),
        "vocab_size": policy_set.vocab_size,
        "policies": policy_set.names,
        "threads": args.threads,
        "machine": platform.platform(),
        "engine": engine_result,
        "libraries": libraries,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
