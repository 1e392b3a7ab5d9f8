"""Fit MPO weights on the demo family and show what they do (the table of docs/fitting.md).

1. ``run_fit`` on the demo's training prompts: replies sampled from the reference,
   scored under every policy, mirror descent on the implicit rewards ``R``.
2. The report: for each single policy, uniform and the fitted weights, every
   objective's expected implicit reward under that mixture, their minimum, and the
   regularised MaxMin value ``min_k E[R_k] - KL(pi_lam || pi_ref)``.
3. The demo scorers on replies decoded with each row's weights on the held-out prompts:
   ``mpo_core.evaluation`` (what ``mpo eval --demo`` runs), with about ``--n`` replies
   per row (``--n / 24`` per prompt, the same seeds in every row).

    python -m bench.fit_demo --n 200 --seed 0      # writes bench/out/fit_demo.json

Both tables go to stdout; ``--out`` gets the same figures as JSON: the fit report
(``FitReport.to_dict()``), the evaluation (``EvalReport.to_dict()``) and the run's settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from bench.common import scratch
from bench.demo_eval import run_meta, write_json
from bench.render_tables import fit_report
from mpo_core.config import load_config
from mpo_core.demo import build_demo, heldout_prompts, train_prompts
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.evaluation import EvalOptions, RowParser, markdown, run_evaluation
from mpo_core.fitting.driver import FitOptions, FitReport, run_fit
from mpo_core.fitting.rewards import builtin_objectives
from mpo_core.runners import load_policy_set

logger = logging.getLogger("fit_demo")


def report_markdown(report: FitReport) -> str:
    return fit_report(report.to_dict())  # the table docs/fitting.md renders from the JSON


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="decoded replies per row")
    parser.add_argument("--seed", type=int, default=0, help="demo seed, fit seed, sampling seed")
    parser.add_argument("--samples", type=int, default=16, help="reference replies per prompt")
    parser.add_argument("--iterations", type=int, default=2000, help="mirror-descent steps")
    parser.add_argument("--home", default=None, help="MPO_HOME override")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--examples", type=int, default=2, help="example replies per row")
    parser.add_argument("--variant", default="full", help="demo variant (full or small)")
    parser.add_argument("--out", type=Path, default=scratch("fit_demo.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    meta = run_meta("-m bench.fit_demo", argv, args)
    run_started = time.perf_counter()
    config = load_config(build_demo(home=args.home, variant=args.variant, seed=args.seed))
    config.device, config.dtype = "cpu", "float32"  # the documented numbers are CPU float32
    policy_set = load_policy_set(config)
    options = FitOptions(
        samples_per_prompt=args.samples,
        max_new_tokens=args.max_new_tokens,
        iterations=args.iterations,
        seed=args.seed,
    )
    limits = EngineLimits(max_running=256, max_queued=max(256, args.n))  # the fit: whole batch
    with Engine(policy_set, limits) as engine:
        started = time.perf_counter()
        report = run_fit(engine, [p.text for p in train_prompts()], options)
        logger.info("fit done in %.1f s", time.perf_counter() - started)
        parser = RowParser(policy_set.names, engine.has_reference, fitted=report.weights)
        rows = parser.parse(["single", "uniform", "fitted"])
        prompts = [p.text for p in heldout_prompts()]
        options = EvalOptions(
            samples=max(1, round(args.n / len(prompts))),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            examples=args.examples,
        )
        evaluation = run_evaluation(engine, prompts, builtin_objectives(), rows, options)
    meta["elapsed_s"] = round(time.perf_counter() - run_started, 1)
    payload = {"meta": meta, "report": report.to_dict(), "evaluation": evaluation.to_dict()}
    write_json(args.out, payload)
    sys.stdout.write("## Fit report (implicit rewards)\n\n" + report_markdown(report) + "\n\n")
    sys.stdout.write("## Demo scorers on decoded replies\n\n" + markdown(evaluation) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
