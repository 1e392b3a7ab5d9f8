"""Each protocol's request model converts itself to the engine's sampling parameters."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.protocol.common import MAX_SEED
from server.protocol.openai import ChatCompletionRequest, CompletionRequest
from server.protocol.tgi import TGIParameters


def test_tgi_parameters_to_sampling_follow_tgi_greedy_rules() -> None:
    assert TGIParameters().to_sampling(7).greedy  # no knob set: greedy
    assert TGIParameters(temperature=0.0, do_sample=True).to_sampling(7).greedy
    for knobs in ({"do_sample": True}, {"top_k": 5}, {"top_p": 0.5}, {"min_p": 0.1}):
        sampling = TGIParameters(**knobs).to_sampling(7)  # type: ignore[arg-type]
        assert not sampling.greedy and sampling.temperature == 1.0, knobs
    sampling = TGIParameters(
        temperature=0.7, seed=3, stop=["\n"], top_n_tokens=2, repetition_penalty=1.2
    ).to_sampling(9)
    assert (sampling.max_new_tokens, sampling.temperature, sampling.seed) == (9, 0.7, 3)
    assert (sampling.stop, sampling.top_logprobs, sampling.repetition_penalty) == (["\n"], 2, 1.2)


def test_openai_requests_to_sampling_give_each_choice_its_seed() -> None:
    body = CompletionRequest(prompt="x", seed=5, stop="END", top_k=4, min_p=0.2)
    sampling = body.to_sampling(11, 3, index=2)
    assert (sampling.max_new_tokens, sampling.top_logprobs, sampling.seed) == (11, 3, 7)
    assert (sampling.stop, sampling.top_k, sampling.min_p) == (["END"], 4, 0.2)
    assert sampling.temperature == 1.0 and not sampling.greedy  # OpenAI samples by default
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], temperature=0.0)
    unseeded = chat.to_sampling(4, 0, index=1)
    assert unseeded.greedy and unseeded.seed is None
    top = CompletionRequest(prompt="x", seed=MAX_SEED).to_sampling(1, 0, index=1)
    assert top.seed == MAX_SEED + 1  # the largest seed, and its next choice's
    with pytest.raises(ValidationError, match="less than or equal"):
        CompletionRequest(prompt="x", seed=MAX_SEED + 1)
