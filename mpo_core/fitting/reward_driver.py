"""Fitting the weights to reward functions, in rounds through the engine (docs/fitting.md).

``run_reward_fit`` drives a running :class:`~mpo_core.engine.Engine`:

0. ``m_ref`` replies per prompt from the reference: the baseline every win rate is counted
   against, and the first samples of the pool (their proposal is ``pi_ref``);
1. each round: fit on the pool (``mpo_core.reward_fit``), starting from the current mixture;
   then sample ``m`` replies per prompt from the mixture just fitted, score them under every
   policy and the reference (teacher forcing) and by every reward, and add them to the pool
   with their proposal's log-density (the engine's per-token log-probs, summed);
2. stop when a refit moves the weights (and strength) by less than ``tolerance`` (L1), or when
   ``rounds`` mixtures have been sampled; a last fit on the whole pool gives the answer;
3. the report: every round's weights and estimates, and for the fitted mixture, uniform, each
   single policy and the reference, the estimated win rates, KL and ESS on the final pool.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..decoding.mixing import Mixture
from ..engine.core import Engine
from ..errors import InvalidParameter
from .driver import (
    CancelCheck,
    Progress,
    Reply,
    _check_positive_int,
    _check_prompts,
    encode_prompt,
    sample_mixture,
)
from .mirror_descent import FitCancelled
from .reward_fit import (
    RewardFitOptions,
    ScoredPool,
    estimate,
    fit_reward_weights,
    win_utilities,
)
from .rewards import Objective

logger = logging.getLogger(__name__)

_SCORE_PARTS = 8  # teacher-forced scoring of a round is split into this many calls


@dataclass
class RewardFitDriverOptions:
    """One reward fit's parameters; ``validate`` names the first bad field."""

    reference_samples: int = 8  # m_ref: reference replies per prompt (the win-rate baseline)
    samples_per_round: int = 4  # m: replies per prompt from each round's mixture
    rounds: int = 2  # most mixtures sampled
    tolerance: float = 0.02  # stop when a refit moves (weights, strength) less than this (L1)
    max_new_tokens: int = 32
    kl_coef: float = 0.02  # beta, in win rate per nat
    fit_strength: bool = False
    max_strength: float = 2.0
    min_ess_fraction: float = 0.2
    iterations: int = 200  # ascent steps per refit
    seed: int = 0
    # "decoded": the per-token mixture the engine decodes, to first order around each round's
    # mixture (needs K separate models: mpo_core/runners/moments.py); "sequence": pi_theta
    target: str = "decoded"

    def validate(self) -> RewardFitDriverOptions:
        for name in (
            "reference_samples",
            "samples_per_round",
            "max_new_tokens",
            "iterations",
        ):
            _check_positive_int(name, getattr(self, name))
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise InvalidParameter("rounds", f"rounds must be an integer >= 0, got {self.rounds!r}")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise InvalidParameter("tolerance", f"tolerance must be >= 0, got {self.tolerance!r}")
        if not (math.isfinite(self.max_strength) and self.max_strength > 0):
            raise InvalidParameter("max_strength", "max_strength must be finite and > 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidParameter("seed", f"seed must be an integer >= 0, got {self.seed!r}")
        if self.target not in ("decoded", "sequence"):
            raise InvalidParameter(
                "target", f"target must be decoded or sequence, got {self.target!r}"
            )
        self.inner().validate()
        return self

    def inner(self) -> RewardFitOptions:
        return RewardFitOptions(
            kl_coef=self.kl_coef,
            fit_strength=self.fit_strength,
            strength_bounds=(0.0, self.max_strength),
            min_ess_fraction=self.min_ess_fraction,
            iterations=self.iterations,
        )


@dataclass
class RewardFitReport:
    """What a reward fit found, JSON-ready through ``to_dict``."""

    weights: dict[str, float]
    strength: float
    policy_names: list[str]
    objectives: dict[str, str]  # name -> reward source
    rows: dict[str, dict[str, Any]]  # fitted, uniform, policy:<name>, reference -> estimate
    chosen: str  # the last fit's point: "iterate", or the candidate it estimated better
    rounds: list[dict[str, Any]]
    stopped: str  # "tolerance" or "rounds"
    target: str  # "decoded" (per-token mixture, first order) or "sequence" (pi_theta)
    num_prompts: int
    options: dict[str, Any]
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Pool:
    """The scored samples so far, with the reference rewards every utility is counted against."""

    def __init__(self, reference_rewards: torch.Tensor) -> None:
        self.reference_rewards = reference_rewards  # [N, m_ref, J]
        self.pool: ScoredPool | None = None

    def add(self, scored: Scored, from_reference: bool = False) -> None:
        """Append a round; ``from_reference``: its replies are the reference's own draws."""
        utilities = win_utilities(scored.rewards, self.reference_rewards)  # [N, n, J]
        drawn = int(utilities.shape[1]) if from_reference else 0
        part = ScoredPool(scored.ratios, scored.reference, scored.proposal, utilities,
                          scored.moments, scored.coefficients, from_reference=drawn)  # fmt: skip
        self.pool = part if self.pool is None else self.pool.extend(part)


@dataclass
class Scored:
    """One round's samples, scored."""

    ratios: torch.Tensor  # [N, m, K] R
    reference: torch.Tensor  # [N, m] log pi_ref
    proposal: torch.Tensor  # [N, m] log q (the engine's per-token log-probs, summed)
    rewards: torch.Tensor  # [N, m, J]
    moments: torch.Tensor | None  # [N, m, K] M (decoded target) or None
    coefficients: torch.Tensor | None  # [N, m, K] theta_r of the round's mixture, or None


def run_reward_fit(
    engine: Engine,
    prompts: list[str],
    objectives: Mapping[str, Objective],
    options: RewardFitDriverOptions,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> RewardFitReport:
    """Fit (weights, strength) to ``objectives`` in rounds; raises FitCancelled when asked."""
    options.validate()
    if not engine.has_reference:
        raise InvalidParameter(
            "reference",
            "a reward fit counts win rates against the reference and this policy set has none: "
            "add `reference:` to the policy-set config",
        )
    _check_prompts(prompts)
    if not objectives:
        raise InvalidParameter("rewards", "no objectives: give at least one reward")
    report_progress: Progress = progress or (lambda phase, fraction: None)
    cancelled: CancelCheck = should_cancel or (lambda: False)
    names = list(engine.policy_names)
    seconds = {"sampling": 0.0, "scoring": 0.0, "optimising": 0.0}
    seeds = random.Random(options.seed)
    prompt_ids = [encode_prompt(engine.tokenizer, p) for p in prompts]
    sampler = RoundSampler(engine, prompts, prompt_ids, objectives, options, seeds, seconds)

    reference = engine.mixture(strength=0.0)
    first = sampler.round(reference, options.reference_samples, "fit-ref", report_progress,
                          cancelled)  # fmt: skip
    pool = _Pool(first.rewards)
    pool.add(first, from_reference=True)
    lam = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
    strength, rounds, stopped = 1.0, [], "rounds"
    chosen, note = "iterate", ""
    for number in range(options.rounds + 1):
        assert pool.pool is not None
        started = time.monotonic()
        result = fit_reward_weights(pool.pool, lam, strength, options.inner(),
                                    on_step=_cancel_check(cancelled))  # fmt: skip
        seconds["optimising"] += time.monotonic() - started
        report_progress("optimising", (number + 1) / (options.rounds + 1))
        move = float((result.weights - lam).abs().sum()) + abs(result.strength - strength)
        rounds.append(_round_record(number, result, move, pool.pool, names, objectives))
        chosen, note = _chosen(result.chosen, result.note, names)
        lam, strength = result.weights, result.strength
        if number > 0 and move < options.tolerance:
            stopped = "tolerance"
            break
        if number == options.rounds:
            break
        mixture = engine.mixture(dict(zip(names, lam.tolist())), strength)
        part = sampler.round(mixture, options.samples_per_round, f"fit-r{number + 1}",
                             report_progress, cancelled)  # fmt: skip
        pool.add(part)
    assert pool.pool is not None
    rows = _rows(pool.pool, lam, strength, names, list(objectives), options.kl_coef)
    return RewardFitReport(
        weights=dict(zip(names, lam.tolist())),
        strength=strength,
        policy_names=names,
        objectives={name: o.source for name, o in objectives.items()},
        rows=rows,
        chosen=chosen,
        rounds=rounds,
        stopped=stopped,
        target="decoded" if sampler.decoded else "sequence",
        num_prompts=len(prompts),
        options=asdict(options),
        seconds=seconds,
        warnings=_warnings(rows["fitted"], note),
    )


def decoded_target_supported(engine: Engine) -> bool:
    """The decoded target scores every model's full distributions at every position
    (``Capabilities.token_moments``: K separate models)."""
    return engine.capabilities.token_moments and engine.has_reference


class RoundSampler:
    """One round: sample from a mixture, score under every model and every reward."""

    def __init__(
        self,
        engine: Engine,
        prompts: list[str],
        prompt_ids: list[list[int]],
        objectives: Mapping[str, Objective],
        options: RewardFitDriverOptions,
        seeds: random.Random,
        seconds: dict[str, float],
    ) -> None:
        self.engine, self.prompts, self.prompt_ids = engine, prompts, prompt_ids
        self.objectives, self.options = objectives, options
        self.seeds, self.seconds = seeds, seconds
        self.decoded = options.target == "decoded" and decoded_target_supported(engine)
        if options.target == "decoded" and not self.decoded:
            logger.warning(
                "the decoded target needs K separate models; fitting the sequence-level mixture"
            )

    def round(
        self, mixture: Mixture, m: int, tag: str, progress: Progress, cancelled: CancelCheck
    ) -> Scored:
        """Sample ``m`` replies per prompt from ``mixture``; score them every way the fit needs."""
        started = time.monotonic()
        replies = sample_mixture(self.engine, self.prompt_ids, mixture, m,
                                 self.options.max_new_tokens, self.seeds, progress, cancelled,
                                 tag=tag)  # fmt: skip
        self.seconds["sampling"] += time.monotonic() - started
        started = time.monotonic()
        theta = [c * mixture.strength for c in mixture.weights]  # [K] theta_r = s lam
        ratios, ref, moments = self._score(replies, m, theta, progress, cancelled)
        rewards = self._rewards(replies, m, cancelled)
        self.seconds["scoring"] += time.monotonic() - started
        n = len(self.prompt_ids)
        q = torch.tensor([r.logprob for r in replies], dtype=torch.float64).reshape(n, m)
        coefficients = None
        if moments is not None:
            coefficients = torch.tensor(theta, dtype=torch.float64).expand(n, m, -1).clone()
        return Scored(ratios, ref, q, rewards, moments, coefficients)

    def _score(
        self,
        replies: list[Reply],
        m: int,
        theta: list[float],
        progress: Progress,
        cancelled: CancelCheck,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``R [N, m, K]``, ``log pi_ref [N, m]`` and, for the decoded target, ``M [N, m, K]``."""
        contexts = [self.prompt_ids[i // m] for i in range(len(replies))]
        ids = [r.token_ids for r in replies]
        part = max(1, math.ceil(len(ids) / _SCORE_PARTS))
        policy, reference, moments = [], [], []
        for start in range(0, len(ids), part):
            if cancelled():
                raise FitCancelled("fit cancelled while scoring")
            span = slice(start, start + part)
            if self.decoded:  # every model's full distributions, on this thread
                scores, moment = self.engine.runner.score_with_moments(
                    contexts[span], ids[span], [theta] * len(ids[span])
                )
                moments.append(moment)  # [b, K]
            else:
                scores = self.engine.score(contexts[span], ids[span])
            assert scores.reference_logprobs is not None  # run_reward_fit checked
            policy.append(scores.policy_logprobs.double())  # [b, K]
            reference.append(scores.reference_logprobs.double())  # [b]
            progress("scoring", min(start + part, len(ids)) / len(ids))
        n = len(self.prompt_ids)
        ref = torch.cat(reference)  # [N * m]
        ratios = torch.cat(policy) - ref.unsqueeze(1)  # [N * m, K]
        moment_grid = torch.cat(moments).reshape(n, m, -1) if moments else None  # [N, m, K]
        return ratios.reshape(n, m, -1), ref.reshape(n, m), moment_grid

    def _rewards(self, replies: list[Reply], m: int, cancelled: CancelCheck) -> torch.Tensor:
        prompts = [self.prompts[i // m] for i in range(len(replies))]
        texts = [r.text for r in replies]
        columns = []
        for objective in self.objectives.values():
            if cancelled():
                raise FitCancelled("fit cancelled while scoring rewards")
            columns.append(torch.tensor(objective.score(prompts, texts), dtype=torch.float64))
        return torch.stack(columns, dim=1).reshape(len(self.prompt_ids), m, -1)  # [N, m, J]


def _cancel_check(cancelled: CancelCheck) -> Callable[[int, int], None]:
    def on_step(step: int, total: int) -> None:
        if cancelled():
            raise FitCancelled("fit cancelled while optimising")

    return on_step


def _round_record(
    number: int,
    result: Any,
    move: float,
    pool: ScoredPool,
    names: list[str],
    objectives: Mapping[str, Objective],
) -> dict[str, Any]:
    labels = list(objectives)
    return {
        "round": number,
        "pool_samples_per_prompt": pool.samples_per_prompt,
        "start": result.start.to_dict(names, labels),
        "end": result.end.to_dict(names, labels),
        "steps": result.steps,
        "stopped": result.stopped,
        **dict(zip(("chosen", "note"), _chosen(result.chosen, result.note, names))),
        "move": move,
    }


def _rows(
    pool: ScoredPool,
    lam: torch.Tensor,
    strength: float,
    names: list[str],
    objectives: list[str],
    kl_coef: float,
) -> dict[str, dict[str, Any]]:
    k = len(names)
    candidates: dict[str, tuple[list[float], float]] = {
        "fitted": (lam.tolist(), strength),
        "uniform": ([1.0 / k] * k, 1.0),
    }
    for i, name in enumerate(names):
        candidates[f"policy:{name}"] = ([1.0 if j == i else 0.0 for j in range(k)], 1.0)
    candidates["reference"] = ([1.0 / k] * k, 0.0)
    return {
        row: estimate(pool, weights, s, kl_coef).to_dict(names, objectives)
        for row, (weights, s) in candidates.items()
    }


def _chosen(chosen: str, note: str, names: list[str]) -> tuple[str, str]:
    """The optimiser's ``vertex:<k>`` as the report's row name ``policy:<name>``."""

    def named(text: str) -> str:
        return re.sub(r"vertex:(\d+)", lambda m: f"policy:{names[int(m[1])]}", text)

    return named(chosen), named(note)


def _warnings(fitted: dict[str, Any], note: str = "") -> list[str]:
    warnings = [f"final check of the last fit: {note}"] if note else []
    if float(fitted["ess_fraction"]) < 0.1:
        warnings.append(
            f"low effective sample size for the fitted mixture ({fitted['ess']:.2f} samples per "
            "prompt): its estimates are noisy; add rounds or samples"
        )
    for message in warnings:
        logger.warning(message)
    return warnings


def format_reward_report(report: RewardFitReport) -> str:
    """The report as a plain-text table: estimated win rates against the reference per row."""
    labels = list(report.objectives)
    header = ["row", *(f"win:{o}" for o in labels), "worst", "KL", "ESS"]
    table = [header]
    for row, r in report.rows.items():
        wins = [f"{100 * r['win_rates'][o]:.1f}%" for o in labels]
        table.append([row, *wins, f"{100 * r['worst']:.1f}%", f"{r['kl']:.3f}", f"{r['ess']:.2f}"])
    widths = [max(len(cells[c]) for cells in table) for c in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths)))
        for t in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    weights = ", ".join(f"{n}={w:.4f}" for n, w in report.weights.items())
    intro = [
        f"fitted weights: {weights}, strength {report.strength:.3f} "
        f"({len(report.rounds)} fits, stopped on {report.stopped}; point: {report.chosen})",
        "estimated on the pooled samples (self-normalised importance weights):",
        "",
    ]
    return "\n".join([*intro, *lines, *(f"warning: {w}" for w in report.warnings)])
