"""What ``mpo eval`` does, from its parsed flags to the written report.

1. The family: ``--config``, or ``--demo`` (built or found under ``home``), whose
   defaults are the demo's held-out prompts, its scorers as rewards, a fit on its
   training prompts for the ``fitted`` row and a Pareto sweep of polite against concise.
2. A fit, only when a row needs ``fitted`` (``run_fit`` on the fit prompts).
3. The rows, the rewards, ``run_evaluation`` with a progress bar, ``write_report``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import load_config
from ..engine.core import Engine, EngineLimits
from ..errors import InvalidParameter
from ..fitting.driver import FitOptions, run_fit
from ..fitting.rewards import Objective, align_policies, builtin_objectives, load_rewards
from ..runners import load_policy_set
from .inputs import load_prompts
from .render import write_report
from .rows import REWARD_FIT_ROW, ProfileLookup, RowParser, split_specs
from .run import EvalOptions, EvalReport, run_evaluation

logger = logging.getLogger(__name__)

DEMO_ROWS = "fitted,fitted:rewards,uniform,single,soup,reference"
DEMO_COMPARE = "uniform"
DEFAULT_ROWS = "uniform,single,reference"
DEMO_PARETO = "polite,concise"


def _tqdm_progress() -> tuple[Any, Callable[[str, float], None]]:
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", desc="eval", file=sys.stderr)

    def progress(phase: str, fraction: float) -> None:
        bar.set_description(phase)
        bar.n = round(100 * fraction)
        bar.refresh()

    return bar, progress


def _inputs(args: argparse.Namespace, home: Path | None) -> dict[str, Any]:
    """Family YAML, prompts, fit prompts and objective loader for the flags (demo defaults)."""
    if args.demo:
        from ..demo import build_demo, heldout_prompts, train_prompts

        config_path = build_demo(home=home, variant=args.demo_variant)  # the served demo (seed 0)
        prompts = [p.text for p in heldout_prompts()]
        fit_prompts: list[str] | None = [p.text for p in train_prompts()]
    else:
        if args.prompts is None or args.rewards is None:
            raise InvalidParameter("prompts", "--prompts and --rewards are needed with --config")
        config_path, prompts, fit_prompts = args.config, [], None
    if args.prompts is not None:
        prompts = load_prompts(args.prompts)
    if args.fit_prompts is not None:
        fit_prompts = load_prompts(args.fit_prompts)
    return {"config": config_path, "prompts": prompts, "fit_prompts": fit_prompts}


def _objectives(args: argparse.Namespace, device: torch.device) -> dict[str, Objective]:
    if args.rewards is not None:
        return load_rewards(args.rewards, device)
    return builtin_objectives()  # --demo without --rewards


def _fit(engine: Engine, prompts: list[str], args: argparse.Namespace) -> dict[str, float]:
    options = FitOptions(
        samples_per_prompt=args.fit_samples,
        max_new_tokens=args.fit_max_new_tokens,
        iterations=args.fit_iterations,
        seed=args.seed,
    )
    bar, progress = _tqdm_progress()
    with bar:
        report = run_fit(engine, prompts, options, progress=progress)
    logger.info("fitted weights %s (F = %.4f)", report.weights, report.objective)
    return dict(report.weights)


def _reward_fit(
    engine: Engine, prompts: list[str], objectives: dict[str, Objective], args: argparse.Namespace
) -> tuple[dict[str, float], float, dict[str, Any]]:
    from ..fitting.reward_driver import RewardFitDriverOptions, run_reward_fit

    options = RewardFitDriverOptions(
        reference_samples=args.fit_reference_samples,
        samples_per_round=args.fit_samples,
        rounds=args.fit_rounds,
        max_new_tokens=args.fit_max_new_tokens,
        kl_coef=args.fit_kl_coef,
        fit_strength=args.fit_strength,
        seed=args.seed,
    )
    bar, progress = _tqdm_progress()
    with bar:
        report = run_reward_fit(engine, prompts, objectives, options, progress=progress)
    logger.info("reward-fitted weights %s, strength %.3f", report.weights, report.strength)
    return dict(report.weights), report.strength, report.to_dict()


def run_eval_command(
    args: argparse.Namespace, home: Path | None, profiles: ProfileLookup | None
) -> tuple[EvalReport, list[Path]]:
    """Run ``mpo eval`` for parsed ``args``; returns the report and the files written."""
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    given = _inputs(args, home)
    specs = split_specs(args.rows or [DEMO_ROWS if args.demo else DEFAULT_ROWS])
    pareto_flag = args.pareto or (DEMO_PARETO if args.demo else None)
    if pareto_flag == "none":
        pareto_flag = None
    pareto = tuple(p.strip() for p in pareto_flag.split(",")) if pareto_flag else None
    if pareto is not None and len(pareto) != 2:
        raise InvalidParameter("pareto", f"--pareto takes two objectives A,B, got {pareto_flag!r}")
    options = EvalOptions(
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        bootstrap=args.bootstrap,
        baseline=args.baseline,
        pareto=pareto,  # type: ignore[arg-type]  # checked: two names
        pareto_points=args.pareto_points,
        examples=args.examples,
        compare=tuple(
            spec
            for spec in split_specs(args.compare or ([DEMO_COMPARE] if args.demo else []))
            if spec != "none"  # --compare none: no paired table (the demo's default off)
        ),
    ).validate()

    policy_set = load_policy_set(load_config(given["config"]))
    objectives = _objectives(args, policy_set.device)
    align_policies(objectives, policy_set.names)
    limits = EngineLimits(max_running=args.max_running, max_queued=1 << 20)
    with Engine(policy_set, limits) as engine:
        fitted, reward_fit, reward_report = None, None, None
        fit_seconds: dict[str, float] = {}
        if any(s in ("fitted", "soup:fitted") for s in specs) and given["fit_prompts"]:
            fit_started = time.monotonic()
            fitted = _fit(engine, given["fit_prompts"], args)
            fit_seconds["fit"] = time.monotonic() - fit_started
        if REWARD_FIT_ROW in specs and given["fit_prompts"]:
            fit_started = time.monotonic()
            weights, strength, reward_report = _reward_fit(
                engine, given["fit_prompts"], objectives, args
            )
            reward_fit = (weights, strength)
            fit_seconds["reward_fit"] = time.monotonic() - fit_started
        parser = RowParser(policy_set.names, engine.has_reference, profiles, fitted, reward_fit)
        rows = parser.parse(specs)
        bar, progress = _tqdm_progress()
        with bar:
            report = run_evaluation(
                engine, given["prompts"], objectives, rows, options, progress=progress
            )
    report.seconds.update(fit_seconds)
    report.seconds["total"] = time.monotonic() - started
    report.meta.update(
        {
            "flags": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if k not in ("handler", "command")
            },
            "family": str(given["config"]),
            "policies": {
                spec.name: getattr(spec, "model", None) or getattr(spec, "adapter", None)
                for spec in policy_set.config.policies
            },
            "reference": policy_set.reference_name,
            "device": str(policy_set.device),
            "dtype": str(policy_set.dtype),
            "rows": specs,
            "fitted_weights": fitted,
            "reward_fit": reward_report,
            "fit": None
            if fitted is None
            else {
                "prompts": len(given["fit_prompts"]),
                "samples_per_prompt": args.fit_samples,
                "max_new_tokens": args.fit_max_new_tokens,
                "iterations": args.fit_iterations,
            },
        }
    )
    return report, write_report(report, args.out, args.name)
