"""The real demo's persona family (SmolLM2-135M-Instruct and three system prompts)
against separately prompted transformers runs of the same model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mpo_core.config import load_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.demo.real import REAL_PERSONAS, REFERENCE
from mpo_core.engine.core import Engine, GenerationRequest
from mpo_core.models.cpu_linear import onednn_linear_available, packed_layers
from mpo_core.models.kvcache import to_logprobs
from mpo_core.models.policies import PolicySet
from mpo_core.runners import PersonaRunner, load_policy_set

pytestmark = pytest.mark.real

QUESTION = "How do I keep houseplants healthy?"


@pytest.fixture(scope="module")
def personas(smollm2: Path, real_home: Path, tmp_path_factory: pytest.TempPathFactory) -> PolicySet:
    config = {
        "reference": {"name": REFERENCE, "model": str(smollm2)},
        "policies": [
            {"name": name, "persona": REFERENCE, "system": system}
            for name, system in REAL_PERSONAS.items()
        ],
        "device": "cpu",
        "dtype": "float32",
        "cpu_linear": "onednn",  # packed weights, checked against `plain_model`
        "backend": "transformers",  # the persona backend (llama.cpp: tests/core/test_llama_cpp.py)
    }
    path = tmp_path_factory.mktemp("real-personas") / "policy_set.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_policy_set(load_config(path))


@pytest.fixture(scope="module")
def plain_model(reference_dir: Path) -> torch.nn.Module:
    """The same weights, loaded apart and left dense on torch's default kernels: the
    served family's one model runs on weights packed for oneDNN (``mpo_core.cpu_linear``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(reference_dir), dtype=torch.float32).eval()


def test_the_persona_model_runs_on_packed_weights(personas: PolicySet) -> None:
    model = personas.reference.model  # type: ignore[union-attr]
    assert (packed_layers(model) > 0) == onednn_linear_available()


def _ids(ps: PolicySet, system: str | None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": QUESTION})
    text = ps.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(ps.tokenizer.encode(text, add_special_tokens=False))


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def test_each_persona_decodes_what_its_prompted_model_decodes(
    personas: PolicySet, plain_model: torch.nn.Module
) -> None:
    model: Any = plain_model
    plain = _ids(personas, None)
    with Engine(personas) as engine:
        assert isinstance(engine.runner, PersonaRunner)
        for name in [*REAL_PERSONAS, REFERENCE]:
            prompt = _ids(personas, REAL_PERSONAS.get(name))
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[
                0, len(prompt) :
            ].tolist()
            mixture = engine.mixture(None, 0.0) if name == REFERENCE else engine.mixture({name: 1})
            got = engine.generate(GenerationRequest(plain, _greedy(12), mixture))
            assert got.token_ids == expected, name


@torch.inference_mode()
def test_a_mixture_of_personas_equals_the_prompted_mixture(
    personas: PolicySet, plain_model: torch.nn.Module
) -> None:
    model: Any = plain_model
    names = [*REAL_PERSONAS, REFERENCE]
    prompts = [_ids(personas, REAL_PERSONAS.get(name)) for name in names]
    with Engine(personas) as engine:
        mixture = engine.mixture({"polite": 0.5, "upbeat": 0.3, "concise": 0.2}, 0.6)
        got = engine.generate(GenerationRequest(_ids(personas, None), _greedy(6), mixture))
    tokens: list[int] = []
    for event in got.events:
        mixed = sum(
            coef
            * to_logprobs(model(torch.tensor([p + tokens])).logits[:, -1], personas.vocab_size)[0]
            for p, coef in zip(prompts, mixture.coefficients)
        ).log_softmax(-1)  # [V]
        token = int(mixed.argmax())
        assert event.token_id == token
        assert event.logprob == pytest.approx(float(mixed[token]), abs=1e-4)
        tokens.append(token)
