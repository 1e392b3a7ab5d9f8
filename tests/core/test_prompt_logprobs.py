"""Prompt log-probs by teacher forcing agree with the log-probs decoding reported."""

from __future__ import annotations

import pytest

from mpo_core.engine import Engine, GenerationRequest
from mpo_core.policies import PolicySet
from mpo_core.sampling import SamplingParams


@pytest.mark.parametrize(
    ("weights", "strength"), [([1, 1, 1], 1.0), ([2, 0, 1], 1.0), ([0, 1, 3], 0.5)]
)
def test_prompt_logprobs_match_the_decoded_tokens_logprobs(
    engine: Engine, llama_set: PolicySet, weights: list[float], strength: float
) -> None:
    mixture = engine.mixture(weights, strength)
    prompt = llama_set.tokenizer.encode("Could you please help me")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    result = engine.generate(GenerationRequest(prompt, params, mixture))
    scored = engine.prompt_logprobs(prompt + result.token_ids, mixture, top_n=3).result()
    assert scored.logprobs[0] is None and scored.top_logprobs[0] == []
    assert len(scored.logprobs) == len(prompt) + 8
    for event, logprob in zip(result.events, scored.logprobs[len(prompt) :]):
        assert logprob == pytest.approx(event.logprob, abs=1e-4)
    tokens = prompt + result.token_ids
    for t, (logprob, top) in enumerate(zip(scored.logprobs[1:], scored.top_logprobs[1:])):
        values = [v for _, v in top]
        assert len(top) == 3 and values == sorted(values, reverse=True)
        assert logprob is not None and logprob <= values[0] + 1e-6
        listed = dict(top)
        if tokens[t + 1] in listed:  # the token itself among the best: the same number
            assert listed[tokens[t + 1]] == pytest.approx(logprob, abs=1e-6)


def test_weights_change_prompt_logprobs(engine: Engine, llama_set: PolicySet) -> None:
    prompt = llama_set.tokenizer.encode("Thank you so much")
    one = engine.prompt_logprobs(prompt, engine.mixture([1, 0, 0])).result().logprobs
    other = engine.prompt_logprobs(prompt, engine.mixture([0, 0, 1])).result().logprobs
    assert one[1:] != pytest.approx(other[1:], abs=1e-3)
