"""Signed mixtures on the tiny family: the engine's log-probs (decoded and echoed) equal an
independent computation from each member's own forward with Li et al.'s plausibility
constraint, the CFG special case equals the textbook formula, and speculation keeps
greedy replies exact."""

from __future__ import annotations

import pytest
import torch

from mpo_core.config import SpeculativeConfig
from mpo_core.decoding.mixing import Mixture
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, GenerationRequest
from mpo_core.models.policies import PolicySet

PROMPT = "Could you please help me with"


def member_logprobs(ps: PolicySet, model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """[T, V] float64: a member's next-token log-probs after each prefix, by its own forward
    (logit rows past the vocabulary dropped, as the engine drops them)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :, : ps.vocab_size]  # [T, V]
    return logits.double().log_softmax(-1)


def independent_mixture(
    ps: PolicySet, mixture: Mixture, tokens: list[int], alpha: float
) -> torch.Tensor:
    """[T, V]: the signed mixture written out from its definition, one member at a time:
    sum_m c_m log p_m, restricted to {v : q(v) >= alpha max q} with q the positive terms'
    mixture (their coefficients over their sum), then normalised."""
    models = [p.model for p in ps.policies] + [ps.reference.model]  # type: ignore[union-attr]
    coefs = mixture.coefficients
    per_model = [member_logprobs(ps, m, tokens) if c != 0 else None for m, c in zip(models, coefs)]
    scores = sum(c * lp for c, lp in zip(coefs, per_model) if lp is not None)
    positive = [(c, lp) for c, lp in zip(coefs, per_model) if lp is not None and c > 0]
    total = sum(c for c, _ in positive)
    head = sum((c / total) * lp for c, lp in positive).log_softmax(-1)  # type: ignore[union-attr]
    keep = head.exp() >= alpha * head.exp().max(-1, keepdim=True).values
    return scores.masked_fill(~keep, float("-inf")).log_softmax(-1)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("weights", "strength", "alpha"),
    [
        ({"helpful": 2.0, "concise": -1.0}, 1.0, 0.1),
        ({"helpful": 1.5, "harmless": 1.0, "concise": -1.5}, 0.7, 0.3),
        ({"helpful": 3.0, "concise": -2.0}, 1.0, 0.0),
    ],
)
def test_a_signed_mixtures_logprobs_equal_the_independent_formula(
    engine: Engine, llama_set: PolicySet, weights: dict[str, float], strength: float, alpha: float
) -> None:
    mixture = engine.mixture(weights, strength, alpha)
    assert mixture.alpha == alpha  # a negative term: the request's alpha is in force
    prompt = llama_set.tokenizer.encode(PROMPT)
    params = SamplingParams(
        max_new_tokens=8, temperature=1.0, seed=11, ignore_eos=True, top_logprobs=20
    )
    result = engine.generate(GenerationRequest(prompt, params, mixture))
    tokens = prompt + result.token_ids
    expected = independent_mixture(llama_set, mixture, tokens, alpha)  # [T, V]
    for i, event in enumerate(result.events):
        row = expected[len(prompt) - 1 + i]  # the distribution the token was drawn from
        assert event.logprob == pytest.approx(row[event.token_id].item(), abs=1e-4)
        assert torch.isfinite(row[event.token_id])  # never an excluded token
        ids = [t for t, _ in event.top_logprobs]
        values = torch.tensor([v for _, v in event.top_logprobs], dtype=torch.float64)
        torch.testing.assert_close(values, row[ids], atol=1e-4, rtol=0)
        # the alternatives are the allowed tokens only: an excluded one is none
        assert len(ids) == min(20, int(torch.isfinite(row).sum()))
    if alpha > 0:  # the constraint excluded tokens: the rows are not the plain formula
        assert bool(torch.isinf(expected[len(prompt) - 1 :]).any())
    # The echo (prompt log-probs) of the same tokens agrees with the decoded log-probs.
    scored = engine.prompt_logprobs(tokens, mixture, top_n=20).result()
    echoed = scored.logprobs
    for top in scored.top_logprobs:
        assert all(lp > float("-inf") for _, lp in top)
    for t in range(1, len(tokens)):
        want = expected[t - 1, tokens[t]].item()
        got = echoed[t]
        assert got is not None
        assert got == pytest.approx(want, abs=1e-4) or (got == want == float("-inf"))


def test_cfg_with_alpha_0_is_the_textbook_formula(engine: Engine, llama_set: PolicySet) -> None:
    """(1 + g) log p(y | x, c) - g log p(y | x): the weights {c: 1 + g, plain: -g}."""
    g = 1.5
    mixture = engine.mixture({"concise": 1 + g, "helpful": -g}, 1.0, 0.0)
    assert mixture.alpha == 0.0
    prompt = llama_set.tokenizer.encode(PROMPT)
    params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True, top_logprobs=10)
    event = engine.generate(GenerationRequest(prompt, params, mixture)).events[0]
    names = llama_set.names
    cond = member_logprobs(llama_set, llama_set.policies[names.index("concise")].model, prompt)
    plain = member_logprobs(llama_set, llama_set.policies[names.index("helpful")].model, prompt)
    textbook = ((1 + g) * cond[-1] - g * plain[-1]).log_softmax(-1)  # [V]
    assert event.token_id == int(textbook.argmax())
    ids = [t for t, _ in event.top_logprobs]
    assert ids == textbook.topk(10).indices.tolist()
    values = torch.tensor([v for _, v in event.top_logprobs], dtype=torch.float64)
    torch.testing.assert_close(values, textbook[ids], atol=1e-4, rtol=0)


def test_strength_past_1_with_non_negative_weights_stays_unconstrained(
    engine: Engine,
) -> None:
    """Only a negative policy term brings the constraint; strength keeps its meaning."""
    assert engine.mixture({"helpful": 1.0}, 2.0).alpha == 0.0
    assert engine.mixture({"helpful": 2.0, "concise": -1.0}, 0.0).alpha == 0.0  # no terms
    assert engine.mixture({"helpful": 2.0, "concise": -1.0}, 0.5).alpha == 0.1  # default


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_signed_replies_are_the_same_with_speculation_on_and_off(
    llama_set: PolicySet, method: str
) -> None:
    """The acceptance rule reads the final (constrained) distribution: speculation is exact."""
    prompts = [
        "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the",
        PROMPT,
    ]
    mixtures = [
        ({"helpful": 2.0, "concise": -1.0}, 1.0, 0.1),
        ({"harmless": 2.0, "helpful": -1.0}, 1.3, 0.0),
    ]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    replies: dict[str, list[list[int]]] = {}
    for name, settings in (
        ("off", SpeculativeConfig(method="off")),
        ("on", SpeculativeConfig(method=method, max_draft_tokens=4)),  # type: ignore[arg-type]
    ):
        with Engine(llama_set, speculative=settings) as engine:
            replies[name] = [
                engine.generate(
                    GenerationRequest(
                        llama_set.tokenizer.encode(p), params, engine.mixture(w, s, a)
                    )
                ).token_ids
                for p in prompts
                for w, s, a in mixtures
            ]
            if name == "on":
                assert engine.speculator is not None
    assert replies["on"] == replies["off"]
