"""Where the engine's peak RSS comes from: RSS and peak around every cache operation.

    python -m bench.memory_probe --size 100m --k 3 --kv-cache-dtype float16 [--no-trim]

Loads the benchmark family in this process, warms the engine up with one short request,
resets the peak (``/proc/self/clear_refs``), then runs ``--concurrency`` greedy requests
of ``--new-tokens`` tokens together, as ``bench.worker``'s engine mode does, while
recording RSS before and after, and the rise of the peak during, every
``GrowingBatch.prefill``/``decode``/``keep``. Prints target 4's ratio and the operations
that raised the peak most. ``--no-trim`` turns off the ``malloc_trim`` after cache
surgery, to see what it saves; otherwise its calls are timed. glibc's heap layout
varies from run to run: compare a few runs, not one.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from .common import (
    param_mb,
    peak_rss_mb,
    prompt_ids,
    prompt_texts,
    reset_peak_rss,
    rss_mb,
    set_threads,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100m")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-trim", action="store_true")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/mpo-bench-models"))
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    import torch  # noqa: F401  (the baseline includes torch, transformers and mpo_core)
    import transformers  # noqa: F401

    import mpo_core.models.kvcache as kvcache
    from mpo_core.engine.core import Engine, EngineLimits

    from . import systems, worker

    baseline = rss_mb()
    worker_args = worker.parse_args(
        ["--size", args.size, "--mode", "engine", "--k", str(args.k)]
        + ["--models-dir", str(args.models_dir), "--kv-cache-dtype", args.kv_cache_dtype]
    )
    _, policy_set = worker.load(worker_args)
    params = param_mb(policy_set.models)
    trim_seconds: list[float] = []
    if args.no_trim:
        kvcache.release_free_memory = lambda: None  # type: ignore[assignment]
    else:
        release = kvcache.release_free_memory

        def timed_release() -> None:
            start = time.perf_counter()
            release()
            trim_seconds.append(time.perf_counter() - start)

        kvcache.release_free_memory = timed_release  # type: ignore[assignment]

    log: list[tuple[str, str, float, float, float]] = []  # op, model, rss before/after, rise

    def recorded(name: str) -> None:
        method = getattr(kvcache.GrowingBatch, name)

        def wrapper(self: Any, *a: Any, **kw: Any) -> Any:
            before, peak = rss_mb(), peak_rss_mb()
            out = method(self, *a, **kw)
            log.append((name, self.loaded.name, before, rss_mb(), peak_rss_mb() - peak))
            return out

        setattr(kvcache.GrowingBatch, name, wrapper)

    for name in ("prefill", "decode", "keep"):
        recorded(name)
    prompts = prompt_ids(policy_set.tokenizer, prompt_texts(args.concurrency))
    with Engine(policy_set, EngineLimits(max_running=args.concurrency)) as engine:
        systems.run_engine(engine, prompts[:1], 4)
        log.clear()
        at_reset = rss_mb()
        reset_peak_rss()
        systems.run_engine(engine, prompts, args.new_tokens)
        peak = peak_rss_mb()
    print(
        f"K={args.k} c={args.concurrency} kv_cache_dtype={args.kv_cache_dtype} "
        f"trim={'off' if args.no_trim else 'on'}: baseline {baseline:.0f} MiB, params "
        f"{params:.0f} MiB, at reset {at_reset:.0f} MiB, peak {peak:.0f} MiB, "
        f"(peak - baseline) / params = {(peak - baseline) / params:.3f}"
    )
    if trim_seconds:
        print(
            f"malloc_trim: {len(trim_seconds)} calls, median "
            f"{1000 * statistics.median(trim_seconds):.2f} ms, "
            f"max {1000 * max(trim_seconds):.2f} ms"
        )
    print("| op # | operation | model | RSS before MiB | RSS after MiB | peak rise MiB |")
    print("|--:|---|---|--:|--:|--:|")
    ranked = sorted(range(len(log)), key=lambda i: -log[i][4])[: args.top]
    for i in sorted(ranked):
        op, model, before, after, rise = log[i]
        print(f"| {i} | {op} | {model} | {before:.0f} | {after:.0f} | {rise:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
