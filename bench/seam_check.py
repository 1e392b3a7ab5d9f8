"""Decode speed of one checkout's engine on the real demo's model, for comparing two
commits in one run (the backend seam's no-slowdown check, docs/benchmarks.md).

    python -m bench.seam_check --before /tmp/mpo-before --rounds 3 --threads 2 \
        --out bench/results/seam_check.json

``--before`` is a checkout of the earlier commit (``git worktree add /tmp/mpo-before
<commit>``), ``--after`` one of the later (default: this checkout, uncommitted edits
included). Each round runs this checkout's worker and the earlier one's, one after the
other (who goes first alternates between rounds, so an order effect cancels), each in a
fresh process that times the engine alone (no HTTP) on: the real demo's
persona family (K = 3 personas of SmolLM2-135M-Instruct, uniform weights) and one plain
model, at concurrency 1 and 8, greedy, ``--new-tokens`` tokens a request (EOS ignored);
a worker's figure is the median of ``--repeats`` timed runs after one warm-up.
A ratio is the median over rounds of that round's tokens/s ratio (this checkout over the
earlier one). The worker imports what both layouts name, so the same file runs in either.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

WORKLOADS = [("personas", 1), ("personas", 8), ("single", 1), ("single", 8)]


def _imports() -> tuple[Any, ...]:
    """The engine's names in either layout (mpo_core flat, or in subpackages)."""
    try:
        from mpo_core.decoding.sampling import SamplingParams
        from mpo_core.engine import Engine, EngineLimits, GenerationRequest
        from mpo_core.runners import load_policy_set
    except ImportError:
        from mpo_core.policies import load_policy_set  # type: ignore
        from mpo_core.sampling import SamplingParams  # type: ignore

        from mpo_core.engine import Engine, EngineLimits, GenerationRequest  # type: ignore
    from mpo_core.config import load_config

    return Engine, EngineLimits, GenerationRequest, SamplingParams, load_policy_set, load_config


def worker(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from mpo_core.demo.real import REFERENCE, build_real_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    engine_cls, limits_cls, request_cls, sampling_cls, load_policy_set, load_config = _imports()
    demo = yaml.safe_load(build_real_demo().read_text())
    common = {"device": "cpu", "dtype": "float32", "speculative": {"method": "off"}}
    from mpo_core.config import PolicySetConfig

    if "backend" in PolicySetConfig.model_fields:  # a checkout with the llama.cpp backend:
        common["backend"] = "transformers"  # the seam's cost, not llama.cpp's speed
    single = {
        "served_name": "single",
        "policies": [{"name": REFERENCE, "model": demo["reference"]["model"]}],
    }
    folder = Path(args.models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, float] = {}
    for name, config in (("personas", demo | common), ("single", single | common)):
        if not any(w.startswith(f"{name}-") for w in args.workloads.split(",")):
            continue
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        policy_set = load_policy_set(load_config(path))
        tok = policy_set.tokenizer
        with engine_cls(policy_set, limits_cls(max_running=8)) as engine:
            for system, c in WORKLOADS:
                if system != name or f"{system}-c{c}" not in args.workloads.split(","):
                    continue
                prompts = [
                    tok.encode(f"Tell me about topic number {i} in a few words.") for i in range(c)
                ]
                sampling = sampling_cls(
                    max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True
                )
                engine.generate(request_cls(prompts[0], sampling))  # warm-up
                speeds = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    streams = [engine.submit(request_cls(p, sampling)) for p in prompts]
                    tokens = sum(len(list(s)) for s in streams)
                    speeds.append(tokens / (time.perf_counter() - started))
                out[f"{system}-c{c}"] = statistics.median(speeds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a checkout of the earlier commit")
    parser.add_argument(
        "--after", type=Path, help="a checkout of the later commit (default: this one)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs of each workload in a worker (median)"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(f"{s}-c{c}" for s, c in WORKLOADS),
        help="which of personas-c1, personas-c8, single-c1, single-c8 to time",
    )
    parser.add_argument("--models-dir", default="/tmp/mpo-bench-seam")
    parser.add_argument("--out", type=Path, default=Path("bench/out/seam_check.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.before is None:
        parser.error("--before: a checkout of the commit to compare against")
    command = [sys.executable, "-m", "bench.seam_check", "--worker", "--threads", str(args.threads),
               "--new-tokens", str(args.new_tokens), "--models-dir", args.models_dir,
               "--repeats", str(args.repeats), "--workloads", args.workloads]  # fmt: skip
    here = args.after or Path(__file__).resolve().parents[1]
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        row = {}
        sides = [("after", here), ("before", args.before)]
        for side, cwd in sides if r % 2 == 0 else sides[::-1]:  # alternate who runs first
            done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)
            row[side] = json.loads(done.stdout.strip().splitlines()[-1])
        rounds.append(row)
        print(f"round {r + 1}: {row}", file=sys.stderr)
    ratios = {
        key: statistics.median(r["after"][key] / r["before"][key] for r in rounds)
        for key in rounds[0]["after"]
    }
    result = {"rounds": rounds, "ratios": ratios, "meta": {"argv": argv or sys.argv[1:]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(ratios, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
