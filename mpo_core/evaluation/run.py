"""``run_evaluation``: decode every row, score every reply, and build the report.

1. The rows (and the Pareto sweep's rows) are reduced to unique decode jobs: mixtures go
   to the main engine, soups to a second engine whose policies are the soups (built
   once, served next to the main one, so both decode concurrently).
2. Every job decodes ``m`` replies to each prompt with the shared seeds (``decode``).
3. Every reply is scored by every objective's reward, and, when the family has a
   reference, teacher-forced under it for the KL estimate
   ``KL(row || ref) ~= mean over replies of log p_row(y|x) - log pi_ref(y|x)``
   (exact in expectation when replies are sampled at temperature 1).
4. Per row and objective: the mean reward and its bootstrap interval over prompts, the
   win rate against the baseline row (ties half), the worst objective; the mean reply
   length and the KL estimate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine.core import Engine, EngineLimits
from ..errors import InvalidParameter
from ..fitting.driver import encode_prompt
from ..fitting.rewards import Objective
from ..runners import soup_policy_set
from .decode import DecodeJob, Progress, Samples, decode_jobs, reference_logprobs, sample_seed
from .rows import Row, RowParser, sweep_rows
from .stats import Estimate, bootstrap_mean, win_rate, win_scores, worst_gap

logger = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """How replies are decoded and summarised; ``validate`` names the first bad field."""

    samples: int = 4  # m: replies per prompt and row
    max_new_tokens: int = 48
    temperature: float = 1.0  # the KL estimate is exact in expectation only at 1
    seed: int = 0  # per-reply seeds derive from it (``sample_seed``); also the bootstrap's
    bootstrap: int = 1000  # resamples of the prompts for each interval
    baseline: str | None = None  # a row label; None = "reference" when there is one
    pareto: tuple[str, str] | None = None  # two objectives whose policies are swept
    pareto_points: int = 11
    examples: int = 2  # example replies kept per row
    compare: tuple[str, ...] = ()  # rows every row is also compared with, reply against reply

    def validate(self) -> EvalOptions:
        for name in ("samples", "max_new_tokens", "pareto_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameter(name, f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise InvalidParameter("seed", f"seed must be an integer >= 0, got {self.seed!r}")
        if not self.temperature >= 0:
            raise InvalidParameter("temperature", "temperature must be >= 0")
        if not (isinstance(self.bootstrap, int) and self.bootstrap >= 0):
            raise InvalidParameter("bootstrap", "bootstrap must be an integer >= 0")
        return self


@dataclass
class RowResult:
    """One row's numbers (``win_rates`` and ``worst_win`` are empty without a baseline)."""

    row: Row
    rewards: dict[str, Estimate]
    win_rates: dict[str, Estimate]
    worst_reward: tuple[str, float]  # the objective with the lowest mean reward
    worst_win: tuple[str, float] | None  # the objective with the lowest win rate
    reply_tokens: float
    reply_words: float
    kl: Estimate | None
    examples: list[tuple[str, str]]
    # against each ``compare`` row: per-objective paired win rates, and the gap between the
    # two rows' worst win rates against the baseline (paired bootstrap)
    paired: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    worst_gap: dict[str, Estimate] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.row.label,
            "kind": self.row.kind,
            "weights": self.row.weights_dict(),
            "strength": self.row.strength if self.row.kind == "mixture" else None,
            "rewards": {k: e.as_dict() for k, e in self.rewards.items()},
            "win_rates": {k: e.as_dict() for k, e in self.win_rates.items()},
            "worst_reward": {"objective": self.worst_reward[0], "mean": self.worst_reward[1]},
            "worst_win_rate": (
                None
                if self.worst_win is None
                else {"objective": self.worst_win[0], "mean": self.worst_win[1]}
            ),
            "reply_tokens": self.reply_tokens,
            "reply_words": self.reply_words,
            "kl": None if self.kl is None else self.kl.as_dict(),
            "examples": [{"prompt": p, "reply": r} for p, r in self.examples],
            "paired": {
                other: {k: e.as_dict() for k, e in wins.items()}
                for other, wins in self.paired.items()
            },
            "worst_gap": {other: e.as_dict() for other, e in self.worst_gap.items()},
        }


@dataclass
class EvalReport:
    """Everything an evaluation found; ``to_dict`` is the JSON the CLI writes."""

    objectives: dict[str, str]  # name -> reward source
    baseline: str | None
    rows: list[RowResult]
    pareto: list[RowResult]  # the sweep's rows (mixtures and soups), in sweep order
    pareto_objectives: tuple[str, str] | None
    prompts: list[str]
    seeds: list[list[int]]  # [N][m]
    options: EvalOptions
    policy_names: list[str]
    seconds: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)  # config, versions: filled by callers

    def row(self, label: str) -> RowResult:
        return next(r for r in self.rows if r.row.label == label)

    def to_dict(self) -> dict[str, Any]:
        options = dict(vars(self.options))
        options["pareto"] = list(self.options.pareto) if self.options.pareto else None
        options["compare"] = list(self.options.compare)
        return {
            "meta": self.meta,
            "options": options,
            "policies": self.policy_names,
            "objectives": self.objectives,
            "baseline": self.baseline,
            "prompts": self.prompts,
            "seeds": {
                "rule": "blake2b('mpo-eval:{seed}:{prompt}:{sample}') >> 1",
                "per_prompt_and_sample": self.seeds,
            },
            "rows": [r.to_dict() for r in self.rows],
            "pareto": {
                "objectives": list(self.pareto_objectives) if self.pareto_objectives else None,
                "rows": [r.to_dict() for r in self.pareto],
            },
            "seconds": self.seconds,
        }


def _pareto_rows(
    options: EvalOptions, objectives: Mapping[str, Objective], names: Sequence[str]
) -> list[Row]:
    if options.pareto is None:
        return []
    policies = []
    for objective in options.pareto:
        if objective not in objectives:
            raise InvalidParameter(
                "pareto", f"unknown objective {objective!r} (objectives: {', '.join(objectives)})"
            )
        policy = objectives[objective].policy
        if policy is None:
            raise InvalidParameter(
                "pareto",
                f"objective {objective!r} has no aligned policy to sweep; "
                "set `policy:` for it in the rewards file",
            )
        policies.append(policy)
    if policies[0] == policies[1]:
        raise InvalidParameter("pareto", f"both objectives are aligned with {policies[0]!r}")
    return sweep_rows(names, policies[0], policies[1], options.pareto_points)


def _baseline(options: EvalOptions, rows: list[Row], engine: Engine) -> str | None:
    label = options.baseline or ("reference" if engine.has_reference else None)
    if label is None:
        logger.warning("no reference and no baseline row: win rates are left out")
        return None
    labels = [r.label for r in rows]
    if label not in labels:
        raise InvalidParameter(
            "baseline", f"baseline {label!r} is not one of the rows ({', '.join(labels)})"
        )
    return label


def run_evaluation(
    engine: Engine,
    prompts: Sequence[str],
    objectives: Mapping[str, Objective],
    rows: Sequence[Row],
    options: EvalOptions,
    progress: Progress | None = None,
) -> EvalReport:
    """Decode, score and summarise ``rows`` on ``prompts`` (see the module docstring)."""
    options.validate()
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InvalidParameter("prompts", "prompts must be a non-empty list of non-empty strings")
    if not objectives:
        raise InvalidParameter("rewards", "no objectives: give at least one reward")
    rows = list(rows)
    labels = {r.label for r in rows}
    wants_reference = options.baseline in (None, "reference")
    if wants_reference and engine.has_reference and "reference" not in labels:
        rows.append(RowParser(engine.policy_names, True).parse(["reference"])[0])
    baseline = _baseline(options, rows, engine)
    sweep = _pareto_rows(options, objectives, engine.policy_names)
    seconds: dict[str, float] = {}
    started = time.monotonic()

    prompt_ids = [encode_prompt(engine.tokenizer, p) for p in prompts]
    seeds = [
        [sample_seed(options.seed, i, j) for j in range(options.samples)]
        for i in range(len(prompts))
    ]
    jobs, soup_engine = _jobs(engine, [*rows, *sweep])
    try:
        samples = decode_jobs(
            jobs, prompt_ids, seeds, options.max_new_tokens, options.temperature, progress
        )
    finally:
        if soup_engine is not None:
            soup_engine.stop(timeout=5)
    seconds["decoding"] = time.monotonic() - started

    started = time.monotonic()
    rewards = _score_rewards(samples, prompts, objectives, progress)
    seconds["rewards"] = time.monotonic() - started
    started = time.monotonic()
    kls = _kl_estimates(engine, prompt_ids, samples, progress)
    seconds["reference_scoring"] = time.monotonic() - started

    base = _baseline_key(rows, baseline)
    compare = _compare_keys(rows, options.compare)

    def summarise(row: Row) -> RowResult:
        return _summarise(row, samples[row.key], rewards, kls.get(row.key), base, prompts, options)

    summaries = [summarise(r) for r in rows]
    for result in summaries:
        _pair(result, rewards, base, compare, options)
    return EvalReport(
        objectives={name: o.source for name, o in objectives.items()},
        baseline=baseline,
        rows=summaries,
        pareto=[summarise(r) for r in sweep],
        pareto_objectives=options.pareto,
        prompts=list(prompts),
        seeds=seeds,
        options=options,
        policy_names=list(engine.policy_names),
        seconds=seconds,
    )


def _kl_estimates(
    engine: Engine,
    prompt_ids: Sequence[Sequence[int]],
    samples: Mapping[object, Samples],
    progress: Progress | None,
) -> dict[object, np.ndarray]:
    """Per reply ``log p_row(y|x) - log pi_ref(y|x)``: ``{key: [N, m]}`` (empty: no reference)."""
    kls: dict[object, np.ndarray] = {}
    if not engine.has_reference:
        return kls
    for n, (key, got) in enumerate(samples.items()):
        kls[key] = got.logprobs - reference_logprobs(engine, prompt_ids, got)  # [N, m]
        if progress is not None:
            progress("reference log-probs", (n + 1) / len(samples))
    return kls


def _baseline_key(rows: Sequence[Row], baseline: str | None) -> object | None:
    return next((r.key for r in rows if r.label == baseline), None)


def _compare_keys(rows: Sequence[Row], labels: Sequence[str]) -> dict[str, object]:
    keys = {r.label: r.key for r in rows}
    for label in labels:
        if label not in keys:
            raise InvalidParameter(
                "compare", f"compare row {label!r} is not one of the rows ({', '.join(keys)})"
            )
    return {label: keys[label] for label in labels}


def _pair(
    result: RowResult,
    rewards: Mapping[object, Mapping[str, np.ndarray]],
    baseline_key: object | None,
    compare: Mapping[str, object],
    options: EvalOptions,
) -> None:
    """Fill ``paired`` and ``worst_gap`` of one row against every ``compare`` row."""
    mine = rewards[result.row.key]
    resamples, seed = options.bootstrap, options.seed
    for label, key in compare.items():
        other = rewards[key]
        result.paired[label] = {
            name: win_rate(values, other[name], resamples, seed) for name, values in mine.items()
        }
        if baseline_key is None:
            continue
        base = rewards[baseline_key]
        row_wins = np.stack([win_scores(mine[n], base[n]) for n in mine])  # [J, N, m]
        other_wins = np.stack([win_scores(other[n], base[n]) for n in mine])  # [J, N, m]
        result.worst_gap[label] = worst_gap(row_wins, other_wins, resamples, seed)


def _jobs(engine: Engine, rows: Sequence[Row]) -> tuple[list[DecodeJob], Engine | None]:
    """One decode job per unique row key; soups get an engine of their own."""
    unique: dict[object, Row] = {}
    for row in rows:
        unique.setdefault(row.key, row)
    soups = {f"soup{i}": r for i, r in enumerate(r for r in unique.values() if r.kind == "soup")}
    soup_engine = None
    if soups:
        soup_set = soup_policy_set(engine.policy_set, {n: r.weights for n, r in soups.items()})
        limits = EngineLimits(
            max_running=engine.limits.max_running, max_queued=engine.limits.max_queued
        )
        soup_engine = Engine(soup_set, limits).start()
    soup_names: dict[object, str] = {r.key: n for n, r in soups.items()}
    jobs = []
    for key, row in unique.items():
        if row.kind == "soup":
            assert soup_engine is not None
            mixture = soup_engine.mixture({soup_names[key]: 1.0})
            jobs.append(DecodeJob(key, soup_engine, mixture))
        else:
            jobs.append(DecodeJob(key, engine, engine.mixture(row.weights_dict(), row.strength)))
    return jobs, soup_engine


def _score_rewards(
    samples: Mapping[object, Samples],
    prompts: Sequence[str],
    objectives: Mapping[str, Objective],
    progress: Progress | None,
) -> dict[object, dict[str, np.ndarray]]:
    """Every job's replies under every objective: ``{key: {objective: [N, m]}}``."""
    keys = list(samples)
    flat_prompts: list[str] = []
    flat_replies: list[str] = []
    for key in keys:
        for i, texts in enumerate(samples[key].texts):
            flat_prompts += [prompts[i]] * len(texts)
            flat_replies += texts
    shape = samples[keys[0]].logprobs.shape
    per_job = int(np.prod(shape))
    scored: dict[object, dict[str, np.ndarray]] = {key: {} for key in keys}
    for n, (name, objective) in enumerate(objectives.items()):
        values = np.array(objective.score(flat_prompts, flat_replies), dtype=np.float64)
        for k, key in enumerate(keys):
            scored[key][name] = values[k * per_job : (k + 1) * per_job].reshape(shape)
        if progress is not None:
            progress("rewards", (n + 1) / len(objectives))
    return scored


def _summarise(
    row: Row,
    got: Samples,
    rewards: Mapping[object, Mapping[str, np.ndarray]],
    kl: np.ndarray | None,
    baseline_key: object | None,
    prompts: Sequence[str],
    options: EvalOptions,
) -> RowResult:
    mine = rewards[row.key]
    resamples, seed = options.bootstrap, options.seed
    means = {name: bootstrap_mean(values, resamples, seed) for name, values in mine.items()}
    wins = {}
    if baseline_key is not None:
        wins = {
            name: win_rate(values, rewards[baseline_key][name], resamples, seed)
            for name, values in mine.items()
        }
    worst = min(means.items(), key=lambda item: item[1].mean)
    worst_win = min(wins.items(), key=lambda item: item[1].mean) if wins else None
    words = np.array([[len(t.split()) for t in texts] for texts in got.texts], dtype=float)
    examples = [(prompts[i], got.texts[i][0]) for i in range(min(options.examples, len(prompts)))]
    return RowResult(
        row=row,
        rewards=means,
        win_rates=wins,
        worst_reward=(worst[0], worst[1].mean),
        worst_win=None if worst_win is None else (worst_win[0], worst_win[1].mean),
        reply_tokens=float(got.lengths.mean()),
        reply_words=float(words.mean()),
        kl=None if kl is None else bootstrap_mean(kl, resamples, seed),
        examples=examples,
    )
