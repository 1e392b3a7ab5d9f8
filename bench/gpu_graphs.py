"""Static caches and CUDA graphs on a GPU: single-model steps and the engine, graphed vs eager.

Builds random Llama-shaped policies directly on the GPU (no disk, no hub), so that one
short run on a lent device gives every figure of docs/benchmarks.md's GPU section:

- one model's decode step: CUDA-graphed static cache vs the eager growing cache, at
  1 and 16 rows (median over many steps);
- the engine, K policies, concurrency 1 and 16, fixed output length (EOS ignored):
  tokens/s and ms per step, graphed vs eager, in one run;
- the ratio of the engine's c = 1 step to the sum of the K single graphed steps;
- GPU memory: weights, and the peak above them at c = 16 (``max_memory_allocated``);
- exactness: graphed vs eager static steps, and the engine's greedy tokens graphed vs
  the eager growing cache.

    python -m bench.gpu_graphs --sizes 100m,1b --k 3 --out bench/results/gpu_graphs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bench.common import scratch
from mpo_core.config import ModelSpec, PolicySetConfig
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.models.kvcache import GrowingBatch, KVStorage
from mpo_core.models.policies import PolicySet, wrap_model
from mpo_core.models.static_cache import StaticBatch

SHAPES = {  # Llama blocks as in bench/common.py, with a 32k vocabulary
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=256),
    "100m": dict(hidden=768, layers=12, heads=12, kv_heads=12, intermediate=3072),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192),
}


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def build_family(size: str, k: int, vocab: int, context: int, device: str) -> PolicySet:
    shape = SHAPES[size]
    tokenizer = word_tokenizer(vocab)
    names = [f"p{i}" for i in range(k)]
    loaded = []
    torch.set_default_dtype(torch.bfloat16)
    for i, name in enumerate(names):
        torch.manual_seed(i)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=shape["hidden"],
            intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv_heads"],
            max_position_embeddings=context,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
        with torch.device(device):
            model = LlamaForCausalLM(config)
        loaded.append(wrap_model(name, model))
    torch.set_default_dtype(torch.float32)
    config = PolicySetConfig(
        served_name="bench",
        policies=[ModelSpec(name=n, model=f"random/{n}") for n in names],
        device=device,
        dtype="bfloat16",
    )
    return PolicySet.build(
        config, loaded, None, tokenizer, torch.device(device), torch.bfloat16, eos_token_ids=[2]
    )


def with_config(ps: PolicySet, **update: Any) -> PolicySet:
    return dataclasses.replace(ps, config=ps.config.model_copy(update=update))


def prompt(i: int, length: int = 16) -> list[int]:
    return [(i * 31 + j * 7) % 400 + 3 for j in range(length)]  # needs --vocab >= 403


CUDA = torch.cuda.is_available()


def sync_time() -> float:
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if CUDA else 0


def reset_peak() -> None:
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def step_ms(batch: GrowingBatch | StaticBatch, rows: int, steps: int) -> float:
    """Median ms of one decode step over ``rows`` rows (after a prefill and warm-up)."""
    batch.prefill(list(range(rows)), [prompt(i) for i in range(rows)])
    device = batch.device
    tokens = torch.full((rows,), 5, device=device)
    position = 16
    times = []
    for i in range(steps + 3):
        start = sync_time()
        batch.decode(tokens, torch.full((rows,), position, device=device))
        if i >= 3:
            times.append((sync_time() - start) * 1e3)
        position += 1
    batch.keep(set())
    return statistics.median(times)


def engine_run(ps: PolicySet, concurrency: int, new_tokens: int) -> dict[str, float]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    with Engine(ps, EngineLimits(max_running=16)) as engine:
        mixture = engine.mixture([1.0] * len(ps.names))
        engine.generate(GenerationRequest(prompt(99), SamplingParams(8), mixture))  # warm-up
        reset_peak()
        steps_before = engine.stats().steps
        start = sync_time()
        streams = [
            engine.submit(GenerationRequest(prompt(i), params, mixture)) for i in range(concurrency)
        ]
        replies = [[e.token_id for e in s] for s in streams]
        wall = sync_time() - start
        steps = engine.stats().steps - steps_before
        graphed = sum(bool(getattr(b, "graphs", None)) for b in engine.runner.batches)  # type: ignore[attr-defined]
    return {
        "tokens_per_s": concurrency * new_tokens / wall,
        "ms_per_step": wall * 1e3 / steps,
        "steps": steps,
        "graphed_models": graphed,
        "peak_bytes": peak_bytes(),
        "replies": replies,
    }


def exactness(ps: PolicySet) -> dict[str, float]:
    """Max |log-prob| gap between graphed and eager static steps of one model."""
    model = ps.policies[0]
    graphed = StaticBatch(model, ps.vocab_size, ps.device, 4, 64, graphs=CUDA)
    eager = StaticBatch(model, ps.vocab_size, ps.device, 4, 64)
    gaps = []
    for batch in (graphed, eager):
        out = [batch.prefill([0, 1], [prompt(0, 20), prompt(1, 3)])]
        tokens = torch.tensor([7, 8], device=ps.device)
        for step in range(50):  # past the 64 columns: compaction
            if step == 10:
                batch.keep({1})
            n = len(batch.row_ids)
            positions = torch.tensor([20 + step, 3 + step][-n:], device=ps.device)
            out.append(batch.decode(tokens[:n], positions).clone())
        gaps.append(out)
    worst = max(float((a - b).abs().max()) for a, b in zip(*gaps))
    return {"graphed_vs_eager_static_max_abs": worst, "compactions": graphed.compactions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100m,1b")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--single-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=scratch("gpu_graphs.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not CUDA:
        print("gpu_graphs: no CUDA device: a smoke run on the CPU, without graphs", file=sys.stderr)
    device = "cuda" if CUDA else "cpu"
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if CUDA else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: str(v) for k, v in vars(args).items()},
        "sizes": {},
    }
    for size in args.sizes.split(","):
        reset_peak()
        ps = build_family(size, args.k, args.vocab, args.context, device)
        weights = torch.cuda.memory_allocated() if CUDA else 1
        row: dict[str, Any] = {"weights_bytes": weights}
        model = ps.policies[0]
        for rows in (1, 16):
            graphed = StaticBatch(model, ps.vocab_size, ps.device, 16, args.context, graphs=CUDA)
            row[f"single_graphed_ms_b{rows}"] = step_ms(graphed, rows, args.single_steps)
            del graphed
            eager = GrowingBatch(model, ps.vocab_size, ps.device, KVStorage(None))
            row[f"single_eager_ms_b{rows}"] = step_ms(eager, rows, 20)
        row.update(exactness(ps))
        modes = {
            "graphed": with_config(ps, static_cache="on"),
            "eager": with_config(ps, static_cache="off"),
        }
        replies = {}
        for mode, mode_ps in modes.items():
            for c in (1, 16):
                reset_peak()
                run = engine_run(mode_ps, c, args.new_tokens)
                replies[(mode, c)] = run.pop("replies")
                row[f"engine_{mode}_c{c}"] = run
        same = [
            sum(a == b for a, b in zip(x, y)) / len(x)
            for x, y in zip(replies[("graphed", 16)], replies[("eager", 16)])
        ]
        row["greedy_token_agreement_c16"] = statistics.mean(same)
        single_sum = args.k * row["single_graphed_ms_b1"]
        g1, e1 = row["engine_graphed_c1"], row["engine_eager_c1"]
        g16, e16 = row["engine_graphed_c16"], row["engine_eager_c16"]
        row["ratios"] = {
            "engine_c1_step_over_sum_of_single_graphed_steps": g1["ms_per_step"] / single_sum,
            "graphed_over_eager_tokens_per_s_c1": g1["tokens_per_s"] / e1["tokens_per_s"],
            "graphed_over_eager_tokens_per_s_c16": g16["tokens_per_s"] / e16["tokens_per_s"],
            "peak_above_weights_over_weights_c16": (g16["peak_bytes"] - weights) / weights,
        }
        results["sizes"][size] = row
        print(json.dumps({size: row}, indent=1), flush=True)
        del ps, modes
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
