"""From a step's sampled tokens to each request's event (``mpo_core/engine/events.py``).

Hand-built log-prob tensors stand in for a step's output; the sequences are real ones,
prepared by ``requests.prepare`` for the tiny Llama family.
"""

import math

import pytest
import torch

from mpo_core.decoding.mixing import Mixture
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.events import EventBuilder, final_event
from mpo_core.engine.requests import EngineLimits, GenerationRequest, prepare


def _seq(policy_set, sid, sampling, weights=None, strength=1.0, prompt=(5, 6, 7), on_cancel=None):
    mixture = Mixture.build(policy_set.names, weights, strength, has_reference=True)
    request = GenerationRequest(list(prompt), sampling, mixture)
    return prepare(request, policy_set, EngineLimits(), 256, sid, on_cancel or (lambda: None))


def _step(builder, seqs, tokens, vocab, models):
    mixed = torch.log_softmax(torch.arange(vocab, dtype=torch.float32).repeat(len(seqs), 1), -1)
    logprobs = torch.stack([mixed - m for m in range(models)])  # [M, B, V] told apart by m
    return builder.step_events(seqs, mixed, logprobs, torch.tensor(tokens)), mixed


def test_an_event_reports_the_token_its_logprobs_and_the_policies_that_ran(llama_set):
    vocab, k = llama_set.vocab_size, len(llama_set.names)
    builder = EventBuilder(llama_set, max_context=256)
    one_hot = _seq(llama_set, 0, SamplingParams(max_new_tokens=4, top_logprobs=3),
                   {llama_set.names[1]: 1.0})  # fmt: skip
    blend = _seq(llama_set, 1, SamplingParams(max_new_tokens=4), None, 0.5)
    (first, second), mixed = _step(builder, [one_hot, blend], [40, 41], vocab, k + 1)
    assert (first.index, first.token_id, first.finish_reason) == (0, 40, None)
    assert first.logprob == pytest.approx(mixed[0, 40].item())
    assert (first.token_text, first.text) == ("", "")  # left to the stream's reader
    one_hot.stream.push(first)
    read = next(iter(one_hot.stream))  # the reader runs on the consumer's thread
    assert read.token_text == llama_set.tokenizer.decode([40]) == read.text
    assert [i for i, _ in first.top_logprobs] == [vocab - 1, vocab - 2, vocab - 3]
    assert second.top_logprobs == []  # it asked for none
    names = llama_set.names
    assert first.policy_logprobs == {
        names[0]: None, names[1]: pytest.approx(mixed[0, 40].item() - 1), names[2]: None
    }  # fmt: skip
    assert all(v is not None for v in second.policy_logprobs.values())  # every policy ran
    assert one_hot.token_ids[-1] == 40 and one_hot.generated == [40]


@pytest.mark.parametrize(
    ("sampling", "token", "reason"),
    [
        (SamplingParams(max_new_tokens=5, stop_token_ids=[33]), 33, "stop_sequence"),
        (SamplingParams(max_new_tokens=5), "eos", "eos_token"),
        (SamplingParams(max_new_tokens=5, ignore_eos=True), "eos", None),
        (SamplingParams(max_new_tokens=1), 33, "length"),
    ],
)
def test_finish_reasons(llama_set, sampling, token, reason):
    builder = EventBuilder(llama_set, max_context=256)
    seq = _seq(llama_set, 0, sampling)
    token_id = llama_set.eos_token_ids[0] if token == "eos" else token
    (event,), _ = _step(builder, [seq], [token_id], llama_set.vocab_size, 4)
    assert event.finish_reason == reason


def test_the_context_limit_ends_a_sequence(llama_set):
    builder = EventBuilder(llama_set, max_context=4)  # the prompt has 3 tokens
    seq = _seq(llama_set, 0, SamplingParams(max_new_tokens=50, ignore_eos=True))
    (event,), _ = _step(builder, [seq], [33], llama_set.vocab_size, 4)
    assert event.finish_reason == "length"


def test_the_reader_ends_the_reply_at_a_stop_string_and_cancels_the_sequence(llama_set):
    tok = llama_set.tokenizer
    cancels = []
    seq = _seq(llama_set, 0, SamplingParams(max_new_tokens=9, stop=["CD"]),
               on_cancel=lambda: cancels.append(True))  # fmt: skip
    builder = EventBuilder(llama_set, max_context=256)
    ids = [tok.convert_tokens_to_ids(t) for t in ("A", "C", "D", "E")]
    for token in ids:  # the engine thread knows nothing of stop strings
        (event,), _ = _step(builder, [seq], [token], llama_set.vocab_size, 4)
        assert event.finish_reason is None
        seq.stream.push(event)
    events = list(seq.stream)  # the reader stops at the event completing "CD"
    assert [e.finish_reason for e in events] == [None, None, "stop_sequence"]
    assert "".join(e.text for e in events) == "A"  # the stop string itself is never sent
    assert seq.stream.cancelled and cancels == [True]  # the engine drops the row next step
    assert seq.stream.finished


def test_a_closing_event_carries_no_token(llama_set):
    seq = _seq(llama_set, 0, SamplingParams(max_new_tokens=3))
    event = final_event(seq, "cancelled")
    assert (event.token_id, event.text, event.finish_reason) == (-1, "", "cancelled")
    assert event.index == 0 and math.isfinite(event.logprob)
