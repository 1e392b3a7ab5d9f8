"""Prompt log-probs by teacher forcing agree with the log-probs decoding reported."""

from __future__ import annotations

import pytest

from mpo_core.config import load_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, GenerationRequest
from mpo_core.models.policies import PolicySet
from mpo_core.runners import load_policy_set
from mpo_core.testing.families import make_persona_family


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


@pytest.fixture(scope="module")
def persona_set(tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    path = make_persona_family(tmp_path_factory.mktemp("prompt_lp_personas"), True)
    return load_policy_set(load_config(path))


@pytest.mark.parametrize(("weights", "strength"), [([1, 1, 1], 1.0), ([0, 2, 1], 0.5)])
def test_a_persona_familys_prompt_logprobs_read_each_personas_prompt(
    persona_set: PolicySet, weights: list[float], strength: float
) -> None:
    """Each persona reads the prompt with its own opening, as it does when decoding: the
    decoded reply's log-probs come back when the prompt and reply are scored. (Scoring the
    plain prompt under every persona gave the reference's numbers.)"""
    tokenizer = persona_set.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Could you please help me"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt = list(tokenizer.encode(str(text), add_special_tokens=False))
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    with Engine(persona_set) as engine:
        mixture = engine.mixture(weights, strength)
        result = engine.generate(GenerationRequest(prompt, params, mixture))
        scored = engine.prompt_logprobs(prompt + result.token_ids, mixture, top_n=2).result()
    assert len(scored.logprobs) == len(prompt) + 6
    # The longest opening a persona of the mixture swaps for its own (this template opens
    # with a default system block) gets no log-prob; every token after it does.
    strips = persona_set.personas.strip  # type: ignore[union-attr]
    replaced = max(len(strips[m]) for m, w in enumerate(weights) if w)
    assert replaced > 0
    assert scored.logprobs[:replaced] == [None] * replaced
    assert all(lp is not None for lp in scored.logprobs[replaced:])
    for event, logprob in zip(result.events, scored.logprobs[len(prompt) :]):
        assert logprob == pytest.approx(event.logprob, abs=1e-4)
