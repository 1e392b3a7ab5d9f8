"""The engine's step time with the reply text made on the engine thread or by the readers.

    python -m bench.detok_step --baseline REV [--size tiny] [--k 3] [--batch 16]
        [--new-tokens 64] [--rounds 6] [--out bench/results/detok_step.json]

``REV`` is a commit whose engine still detokenises and matches stop strings on its own
thread; the working tree's engine leaves both to each stream's reader
(``detokenize.ReplyReader``, on the thread that reads the stream). Both sides run the
same workload in their own process, interleaved round by round (the order alternates):
``--batch`` greedy requests of ``--new-tokens`` tokens with two stop strings that never
match (so the matching runs on every token), read by one asyncio event loop as the
server reads them. A step's time is the interval between two consecutive steps' observer
calls while the whole batch decodes. Prints the median step time per side, their ratio,
and checks that both sides produced the same text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STOPS = ["<never-one>", "<never-two>"]
TEXTS = [
    "Could you please help me write a short poem about the sea?",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 and symbols like ! ? , . : ; - work too.",
    "Thank you so much, that was very kind of you.",
]


def worker(config: str, batch: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    """One side's measurement, in a process whose PYTHONPATH selects its ``mpo_core``."""
    import asyncio

    import torch

    import mpo_core
    from mpo_core.config import load_config
    from mpo_core.decoding.sampling import SamplingParams
    from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
    from mpo_core.runners import load_policy_set

    torch.set_num_threads(1)

    class Clock:
        def __init__(self) -> None:
            self.stamps: list[tuple[float, int]] = []

        def on_step(self, batch_size: int, forward_seconds: dict[str, float]) -> None:
            self.stamps.append((time.perf_counter(), batch_size))

    policy_set = load_policy_set(load_config(config))
    tok = policy_set.tokenizer
    prompts = [tok.encode(f"Request {i}: {TEXTS[i % len(TEXTS)]}") for i in range(batch)]
    clock = Clock()
    engine = Engine(policy_set, EngineLimits(max_running=batch, max_queued=batch), clock)
    engine.start()
    sampling = SamplingParams(new_tokens, temperature=0, ignore_eos=True, stop=list(STOPS))

    async def run_once() -> list[str]:
        streams = [engine.submit(GenerationRequest(p, sampling)) for p in prompts]

        async def read(stream: Any) -> str:
            return "".join([event.text async for event in stream])

        return list(await asyncio.gather(*(read(s) for s in streams)))

    asyncio.run(run_once())  # warm-up: allocations, token-text cache
    steps: list[float] = []
    texts: list[str] = []
    for _ in range(repeats):
        clock.stamps.clear()
        texts = asyncio.run(run_once())
        full = [t for t, size in clock.stamps if size == batch]
        steps += [b - a for a, b in zip(full[1:], full[2:])]  # after the prefill step
    engine.stop()
    return {
        "mpo_core": str(Path(mpo_core.__file__).resolve().parent),
        "step_ms": statistics.median(steps) * 1000,
        "steps": len(steps),
        "text_sha": hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16],
    }


def export_tree(rev: str, into: Path) -> Path:
    """``mpo_core`` as it was at ``rev``, under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "mpo_core"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_side(tree: Path, args: argparse.Namespace, config: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--worker", str(config)]
    command += ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
    command += ["--repeats", str(args.repeats)]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["mpo_core"]) != (tree / "mpo_core").resolve():
        raise RuntimeError(f"the worker imported {result['mpo_core']}, not {tree}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a commit that detokenises on the engine thread")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="batches per side and round")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.new_tokens, args.repeats)))
        return 0
    if not args.baseline:
        parser.error("--baseline REV is required")
    from bench.common import family_yaml

    with tempfile.TemporaryDirectory(prefix="detok_step_") as tmp:
        config = family_yaml(args.size, args.k, Path(tmp) / "family")
        trees = {"before": export_tree(args.baseline, Path(tmp) / "baseline"), "after": REPO}
        runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        for round_ in range(args.rounds):
            order = ["before", "after"] if round_ % 2 == 0 else ["after", "before"]
            for side in order:
                runs[side].append(run_side(trees[side], args, config))
                print(f"round {round_} {side}: {runs[side][-1]['step_ms']:.3f} ms", flush=True)
    medians = {side: statistics.median(r["step_ms"] for r in rs) for side, rs in runs.items()}
    same = {r["text_sha"] for rs in runs.values() for r in rs}
    summary = {
        "baseline": args.baseline,
        "size": args.size,
        "k": args.k,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "median_step_ms": medians,
        "ratio_after_over_before": medians["after"] / medians["before"],
        "same_text": len(same) == 1,
        "runs": runs,
    }
    print(
        f"median step: before {medians['before']:.3f} ms, after {medians['after']:.3f} ms, "
        f"after/before {summary['ratio_after_over_before']:.3f}; same text: {len(same) == 1}"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if len(same) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
