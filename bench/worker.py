"""One benchmark process: one size, mode, K and run, over a list of concurrencies.

``bench.run`` starts a fresh one per (mode, K, run) so that peak RSS belongs to that
configuration alone; within it the peak is reset (``/proc/self/clear_refs``) before each
concurrency. Prints the result rows as one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import (
    Row,
    family_yaml,
    param_mb,
    peak_rss_mb,
    prompt_ids,
    prompt_texts,
    reset_peak_rss,
    rss_mb,
    set_threads,
    summarize,
)

logger = logging.getLogger("bench.worker")
WARMUP_TOKENS = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", required=True)
    parser.add_argument("--mode", required=True, choices=["single", "diy-mix", "engine", "http"])
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--run", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument(
        "--overhead-pairs",
        type=int,
        default=3,
        help="engine c=1: extra (engine run, bare step time) pairs for target 1",
    )
    parser.add_argument(
        "--diy-requests",
        type=int,
        default=0,
        help="diy-mix serves at most this many of the c requests (0 = all); it serves them "
        "one by one, so its tokens/s does not depend on how many",
    )
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> Any:
    import yaml

    from mpo_core.config import load_config
    from mpo_core.runners import load_policy_set

    path = family_yaml(args.size, args.k, args.models_dir)
    raw = yaml.safe_load(path.read_text())
    raw.update(device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype)
    name = f"policies_k{args.k}_{args.device}_{args.dtype}_kv-{args.kv_cache_dtype}.yaml"
    path = path.with_name(name)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, load_policy_set(load_config(path))


def measure(args: argparse.Namespace, concurrency: int, runner: Any, extra: Any) -> dict[str, Any]:
    """Warm up, reset the peak RSS, run ``runner(c)``, summarise."""
    runner(1, WARMUP_TOKENS)
    reset_peak_rss(runner.pid)
    requests, start, end = runner(concurrency, args.new_tokens)
    fields = summarize(requests, start, end)
    fields["peak_rss_mb"] = peak_rss_mb(runner.pid)
    fields["extra"] = {"first_tokens": requests[0].token_ids, **extra(concurrency)}
    if runner.pid == "self":
        fields["extra"]["load_peak_rss_mb"] = runner.load_peak
    return fields


class _Runner:
    def __init__(self, fn: Any, pid: int | str = "self", load_peak: float = 0.0) -> None:
        self.fn, self.pid, self.load_peak = fn, pid, load_peak

    def __call__(self, concurrency: int, new_tokens: int) -> Any:
        return self.fn(concurrency, new_tokens)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    set_threads(args.threads)
    import torch  # noqa: F401  (the baseline RSS includes torch, transformers and mpo_core)
    import transformers  # noqa: F401

    from . import baselines, systems

    baseline = rss_mb()
    path, policy_set = load(args)
    params = param_mb(policy_set.models)
    load_peak = peak_rss_mb()  # loading's own peak, before any measurement resets it
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    texts = prompt_texts(max(concurrencies))
    prompts = prompt_ids(policy_set.tokenizer, texts)
    no_extra: Any = lambda c: {}  # noqa: E731
    extra = no_extra
    server = None

    if args.mode == "single":
        runner = _Runner(
            lambda c, n: baselines.run_single(policy_set, prompts[:c], n), load_peak=load_peak
        )
    elif args.mode == "diy-mix":
        cap = args.diy_requests or max(concurrencies)
        runner = _Runner(
            lambda c, n: baselines.run_diy_mix(policy_set, prompts[: min(c, cap)], n),
            load_peak=load_peak,
        )
    elif args.mode == "engine":
        from mpo_core.engine.core import Engine, EngineLimits

        engine = Engine(policy_set, EngineLimits(max_running=max(concurrencies))).start()
        runner = _Runner(
            lambda c, n: systems.run_engine(engine, prompts[:c], n), load_peak=load_peak
        )

        def extra(c: int) -> dict[str, Any]:
            if c != 1:
                return {}
            steps = baselines.policy_step_seconds(policy_set, prompts[0], args.new_tokens)
            # Target 1 compares two timings taken one after the other; on a machine whose
            # speed drifts, alternate them a few times more and keep every pair.
            pairs = []
            for _ in range(args.overhead_pairs):
                single = summarize(*systems.run_engine(engine, prompts[:1], args.new_tokens))
                pair_steps = baselines.policy_step_seconds(policy_set, prompts[0], args.new_tokens)
                pairs.append(
                    {
                        "tokens_per_s": single["tokens_per_s"],
                        "itl_ms_p50": single["itl_ms_p50"],
                        "policy_step_s": pair_steps,
                    }
                )
            return {"policy_step_s": steps, "overhead_pairs": pairs}
    else:
        del policy_set  # the server loads its own copy; this process only sends requests
        home = Path(tempfile.mkdtemp(prefix="mpo-bench-"))
        server = systems.ServerProcess(path, home, args.threads, max(concurrencies)).__enter__()
        runner = _Runner(lambda c, n: systems.run_http(server.url, texts[:c], n), server.pid)
        baseline = float("nan")  # the server's own import-time RSS is not observable
    rows = []
    try:
        for c in concurrencies:
            fields = measure(args, c, runner, extra)
            row = Row(
                size=args.size,
                mode=args.mode,
                k=args.k,
                concurrency=c,
                run=args.run,
                baseline_rss_mb=baseline,
                param_mb=params,
                **fields,
            )
            logger.info("%s", row.as_dict())
            rows.append(row.as_dict())
    finally:
        if server is not None:
            server.__exit__()
        if args.mode == "engine":
            engine.stop()
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
