"""The adapter backend against its baselines, ratios from one run (docs/adapters.md).

    python -m bench.adapters --size 100m --k 3 --rank 16 --concurrency 1,4 --rounds 5 \
        --threads 1 --out bench/results/adapters_100m.json

A workload is ``c`` requests arriving together, 32-token prompts, ``--new-tokens``
greedy tokens each (EOS ignored), uniform weights over the K policies at strength 1.
The systems:

- ``adapters``: the base with K rank-r LoRA adapters on every linear layer (grouped
  backend): c requests, K rows each;
- ``base-rows``: the base model alone, K x c requests of one row each: the same rows
  per step without the adapters, so ``adapters / base-rows`` is the adapter overhead (a);
- ``full``: the same adapters merged into K full models (K-separate-models backend),
  c requests: ``full / adapters`` is the saving (b);
- ``base``: the base alone, c requests: ``adapters / base`` is the cost of mixing (c).

Speed: one process holds all three families and runs the systems in turn, ``--rounds``
times (the order rotating), so that each round's four figures are taken seconds apart;
a ratio is the median over rounds of that round's ratio of median inter-token latencies.
On a shared machine whose speed drifts by 2-3x from minute to minute, ratios taken in
separate processes minutes apart mean little.

Memory: each of ``adapters``, ``full`` and ``base`` then runs once in a fresh process
(so that its peak RSS is its own), at every concurrency; the peak is reported above the
process's RSS after imports and over the parameter (+ adapter) bytes it holds. On a GPU
the RSS figures say nothing about device memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from .common import (
    SIZES,
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

logger = logging.getLogger("bench.adapters")
SYSTEMS = ("adapters", "base-rows", "full", "base")


def build(size: str, k: int, rank: int, root: Path) -> Path:
    """The base, K adapters and their merged copies under ``root`` (built once; "1b" in
    bfloat16, as bench.common builds it)."""
    import torch

    from mpo_core.testing.lora import LoraShape, make_adapter_family

    folder = root / f"{size}_k{k}_r{rank}"
    if not (folder / "merged.yaml").exists():
        shapes = [LoraShape(r=rank, alpha=2 * rank, targets="all") for _ in range(k)]
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if size == "1b" else torch.float32)
        try:
            make_adapter_family(folder, shapes, lora_std=0.02, **SIZES[size])
        finally:
            torch.set_default_dtype(default)
    base = {"served_name": "base", "policies": [{"name": "base", "model": "base"}]}
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    return folder


def _config(path: Path, device: str, dtype: str) -> Any:
    from mpo_core.config import parse_config

    raw = yaml.safe_load(path.read_text())
    raw.update(device=device, dtype=dtype)
    return parse_config(raw, base_dir=path.parent)


def _engine_rows(engine: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    from . import systems

    return summarize(*systems.run_engine(engine, prompts, new_tokens))


def _load(args: argparse.Namespace, name: str) -> Any:
    from mpo_core.runners import load_policy_set

    folder = args.models_dir / f"{args.size}_k{args.k}_r{args.rank}"
    return load_policy_set(_config(folder / f"{name}.yaml", args.device, args.dtype))


def _held_mb(policy_set: Any) -> float:
    """Parameter bytes the policy set holds (+ the adapters' stacked factors)."""
    from .common import param_mb

    if policy_set.adapters is not None:
        model = policy_set.adapters.model
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        return param_mb([model]) + buffers / 2**20
    models = [*policy_set.models]
    if policy_set.reference is not None:
        models.append(policy_set.reference.model)
    return param_mb(models)


def memory_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One system alone in this process: its peak RSS at each concurrency."""
    from mpo_core.engine.core import Engine, EngineLimits

    baseline = rss_mb()
    name = {"adapters": "adapters", "full": "merged", "base": "base"}[args.worker]
    policy_set = _load(args, name)
    held = _held_mb(policy_set)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    prompts = prompt_ids(policy_set.tokenizer, prompt_texts(max(concurrencies)))
    rows = []
    with Engine(policy_set, EngineLimits(max_running=max(concurrencies))) as engine:
        _engine_rows(engine, prompts[:1], 4)  # warm up
        for c in concurrencies:
            reset_peak_rss()
            fields = _engine_rows(engine, prompts[:c], args.new_tokens)
            peak = peak_rss_mb() - baseline
            fields.update(system=args.worker, concurrency=c, peak_above_baseline_mb=peak)
            fields.update(held_mb=held, peak_over_held=peak / held)
            rows.append(fields)
    return rows


def timing_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All systems in this process, in turn, ``--rounds`` times."""
    from mpo_core.engine.core import Engine, EngineLimits

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    most = max(concurrencies) * args.k
    sets = {name: _load(args, name) for name in ("adapters", "merged", "base")}
    engines = {
        name: Engine(policy_set, EngineLimits(max_running=most, max_queued=most)).start()
        for name, policy_set in sets.items()
    }
    prompts = prompt_ids(sets["base"].tokenizer, prompt_texts(most))
    plan = {  # system -> (engine, requests per c)
        "adapters": ("adapters", 1),
        "base-rows": ("base", args.k),
        "full": ("merged", 1),
        "base": ("base", 1),
    }
    rows = []
    try:
        for engine in engines.values():
            _engine_rows(engine, prompts[:1], 4)  # warm up
        for round_index in range(args.rounds):
            order = SYSTEMS[round_index % len(SYSTEMS) :] + SYSTEMS[: round_index % len(SYSTEMS)]
            for c in concurrencies:
                for system in order:
                    name, per_request = plan[system]
                    fields = _engine_rows(
                        engines[name], prompts[: c * per_request], args.new_tokens
                    )
                    fields.update(system=system, concurrency=c, round=round_index)
                    rows.append(fields)
                    logger.info(
                        "round %d c=%d %s: %.1f ms", round_index, c, system, fields["itl_ms_p50"]
                    )
    finally:
        for engine in engines.values():
            engine.stop()
    return rows


def _worker_rows(args: argparse.Namespace, worker: str) -> list[dict[str, Any]]:
    extra = ["--size", args.size, "--k", str(args.k), "--rank", str(args.rank)]
    extra += ["--device", args.device, "--dtype", args.dtype]
    rows: list[dict[str, Any]] = worker_rows("bench.adapters", args, worker, logger, extra)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    build(args.size, args.k, args.rank, args.models_dir)
    timing = _worker_rows(args, "timing")
    memory = [row for system in ("adapters", "full", "base") for row in _worker_rows(args, system)]
    return {"timing": timing, "memory": memory, "ratios": ratios(timing, memory)}


def ratios(timing: list[dict[str, Any]], memory: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: the median over rounds of each round's ratios; the memory rows."""
    out: dict[str, Any] = {}
    for c in sorted({r["concurrency"] for r in timing}):
        itl = {(r["round"], r["system"]): r["itl_ms_p50"] for r in timing if r["concurrency"] == c}
        rounds = sorted({r for r, _ in itl})

        def median_ratio(
            top: str,
            bottom: str,
            itl: dict[tuple[int, str], float] = itl,
            rounds: list[int] = rounds,
        ) -> float:
            return statistics.median(itl[(r, top)] / itl[(r, bottom)] for r in rounds)

        out[f"c={c}"] = {
            **{f"itl_ms_{s}": statistics.median(itl[(r, s)] for r in rounds) for s in SYSTEMS},
            "a_overhead_adapters_over_base_rows": median_ratio("adapters", "base-rows"),
            "b_saving_full_over_adapters": median_ratio("full", "adapters"),
            "c_mixing_adapters_over_base": median_ratio("adapters", "base"),
            "memory": {
                r["system"]: {
                    "peak_above_baseline_mb": r["peak_above_baseline_mb"],
                    "held_mb": r["held_mb"],
                    "peak_over_held": r["peak_over_held"],
                }
                for r in memory
                if r["concurrency"] == c
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100m", choices=sorted(SIZES))
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the systems")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/mpo-bench-adapters"))
    parser.add_argument("--out", type=Path, default=scratch("adapters.json"))
    parser.add_argument(
        "--worker", choices=["timing", "adapters", "full", "base"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if args.worker:
        set_threads(args.threads)
        rows = timing_worker(args) if args.worker == "timing" else memory_worker(args)
        print(json.dumps(rows))
        return 0
    result = run(args)
    result["meta"] = {
        "command": "python -m bench.adapters "
        + " ".join(argv if argv is not None else sys.argv[1:])
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
