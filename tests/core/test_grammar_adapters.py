"""Grammars and prompt log-probs on an adapter family: as on its merged twin."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from mpo_core.config import load_config
from mpo_core.decoding.grammar import GrammarSpec
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.runners import load_policy_set
from mpo_core.testing.lora import LoraShape, make_adapter_family

SCHEMA = {
    "type": "object",
    "properties": {"word": {"type": "string", "maxLength": 5}, "n": {"type": "integer"}},
    "required": ["word", "n"],
    "additionalProperties": False,
}


def test_adapter_family_constrains_and_scores_like_its_merged_twin(tmp_path: Path) -> None:
    shapes = [LoraShape(r=4, alpha=8, targets="attention"), LoraShape(r=2, alpha=4, targets="mlp")]
    paths = make_adapter_family(tmp_path, shapes)
    results = {}
    for label, yaml in (("adapters", paths.adapters_yaml), ("merged", paths.merged_yaml)):
        policy_set = load_policy_set(load_config(yaml))
        with Engine(policy_set, EngineLimits(max_running=4)) as engine:
            grammar = engine.compile_grammar(GrammarSpec("json_schema", SCHEMA))
            prompt = policy_set.tokenizer.encode("Give me JSON")
            mixture = engine.mixture([2, 1], 0.7)
            params = SamplingParams(max_new_tokens=60, temperature=0.0)
            streams = [
                engine.submit(GenerationRequest(prompt, params, mixture, grammar=grammar))
                for _ in range(2)
            ]
            replies = ["".join(e.text for e in stream) for stream in streams]
            scored = engine.prompt_logprobs(prompt, mixture).result().logprobs
        for reply in replies:
            jsonschema.validate(json.loads(reply), SCHEMA)
        results[label] = (replies, scored)
    assert results["adapters"][0] == results["merged"][0]
    assert results["adapters"][1][1:] == pytest.approx(results["merged"][1][1:], abs=1e-4)
