"""Teacher-forced scoring (``mpo_core/runners/scoring.py``): the log-probability of each completion
under every model, summed over the completion's tokens only, the same in any chunking."""

import pytest
import torch

from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.runners.scoring import ScoreResult, score_sequences

PROMPT = "Could you please help me write a short poem?"


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


def _teacher_forced(model, prompt, completion, vocab):
    ids = torch.tensor([prompt + completion])
    logprobs = model(ids).logits[0, :-1, :vocab].float().log_softmax(-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked[len(prompt) - 1 :].sum().item()


def test_score_equals_direct_teacher_forcing(llama_set):
    tok = llama_set.tokenizer
    prompts = [tok.encode(PROMPT), tok.encode("hi"), tok.encode("Sure! Here is")]
    completions = [tok.encode(" a poem"), tok.encode(" there, friend."), tok.encode(" it")]
    with Engine(llama_set, EngineLimits(score_chunk_tokens=24)) as engine:  # forces 2+ chunks
        # a generation running meanwhile must not disturb scoring, nor scoring it
        stream = engine.submit(GenerationRequest(tok.encode(PROMPT), greedy(30)))
        result = engine.score(prompts, completions)
        assert len(list(stream)) == 30
    assert result.policy_logprobs.shape == (3, 3)
    assert result.reference_logprobs is not None
    models = [p.model for p in llama_set.policies]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        for k, model in enumerate(models):
            want = _teacher_forced(model, p, c, llama_set.vocab_size)
            assert result.policy_logprobs[i, k].item() == pytest.approx(want, abs=1e-4)
        want_ref = _teacher_forced(llama_set.reference.model, p, c, llama_set.vocab_size)
        assert result.reference_logprobs[i].item() == pytest.approx(want_ref, abs=1e-4)


def test_chunking_and_padding_do_not_change_the_scores(llama_set):
    """Short and long rows share a padded chunk: padding and prompts are masked out."""
    tok = llama_set.tokenizer
    prompts = [tok.encode("hi"), tok.encode(PROMPT), tok.encode("ok")]
    completions = [tok.encode(" there, my good friend."), tok.encode(" Sure"), tok.encode("!")]
    whole = score_sequences(llama_set, prompts, completions)  # one chunk
    rows = [score_sequences(llama_set, [p], [c]) for p, c in zip(prompts, completions)]
    small = score_sequences(llama_set, prompts, completions, chunk_tokens=8)  # a row a chunk
    alone = ScoreResult.concat(rows)
    for got in (small, alone):
        torch.testing.assert_close(got.policy_logprobs, whole.policy_logprobs, atol=1e-4, rtol=0)
        assert got.reference_logprobs is not None and whole.reference_logprobs is not None
        torch.testing.assert_close(
            got.reference_logprobs, whole.reference_logprobs, atol=1e-4, rtol=0
        )
    assert whole.policy_logprobs.shape == (3, len(llama_set.names))
    assert bool((whole.policy_logprobs < 0).all())  # log-probs of real tokens
