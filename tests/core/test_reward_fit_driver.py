"""The reward-fit driver on the tiny Llama family: rounds of sampling, scoring and refitting."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import torch

from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.errors import InvalidParameter
from mpo_core.fitting.driver import encode_prompt, sampling_window
from mpo_core.fitting.mirror_descent import FitCancelled
from mpo_core.fitting.reward_driver import (
    RewardFitDriverOptions,
    RoundSampler,
    format_reward_report,
    run_reward_fit,
)
from mpo_core.fitting.rewards import Objective
from mpo_core.models.kvcache import to_logprobs
from mpo_core.models.policies import PolicySet

PROMPTS = ["Could you help me?", "Write a short poem.", "Say thanks."]
SMALL = RewardFitDriverOptions(
    reference_samples=4, samples_per_round=3, rounds=2, max_new_tokens=5, iterations=50, seed=3
)


def _length(prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
    return [float(len(r)) for r in replies]


def _vowels(prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
    return [float(sum(c in "aeiou" for c in r)) for r in replies]


OBJECTIVES = {
    "long": Objective("long", _length, "callable:length"),
    "vowels": Objective("vowels", _vowels, "callable:vowels"),
}


def test_report_rounds_and_rows(engine: Engine) -> None:
    phases: list[str] = []
    report = run_reward_fit(
        engine, PROMPTS, OBJECTIVES, SMALL, progress=lambda p, f: phases.append(p)
    )
    names = engine.policy_names
    assert list(report.weights) == names
    assert sum(report.weights.values()) == pytest.approx(1.0)
    assert report.strength == 1.0  # not fitted
    assert set(report.rows) == {"fitted", "uniform", "reference", *(f"policy:{n}" for n in names)}
    assert 1 <= len(report.rounds) <= SMALL.rounds + 1
    sizes = [r["pool_samples_per_prompt"] for r in report.rounds]
    assert sizes == [4 + 3 * i for i in range(len(sizes))]  # each round adds its samples
    for row in report.rows.values():
        assert set(row["win_rates"]) == {"long", "vowels"}
        assert row["worst"] == pytest.approx(min(row["win_rates"].values()))
        assert 0 < row["ess_fraction"] <= 1 + 1e-9
    assert {"sampling", "scoring", "optimising"} <= set(phases)
    # the reference against its own draws: exactly one half, and no KL, after mixture rounds
    assert report.rows["reference"]["win_rates"] == pytest.approx({"long": 0.5, "vowels": 0.5})
    assert report.rows["reference"]["kl"] == 0.0
    # the fit returns no point its own estimate ranks below uniform or a pure policy
    fitted = report.rows["fitted"]["objective"]
    rivals = ["uniform", *(f"policy:{n}" for n in names)]
    assert all(fitted >= report.rows[row]["objective"] - 1e-9 for row in rivals) or any(
        row in warning for warning in report.warnings for row in rivals
    )
    assert report.chosen in ("iterate", *rivals)
    json.loads(json.dumps(report.to_dict()))
    table = format_reward_report(report)
    for label in ["fitted", "uniform", "reference", "win:long", "worst", "ESS"]:
        assert label in table


def test_reference_alone_wins_half(engine: Engine) -> None:
    """No mixture round: the pool is reference replies only, so the reference row is 1/2."""
    options = RewardFitDriverOptions(**{**SMALL.__dict__, "rounds": 0})
    report = run_reward_fit(engine, PROMPTS, OBJECTIVES, options)
    for value in report.rows["reference"]["win_rates"].values():
        assert value == pytest.approx(0.5, abs=2e-3)
    assert report.stopped == "rounds" and len(report.rounds) == 1


def _close(a: object, b: object, tol: float = 1e-6) -> bool:
    """Equal structures whose numbers agree to ``tol`` (a row's log-probs can differ in the
    last bits with the rows it happened to be batched with; the sampled tokens do not)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= tol  # type: ignore[arg-type]
    return a == b


def test_same_seed_same_fit(engine: Engine) -> None:
    first = run_reward_fit(engine, PROMPTS[:2], OBJECTIVES, SMALL)
    again = run_reward_fit(engine, PROMPTS[:2], OBJECTIVES, SMALL)
    assert _close(first.weights, again.weights)
    assert _close(first.rows, again.rows)
    assert not _close(first.weights, {k: 1.0 / len(first.weights) for k in first.weights})


def _mixture_logprob(
    policy_set: PolicySet, prompt: list[int], reply: list[int], lam: list[float], s: float
) -> float:
    """``log q(y|x)`` of the per-token mixture, by teacher forcing every model here."""
    ids = torch.tensor([prompt + reply])  # [1, L]
    logps = []
    for loaded in [*policy_set.policies, policy_set.reference]:
        assert loaded is not None
        logits = loaded.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [T, V']
        logps.append(to_logprobs(logits, policy_set.vocab_size))  # [T, V]
    mixed = s * sum(w * lp for w, lp in zip(lam, logps[:-1])) + (1 - s) * logps[-1]  # [T, V]
    mixed = torch.log_softmax(mixed, dim=-1)  # [T, V]: normalised per token, as decoded
    return float(mixed[torch.arange(len(reply)), torch.tensor(reply)].sum())


@torch.inference_mode()
def test_round_records_the_mixture_density(engine: Engine) -> None:
    """Each sample carries log q of the per-token mixture that drew it, not of pi_ref."""
    prompt_ids = [encode_prompt(engine.tokenizer, p) for p in PROMPTS[:2]]
    lam, strength = [0.6, 0.1, 0.3], 1.4
    mixture = engine.mixture(dict(zip(engine.policy_names, lam)), strength)
    seconds = {"sampling": 0.0, "scoring": 0.0}
    sampler = RoundSampler(engine, PROMPTS[:2], prompt_ids, OBJECTIVES, SMALL, random.Random(0),
                           seconds)  # fmt: skip
    replies_seen = []
    original = sampler._score

    def spy(replies, m, theta, progress, cancelled):  # type: ignore[no-untyped-def]
        replies_seen.extend(replies)
        return original(replies, m, theta, progress, cancelled)

    sampler._score = spy  # type: ignore[method-assign]
    got = sampler.round(mixture, 2, "t", lambda p, f: None, lambda: False)
    q, ref, rewards = got.proposal, got.reference, got.rewards
    assert q.shape == ref.shape == (2, 2) and got.ratios.shape == (2, 2, 3)
    assert rewards.shape == (2, 2, 2)
    assert got.coefficients is not None and got.moments is not None
    assert got.coefficients[1, 1].tolist() == pytest.approx([strength * w for w in lam])
    for n, reply in enumerate(replies_seen):
        expected = _mixture_logprob(engine.policy_set, prompt_ids[n // 2], reply.token_ids, lam,
                                    strength)  # fmt: skip
        assert float(q.flatten()[n]) == pytest.approx(expected, abs=1e-3)
    assert float((q - ref).abs().max()) > 0.01  # the proposal is not the reference
    assert rewards[0, 0, 0] == float(len(replies_seen[0].text))


@pytest.mark.parametrize("phase", ["sampling", "scoring", "optimising"])
def test_cancel_in_each_phase(engine: Engine, phase: str) -> None:
    seen: list[str] = []

    def progress(name: str, fraction: float) -> None:
        seen.append(name)

    with pytest.raises(FitCancelled):
        run_reward_fit(engine, PROMPTS, OBJECTIVES, SMALL, progress=progress,
                       should_cancel=lambda: phase in seen)  # fmt: skip
    # the replies in flight were cancelled: they leave at the engine's next turn
    assert engine.wait_until_idle(timeout=60)
    assert engine.stats().running == 0


def test_bad_options_name_the_parameter(engine: Engine) -> None:
    with pytest.raises(InvalidParameter) as bad:
        run_reward_fit(engine, PROMPTS, OBJECTIVES, RewardFitDriverOptions(rounds=-1))
    assert bad.value.param == "rounds"
    with pytest.raises(InvalidParameter) as bad:
        run_reward_fit(engine, PROMPTS, {}, SMALL)
    assert bad.value.param == "rewards"


def test_sampling_window_is_full_only_when_nobody_else_waits() -> None:
    def fake(running: int, waiting: int) -> object:
        stats = SimpleNamespace(running=running, waiting=waiting)
        return SimpleNamespace(limits=EngineLimits(max_running=16), stats=lambda: stats)

    assert sampling_window(fake(0, 0), own=0) == 16  # type: ignore[arg-type]
    assert sampling_window(fake(16, 4), own=20) == 16  # type: ignore[arg-type]  # all ours
    assert sampling_window(fake(16, 5), own=20) == 8  # type: ignore[arg-type]  # one other


@torch.inference_mode()
def test_token_moments_give_the_decoded_density_to_first_order(engine: Engine) -> None:
    """log q_theta(y) - log q_r(y) ~= (theta - theta_r) . (R - M): the error shrinks as delta^2."""
    from mpo_core.runners.moments import score_with_moments

    prompt = encode_prompt(engine.tokenizer, PROMPTS[0])
    lam_r, s_r = [0.5, 0.2, 0.3], 1.0
    mixture = engine.mixture(dict(zip(engine.policy_names, lam_r)), s_r)
    seconds = {"sampling": 0.0, "scoring": 0.0}
    sampler = RoundSampler(engine, PROMPTS[:1], [prompt], OBJECTIVES, SMALL, random.Random(1),
                           seconds)  # fmt: skip
    from mpo_core.fitting.driver import sample_mixture

    (reply,) = sample_mixture(engine, [prompt], mixture, 1, 6, random.Random(2),
                              lambda p, f: None, lambda: False)  # fmt: skip
    theta_r = torch.tensor(lam_r, dtype=torch.float64) * s_r
    scores, moments = score_with_moments(engine.policy_set, [prompt], [reply.token_ids],
                                         [theta_r.tolist()])  # fmt: skip
    assert scores.reference_logprobs is not None
    features = scores.policy_logprobs[0].double() - float(scores.reference_logprobs[0]) - moments[0]
    base = _mixture_logprob(engine.policy_set, prompt, reply.token_ids, lam_r, s_r)
    assert base == pytest.approx(reply.logprob, abs=1e-3)  # the engine's log q is this density
    direction = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    errors = []
    for size in (0.4, 0.2):
        theta = theta_r + size * direction
        total = float(theta.sum())  # theta = s lam with s = sum(theta)
        lam = (theta / total).tolist()
        exact = _mixture_logprob(engine.policy_set, prompt, reply.token_ids, lam, total)
        approx = base + float((theta - theta_r) @ features)
        errors.append(abs(exact - approx))
    assert errors[1] < errors[0] / 3  # second-order error: a quarter, up to noise
    assert sampler.decoded  # K separate models: the driver uses this target
