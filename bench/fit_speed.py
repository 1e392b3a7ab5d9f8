"""How long a demo refit takes: the old sampling rule against the new, interleaved in one run.

The refit is ``run_fit`` with the options of ``python -m bench.fit_demo`` (docs/fitting.md):
the demo's 156 training prompts, 16 reference replies each of at most 48 tokens, 2000
mirror-descent steps. The two sides differ only in how many replies are in flight:

- ``old``: an engine of 64 slots (what ``bench.fit_demo`` used) and at most half of them
  for the fit, the rule before the fit took the whole batch on an idle engine;
- ``new``: an engine of 256 slots, all of them for the fit while nobody else decodes.

Runs alternate (old, new, new, old, ...) so that load from other work on the machine falls
on both; the JSON keeps every run and the medians::

    python -m bench.fit_speed --repeats 2 --out bench/results/fit_speed.json
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

from bench.common import scratch
from bench.demo_eval import run_meta, write_json
from mpo_core.config import load_config
from mpo_core.demo import build_demo, train_prompts
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.fitting import driver as fit_driver
from mpo_core.fitting.driver import FitOptions, run_fit
from mpo_core.runners import load_policy_set

logger = logging.getLogger("fit_speed")

SIDES = {"old": (64, True), "new": (256, False)}  # max_running, half the slots only


def one_run(policy_set, prompts: list[str], options: FitOptions, side: str) -> dict:
    max_running, half = SIDES[side]
    limits = EngineLimits(max_running=max_running, max_queued=max(64, max_running))

    def old_window(engine: Engine, own: int) -> int:
        return max(1, engine.limits.max_running // 2)

    patch = mock.patch.object(fit_driver, "sampling_window", old_window) if half else None
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with Engine(policy_set, limits) as engine:
        if patch is not None:
            with patch:
                report = run_fit(engine, prompts, options)
        else:
            report = run_fit(engine, prompts, options)
    total = time.perf_counter() - started
    logger.info("%s: %.1f s %s", side, total, report.seconds)
    timings = {f"{k}_s": v for k, v in report.seconds.items()}
    load = [load_before, os.getloadavg()[0]]  # 1-minute load average before and after
    return {
        "side": side,
        "total_s": total,
        **timings,
        "weights": report.weights,
        "load_average": load,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per side")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=scratch("fit_speed.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    meta = run_meta("-m bench.fit_speed", argv, args)
    config = load_config(build_demo())
    config.device, config.dtype = "cpu", "float32"
    policy_set = load_policy_set(config)
    prompts = [p.text for p in train_prompts()]
    options = FitOptions(samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                         iterations=args.iterations, seed=0)  # fmt: skip
    order = [("old", "new") if i % 2 == 0 else ("new", "old") for i in range(args.repeats)]
    runs = [one_run(policy_set, prompts, options, side) for pair in order for side in pair]
    medians = {
        side: {key: statistics.median(r[key] for r in runs if r["side"] == side)
               for key in ("total_s", "sampling_s", "scoring_s", "optimising_s")}
        for side in SIDES
    }  # fmt: skip
    ratio = medians["old"]["total_s"] / medians["new"]["total_s"]
    write_json(args.out, {"meta": meta, "runs": runs, "medians": medians, "speedup": ratio})
    sys.stdout.write(
        f"median refit: old {medians['old']['total_s']:.1f} s, "
        f"new {medians['new']['total_s']:.1f} s "
        f"(x{ratio:.2f}); sampling old {medians['old']['sampling_s']:.1f} s, "
        f"new {medians['new']['sampling_s']:.1f} s\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
