"""Constrained decoding on the mixture: grammar rows obey, plain rows are untouched."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from mpo_core.decoding.grammar import GrammarCompiler, GrammarSpec, constrain
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import InvalidParameter
from mpo_core.models.policies import PolicySet
from mpo_core.testing.families import make_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}
WEIGHTS = [[1, 1, 1], [1, 0, 0], [0, 2, 1], [3, 1, 0], [0.2, 0.3, 0.5]]


def sampled(seed: int, max_new_tokens: int = 120, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, **kw)


def test_constrain_masks_the_grammar_rows_only():
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id])
    digits = compiler.compile(GrammarSpec("regex", "[0-9]+")).matcher()
    logprobs = torch.randn(3, vocab).log_softmax(dim=-1)  # [B, V]
    out = constrain(logprobs, [None, digits, None])  # [B, V]
    assert torch.equal(out[0], logprobs[0]) and torch.equal(out[2], logprobs[2])
    allowed = out[1].isfinite().nonzero().squeeze(-1).tolist()
    assert sorted(tokenizer.decode([t]) for t in allowed) == [str(d) for d in range(10)]
    assert torch.equal(out[1, allowed], logprobs[1, allowed])
    assert constrain(logprobs, [None, None, None]) is logprobs
    digits.advance(tokenizer.convert_tokens_to_ids("7"))  # now "7" is accepted: EOS may end it
    after = constrain(logprobs[:1], [digits])  # [1, V]
    assert after[0, tokenizer.eos_token_id].isfinite()


def test_uncompilable_grammars_name_their_parameter(engine: Engine):
    bad = [
        GrammarSpec("regex", "[0-9", param="grammar"),
        GrammarSpec("json_schema", {"type": "no-such-type"}, param="response_format"),
        GrammarSpec("json_schema", "{not json", param="response_format"),
        GrammarSpec("json_schema", [1, 2], param="grammar"),
    ]
    for spec in bad:
        with pytest.raises(InvalidParameter) as info:
            engine.compile_grammar(spec)
        assert info.value.param == spec.param


def test_a_grammar_with_ignore_eos_is_refused(engine: Engine, llama_set: PolicySet):
    grammar = engine.compile_grammar(GrammarSpec("json_object"))
    prompt = llama_set.tokenizer.encode("Hi")
    request = GenerationRequest(prompt, sampled(0, ignore_eos=True), grammar=grammar)
    with pytest.raises(InvalidParameter) as info:
        engine.submit(request)
    assert info.value.param == "ignore_eos"


def test_every_sampled_reply_validates_against_its_schema(engine: Engine, llama_set: PolicySet):
    grammar = engine.compile_grammar(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    prompt = llama_set.tokenizer.encode("Describe a person as JSON")
    streams = [
        engine.submit(
            GenerationRequest(
                prompt, sampled(seed), engine.mixture(WEIGHTS[seed % 5]), grammar=grammar
            )
        )
        for seed in range(20)
    ]
    replies = []
    for stream in streams:
        events = list(stream)
        assert events[-1].finish_reason == "eos_token"  # ended by the grammar, not the budget
        replies.append("".join(e.text for e in events))
    for reply in replies:
        jsonschema.validate(json.loads(reply), SCHEMA)
    assert len(set(replies)) > 10  # sampled, not one reply over and over


def test_regex_replies_fullmatch(engine: Engine, llama_set: PolicySet):
    pattern = r"(yes|no): [a-z]{2,5}-[0-9]{1,3}"
    grammar = engine.compile_grammar(GrammarSpec("regex", pattern))
    prompt = llama_set.tokenizer.encode("Answer")
    for seed in range(8):
        request = GenerationRequest(
            prompt, sampled(seed, 40), engine.mixture(WEIGHTS[seed % 5]), grammar=grammar
        )
        result = engine.generate(request)
        assert re.fullmatch(pattern, result.text), result.text
        assert result.finish_reason == "eos_token"


class BatchSizes:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def on_step(self, batch_size: int, forward_seconds: dict[str, float]) -> None:
        with self.lock:
            self.sizes.append(batch_size)


def test_a_plain_row_co_batched_with_grammar_rows_decodes_as_alone(llama_set: PolicySet):
    observer = BatchSizes()
    prompt = llama_set.tokenizer.encode("Tell me a story")
    plain = SamplingParams(max_new_tokens=24, temperature=1.0, seed=11, top_k=50, ignore_eos=True)
    with Engine(llama_set, EngineLimits(max_running=8), observer=observer) as engine:
        alone = engine.generate(GenerationRequest(prompt, plain)).token_ids
        grammar = engine.compile_grammar(GrammarSpec("json_schema", SCHEMA))
        # Grammar rows first: each needs far more than 24 tokens, so they run all along.
        rows = [
            engine.submit(GenerationRequest(prompt, sampled(s), grammar=grammar)) for s in range(4)
        ]
        together = engine.generate(GenerationRequest(prompt, plain)).token_ids
        for stream in rows:
            list(stream)
    assert together == alone
    assert max(observer.sizes) == 5  # the plain row did share steps with the four others
