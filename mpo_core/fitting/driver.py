"""The fit driver (docs/fitting.md): sample from the reference, score, fit, evaluate, report.

``run_fit`` drives a running :class:`~mpo_core.engine.Engine`:

1. ``sampling``: ``m`` replies per prompt from ``pi_ref`` (strength 0, temperature 1), submitted
   together so that the engine batches them, each with a seed derived from ``options.seed``;
2. ``scoring``: teacher-forced log-probs of every reply under every policy and the reference,
   giving ``R[i, j, k] = log pi_k(y_ij|x_i) - log pi_ref(y_ij|x_i)``;
3. ``optimising``: mirror descent on ``R`` (:func:`mpo_core.fitting.fit_weights`);
4. the report: the fitted weights, uniform weights and each single policy, evaluated on ``R``.

The HTTP fit job and ``mpo fit`` both call ``run_fit``; ``format_report_table`` is the CLI's view.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..decoding.mixing import Mixture
from ..decoding.sampling import SamplingParams
from ..engine.core import Engine, GenerationRequest
from ..engine.streams import RequestStream
from ..errors import InvalidParameter, Overloaded
from .mirror_descent import FitCancelled, WeightEvaluation, evaluate_weights, fit_weights

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
CancelCheck = Callable[[], bool]

LOW_ESS_FRACTION = 0.1  # warn when the fitted mixture keeps under 10% of the samples
_SCORE_PARTS = 20  # scoring is split into this many calls, for progress and cancellation
_TRACE_POINTS = 100  # batch-F values kept in the report


@dataclass
class FitOptions:
    """Parameters of one fit; ``validate`` names the first bad field."""

    samples_per_prompt: int = 8  # m: reference replies per prompt
    max_new_tokens: int = 32  # length cap of each reply
    iterations: int = 500  # T: mirror-descent steps
    step_size: float | None = None  # eta; None = c / sqrt(T), see mpo_core.fitting
    batch_size: int | None = None  # prompts per step; None = all (full batch)
    seed: int = 0  # seeds the reply sampling and the batch draws

    def validate(self) -> FitOptions:
        for name in ("samples_per_prompt", "max_new_tokens", "iterations"):
            _check_positive_int(name, getattr(self, name))
        if self.batch_size is not None:
            _check_positive_int("batch_size", self.batch_size)
        if self.step_size is not None and (
            isinstance(self.step_size, bool)
            or not isinstance(self.step_size, int | float)
            or not math.isfinite(self.step_size)
            or self.step_size <= 0
        ):
            raise InvalidParameter(
                "step_size", f"step_size must be a finite number > 0, got {self.step_size!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidParameter("seed", f"seed must be an integer >= 0, got {self.seed!r}")
        return self


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameter(name, f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class FitReport:
    """What a fit found, JSON-ready through ``to_dict``."""

    weights: dict[str, float]  # fitted, on the simplex, in policy order
    objective: float  # F at the fitted weights over all prompts
    policy_names: list[str]
    rows: dict[str, dict[str, Any]]  # "fitted", "uniform", "policy:<name>" -> evaluation
    num_prompts: int
    samples_per_prompt: int
    iterations: int
    step_size: float
    batch_size: int | None
    seed: int
    mean_reply_tokens: float
    objective_trace: list[float]  # batch F along the run, subsampled
    seconds: dict[str, float]  # wall time per phase
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_fit(
    engine: Engine,
    prompts: list[str],
    options: FitOptions,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> FitReport:
    """Sample, score, fit and evaluate; raises FitCancelled when ``should_cancel()`` is True."""
    options.validate()
    if not engine.has_reference:
        raise InvalidParameter(
            "reference",
            "fitting samples from the reference policy and this policy set has none: "
            "add `reference:` to the policy-set config",
        )
    _check_prompts(prompts)
    report_progress: Progress = progress or (lambda phase, fraction: None)
    cancelled: CancelCheck = should_cancel or (lambda: False)
    seconds: dict[str, float] = {}

    start = time.monotonic()
    prompt_ids = [encode_prompt(engine.tokenizer, p) for p in prompts]
    replies = sample_replies(engine, prompt_ids, options, report_progress, cancelled)
    seconds["sampling"] = time.monotonic() - start

    start = time.monotonic()
    log_ratios = score_replies(engine, prompt_ids, replies, report_progress, cancelled)
    seconds["scoring"] = time.monotonic() - start  # log_ratios: [N, m, K]

    start = time.monotonic()
    fit = fit_weights(
        log_ratios,
        iterations=options.iterations,
        step_size=options.step_size,
        batch_size=options.batch_size,
        seed=options.seed,
        on_step=_step_callback(report_progress, cancelled),
    )
    seconds["optimising"] = time.monotonic() - start

    names = list(engine.policy_names)
    rows = _evaluate_rows(log_ratios, fit.weights, names)
    return FitReport(
        weights=dict(zip(names, fit.weights.tolist())),
        objective=fit.objective,
        policy_names=names,
        rows=rows,
        num_prompts=len(prompts),
        samples_per_prompt=options.samples_per_prompt,
        iterations=options.iterations,
        step_size=fit.step_size,
        batch_size=options.batch_size,
        seed=options.seed,
        mean_reply_tokens=sum(len(r) for r in replies) / len(replies),
        objective_trace=_subsample(fit.history.batch_objective.tolist(), _TRACE_POINTS),
        seconds=seconds,
        warnings=_warnings(rows["fitted"], options.samples_per_prompt),
    )


def _check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or not prompts:
        raise InvalidParameter("prompts", "prompts must be a non-empty list of strings")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidParameter(
                "prompts", f"prompts[{i}] must be a non-empty string, got {prompt!r}"
            )


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a user prompt: through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding regardless
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode(prompt))


# -- phase 1: sampling ------------------------------------------------------------------
@dataclass
class Reply:
    """One sampled reply: its ids (a final EOS included), its text and ``log q(y|x)``."""

    token_ids: list[int]
    text: str
    logprob: float  # sum of the sampled tokens' log-probs under the mixture (temperature 1)


def sample_replies(
    engine: Engine,
    prompt_ids: list[list[int]],
    options: FitOptions,
    progress: Progress,
    should_cancel: CancelCheck,
) -> list[list[int]]:
    """``m`` replies per prompt from the reference, flattened prompt-major: ``[N * m]`` lists."""
    replies = sample_mixture(
        engine,
        prompt_ids,
        engine.mixture(strength=0.0),  # s = 0: the mixture is pi_ref alone
        options.samples_per_prompt,
        options.max_new_tokens,
        random.Random(options.seed),
        progress,
        should_cancel,
    )
    return [reply.token_ids for reply in replies]


def sampling_window(engine: Engine, own: int) -> int:
    """How many of the fit's requests may be in flight: the whole batch while nobody else
    decodes or waits, half of ``max_running`` otherwise (the other half stays free for
    interactive traffic)."""
    stats = engine.stats()
    others = stats.running + stats.waiting - own
    full = engine.limits.max_running
    return full if others <= 0 else max(1, full // 2)


def sample_mixture(
    engine: Engine,
    prompt_ids: list[list[int]],
    mixture: Mixture,
    samples_per_prompt: int,
    max_new_tokens: int,
    seeds: random.Random,
    progress: Progress,
    should_cancel: CancelCheck,
    tag: str = "fit",
) -> list[Reply]:
    """``m`` replies per prompt from ``mixture`` at temperature 1, prompt-major: ``[N * m]``.

    The requests are submitted together (the engine decodes them as one batch), at most
    ``sampling_window`` in flight, re-read as requests come and go; ``Overloaded`` waits.
    """
    pending = deque(
        GenerationRequest(
            prompt_ids=ids,
            sampling=SamplingParams(
                max_new_tokens=max_new_tokens, temperature=1.0, seed=seeds.getrandbits(63)
            ),
            mixture=mixture,
            request_id=f"{tag}-{i}-{j}",
        )
        for i, ids in enumerate(prompt_ids)
        for j in range(samples_per_prompt)
    )
    total = len(pending)
    in_flight: deque[RequestStream] = deque()
    replies: list[Reply] = []
    try:
        while pending or in_flight:
            window = sampling_window(engine, len(in_flight))
            while pending and len(in_flight) < window:
                try:
                    in_flight.append(engine.submit(pending[0]))
                except Overloaded as exc:
                    if not in_flight:  # others fill the queue: wait for room
                        _wait(min(exc.retry_after, 1.0), should_cancel)
                    break
                pending.popleft()
            if in_flight:
                replies.append(_collect(in_flight.popleft(), should_cancel))
                progress("sampling", len(replies) / total)
    except BaseException:
        for stream in in_flight:
            stream.cancel()
        raise
    return replies


def _collect(stream: RequestStream, should_cancel: CancelCheck) -> Reply:
    tokens: list[int] = []
    text: list[str] = []
    logprob = 0.0
    for event in stream:
        if should_cancel():
            stream.cancel()
            raise FitCancelled("fit cancelled while sampling")
        if event.finish_reason == "cancelled":
            raise FitCancelled(f"reply {stream.request_id} was cancelled by the engine")
        tokens.append(event.token_id)  # includes a final EOS: it is part of y
        text.append(event.text)
        logprob += event.logprob
    return Reply(tokens, "".join(text).strip(), logprob)


def _wait(seconds: float, should_cancel: CancelCheck) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if should_cancel():
            raise FitCancelled("fit cancelled while waiting for the engine")
        time.sleep(0.02)


# -- phase 2: scoring -------------------------------------------------------------------
def score_replies(
    engine: Engine,
    prompt_ids: list[list[int]],
    replies: list[list[int]],
    progress: Progress,
    should_cancel: CancelCheck,
) -> torch.Tensor:
    """``R[i, j, k]``: each reply's log-prob under policy k minus under the reference."""
    num_prompts = len(prompt_ids)
    m = len(replies) // num_prompts
    contexts = [prompt_ids[n // m] for n in range(len(replies))]
    part = max(1, math.ceil(len(replies) / _SCORE_PARTS))
    ratios: list[torch.Tensor] = []
    for start in range(0, len(replies), part):
        if should_cancel():
            raise FitCancelled("fit cancelled while scoring")
        scores = engine.score(contexts[start : start + part], replies[start : start + part])
        assert scores.reference_logprobs is not None  # run_fit checked there is a reference
        policy = scores.policy_logprobs.double()  # [n, K]
        ratios.append(policy - scores.reference_logprobs.double().unsqueeze(1))  # [n, K]
        progress("scoring", min(start + part, len(replies)) / len(replies))
    return torch.cat(ratios).reshape(num_prompts, m, -1)  # [N, m, K]


# -- phase 3 and the report -------------------------------------------------------------
def _step_callback(progress: Progress, should_cancel: CancelCheck) -> Callable[[int, int], None]:
    def on_step(step: int, iterations: int) -> None:
        every = max(1, iterations // 100)
        if step % every == 0 or step == iterations:
            if should_cancel():
                raise FitCancelled("fit cancelled while optimising")
            progress("optimising", step / iterations)

    return on_step


def _evaluate_rows(
    log_ratios: torch.Tensor, fitted: torch.Tensor, names: list[str]
) -> dict[str, dict[str, Any]]:
    num_policies = len(names)
    candidates = {"fitted": fitted.tolist(), "uniform": [1.0 / num_policies] * num_policies}
    for k, name in enumerate(names):
        candidates[f"policy:{name}"] = [1.0 if i == k else 0.0 for i in range(num_policies)]
    return {
        row: _row(evaluate_weights(log_ratios, weights), weights, names)
        for row, weights in candidates.items()
    }


def _row(evaluation: WeightEvaluation, weights: list[float], names: list[str]) -> dict[str, Any]:
    return {
        "weights": dict(zip(names, weights)),
        "rewards": dict(zip(names, evaluation.rewards)),
        "min": evaluation.min_reward,
        "kl": evaluation.kl,
        "maxmin": evaluation.maxmin,
        "objective": evaluation.objective,
        "ess": evaluation.ess_mean,
        "ess_min": evaluation.ess_min,
    }


def _warnings(fitted: dict[str, Any], m: int) -> list[str]:
    warnings = []
    if fitted["ess"] < max(1.0, LOW_ESS_FRACTION * m) and m > 1:
        warnings.append(
            f"low effective sample size ({fitted['ess']:.2f} of {m} samples per prompt): one "
            "reply dominates most prompts, so the estimates are noisy; sample more replies"
        )
    for message in warnings:
        logger.warning(message)
    return warnings


def _subsample(values: list[float], points: int) -> list[float]:
    if len(values) <= points:
        return values
    stride = len(values) / points
    return [values[int(i * stride)] for i in range(points)] + [values[-1]]


def _align(cells: list[str], widths: list[int]) -> list[str]:
    return [
        cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths))
    ]


def format_report_table(report: FitReport) -> str:
    """The report as a plain-text table: one row per candidate weighting."""
    names = report.policy_names
    header = ["weights", *(f"E[R:{n}]" for n in names), "min", "KL", "maxmin", "ESS"]
    lines = [[row, *(f"{r['rewards'][n]:.4f}" for n in names)] for row, r in report.rows.items()]
    for line, r in zip(lines, report.rows.values()):
        line += [f"{r['min']:.4f}", f"{r['kl']:.4f}", f"{r['maxmin']:.4f}", f"{r['ess']:.2f}"]
    table = [header, *lines]
    widths = [max(len(cells[c]) for cells in table) for c in range(len(header))]
    rendered = ["  ".join(_align(cells, widths)) for cells in table]
    rendered.insert(1, "-" * len(rendered[0]))
    fitted = ", ".join(f"{n}={w:.4f}" for n, w in report.weights.items())
    intro = [
        f"fitted weights: {fitted}",
        f"F = {report.objective:.6f} on {report.num_prompts} prompts x "
        f"{report.samples_per_prompt} replies ({report.mean_reply_tokens:.1f} tokens on average), "
        f"{report.iterations} steps of size {report.step_size:.4g}",
        "",
    ]
    notes = [f"warning: {w}" for w in report.warnings]
    return "\n".join([*intro, *rendered, *([""] + notes if notes else [])])
