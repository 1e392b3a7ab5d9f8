"""Chunked prefill: a short request beside a long prompt, on the real persona family
(issue 31.2, docs/benchmarks.md "Chunked prefill").

    python -m bench.chunked_prefill --words 7000 --chunks 0,64,128 --threads 2 \
        --out bench/results/chunked_prefill.json

The engine alone (no HTTP) on the real demo's persona family (K = 3 personas of
SmolLM2-135M-Instruct, uniform weights, float32 on the CPU, ``--backend``), one engine
per ``prefill_chunk_tokens`` setting of ``--chunks`` (0: chunking off, the engine as it
was), all in one process and run. For each setting:

- ``short``: a chat request, 16 new tokens (greedy, EOS ignored), alone: the median of
  ``--rounds`` runs;
- ``long``: a ``--words``-word raw prompt, 1 new token, alone;
- ``beside``: the long prompt submitted, then at once the short request; each one's
  time from its own submit to its last event.

The targets (issue 31): the short request beside the long prompt within 10x its time
alone, and the long prompt beside it within 1.5x its own time alone, both in the same
setting; the long prompt's time alone against chunking off says what chunking itself
costs. The long prompt repeats a sentence of common words, about a token a word, so that
7,000 words fit SmolLM2's 8,192-token context (the demo's corpus takes 1.2 tokens a word).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

SENTENCE = "the old man and the young girl walk to the big house by the sea and they talk "
SHORT = [{"role": "user", "content": "Tell me about the sea in a few words."}]


def _engine_names() -> tuple[Any, ...]:
    from mpo_core.decoding.sampling import SamplingParams
    from mpo_core.engine import Engine, EngineLimits, GenerationRequest

    return Engine, EngineLimits, GenerationRequest, SamplingParams


def load_family(backend: str, folder: Path) -> Any:
    from mpo_core.config import load_config
    from mpo_core.demo.real import build_real_demo
    from mpo_core.runners import load_policy_set

    demo = yaml.safe_load(build_real_demo().read_text())
    demo.update(device="cpu", dtype="float32", backend=backend, speculative={"method": "off"})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"personas-{backend}.yaml"
    path.write_text(yaml.safe_dump(demo, sort_keys=False))
    return load_policy_set(load_config(path))


def long_prompt(tokenizer: Any, words: int) -> list[int]:
    text = (SENTENCE * (words // len(SENTENCE.split()) + 1)).split()[:words]
    return list(tokenizer.encode(" ".join(text)))


def timed(streams: dict[str, Any], started: dict[str, float]) -> dict[str, float]:
    """Each stream's seconds from its submit (``started``) to its last event, read on a
    thread of its own."""
    done: dict[str, float] = {}

    def read(name: str) -> None:
        events = list(streams[name])
        assert events, name
        done[name] = time.perf_counter() - started[name]

    threads = [threading.Thread(target=read, args=(name,)) for name in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done


def run_setting(ps: Any, chunk: int, long_ids: list[int], rounds: int) -> dict[str, Any]:
    engine_cls, limits_cls, request_cls, sampling_cls = _engine_names()
    tok = ps.tokenizer
    chat = tok.apply_chat_template(SHORT, tokenize=False, add_generation_prompt=True)
    short_ids = list(tok.encode(str(chat), add_special_tokens=False))  # as the chat route
    short_params = sampling_cls(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    long_params = sampling_cls(max_new_tokens=1, temperature=0.0, ignore_eos=True)
    limits = limits_cls(max_running=8, prefill_chunk_tokens=chunk)
    out: dict[str, Any] = {"prefill_chunk_tokens": chunk}
    with engine_cls(ps, limits) as engine:
        engine.generate(request_cls(short_ids, short_params))  # warm-up

        def submit(ids: list[int], params: Any, name: str, at: dict[str, float]) -> Any:
            at[name] = time.perf_counter()
            return engine.submit(request_cls(ids, params))

        alone = []
        for _ in range(rounds):
            at: dict[str, float] = {}
            alone.append(
                timed({"short": submit(short_ids, short_params, "short", at)}, at)["short"]
            )
        out["short_alone_s"] = statistics.median(alone)
        out["short_alone_runs_s"] = alone
        print(f"chunk {chunk}: short alone {alone}", file=sys.stderr, flush=True)
        at = {}
        out["long_alone_s"] = timed({"long": submit(long_ids, long_params, "long", at)}, at)["long"]
        print(f"chunk {chunk}: long alone {out['long_alone_s']:.1f}", file=sys.stderr, flush=True)
        at = {}
        streams = {"long": submit(long_ids, long_params, "long", at)}
        streams["short"] = submit(short_ids, short_params, "short", at)
        beside = timed(streams, at)
        out["short_beside_s"] = beside["short"]
        out["long_beside_s"] = beside["long"]
    out["short_ratio"] = out["short_beside_s"] / out["short_alone_s"]
    out["long_ratio"] = out["long_beside_s"] / out["long_alone_s"]
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=7000)
    parser.add_argument("--chunks", default="0,64,128", help="prefill_chunk_tokens settings")
    parser.add_argument("--rounds", type=int, default=3, help="runs of the short request alone")
    parser.add_argument("--backend", default="transformers", choices=["transformers", "llama.cpp"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/mpo-bench-chunked"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/chunked_prefill.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ps = load_family(args.backend, args.models_dir)
    long_ids = long_prompt(ps.tokenizer, args.words)
    settings = [run_setting(ps, int(c), long_ids, args.rounds) for c in args.chunks.split(",")]
    off = next((s for s in settings if s["prefill_chunk_tokens"] == 0), None)
    for setting in settings:
        if off is not None:  # what chunking itself costs the long prompt
            setting["long_alone_vs_off"] = setting["long_alone_s"] / off["long_alone_s"]
        setting["meets_targets"] = setting["short_ratio"] <= 10 and setting["long_ratio"] <= 1.5
    result = {
        "meta": {
            "argv": argv if argv is not None else sys.argv[1:],
            "date": time.strftime("%Y-%m-%d"),
            "words": args.words,
            "long_prompt_tokens": len(long_ids),
            "backend": args.backend,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "targets": {"short_ratio": 10, "long_ratio": 1.5},
        },
        "settings": settings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
