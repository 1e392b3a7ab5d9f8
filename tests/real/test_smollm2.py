"""SmolLM2-135M-Instruct served from its GGUF file: loading, chat, exact mixing, unicode,
and a prompt at the edge of the model's 8,192-token context."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from mpo_core.models.cpu_linear import onednn_linear_available, uses_onednn
from mpo_core.models.policies import PolicySet

pytestmark = pytest.mark.real

IM_END = "<|im_end|>"


def _chat_ids(tokenizer, content: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_the_gguf_file_loads_with_its_tokenizer_and_dequantised_weights(
    smollm2: Path, single_set: PolicySet, real_home: Path
) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tokenizer = single_set.tokenizer
    assert single_set.vocab_size == 49152
    assert single_set.max_context == 8192
    assert tokenizer.eos_token == IM_END
    assert single_set.eos_token_ids == [tokenizer.convert_tokens_to_ids(IM_END)]
    assert "<|im_start|>" in tokenizer.chat_template
    # The weights are the file's blocks, dequantised by the gguf package itself.
    reader = GGUFReader(str(smollm2))
    tensors = {t.name: t for t in reader.tensors}
    model = single_set.policies[0].model
    for gguf_name, weight in (
        ("blk.3.attn_v.weight", model.model.layers[3].self_attn.v_proj.weight),
        ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight),
        ("token_embd.weight", model.model.embed_tokens.weight),
    ):
        tensor = tensors[gguf_name]
        expected = dequantize(tensor.data, tensor.tensor_type)  # [out, in]
        np.testing.assert_array_equal(weight.detach().numpy(), expected)
    copies = [p.name for p in (real_home / "gguf").iterdir()]
    assert len(copies) == 1 and copies[0].startswith(f"{smollm2.stem}-")  # one cached copy


def test_chat_uses_the_template_and_stops_at_im_end(
    single_client: TestClient, single_set: PolicySet
) -> None:
    question = "What is the capital of France?"
    response = single_client.post(
        "/v1/chat/completions",
        json={
            "model": single_set.served_name,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 96,
            "temperature": 0,
        },
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    # transformers' own greedy decoding of the same chat, stopping at <|im_end|>
    tokenizer = single_set.tokenizer
    prompt = _chat_ids(tokenizer, question)
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)
    out = (
        single_set.policies[0]
        .model.generate(torch.tensor([prompt]), max_new_tokens=96, do_sample=False)[
            0, len(prompt) :
        ]
        .tolist()
    )
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    assert eos in out, "the reference reply should end within 96 tokens"
    expected = tokenizer.decode(out[: out.index(eos)], skip_special_tokens=True)
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == expected
    assert IM_END not in choice["message"]["content"] and expected.strip()


def _independent_mixture(family: PolicySet, ids: list[int], weights, strength, steps):
    """Greedy decoding of the mixture, each model run on the whole sequence every step."""
    vocab = family.vocab_size
    lam = torch.tensor(weights) / sum(weights)  # [K]
    assert family.reference is not None
    tokens, logprobs, policy_logprobs = [], [], []
    seq = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            per_model = [
                m.model(input_ids=torch.tensor([seq])).logits[0, -1, :vocab].float().log_softmax(-1)
                for m in (*family.policies, family.reference)
            ]  # K+1 x [V]
        policies = torch.stack(per_model[:-1])  # [K, V]
        mixed = strength * (lam[:, None] * policies).sum(0) + (1 - strength) * per_model[-1]
        mixed = mixed.log_softmax(-1)  # [V]
        token = int(mixed.argmax())
        tokens.append(token)
        logprobs.append(float(mixed[token]))
        policy_logprobs.append([float(p[token]) for p in policies])
        seq.append(token)
    return tokens, logprobs, policy_logprobs


def test_the_served_mixture_matches_an_independent_computation(
    family_client: TestClient, family_set: PolicySet
) -> None:
    prompt = (
        "<|im_start|>user\nGive me one tip for cooking rice.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = family_set.tokenizer.encode(prompt)
    names = family_set.names
    # The served decode steps (one row) run the linear layers on oneDNN; the computation
    # below runs the whole sequence (more than cpu_linear.MAX_ROWS rows) on torch's MKL
    # kernels, so this compares the two on the real model.
    assert uses_onednn(family_set.policies[0].model) == onednn_linear_available()
    # Extrapolation past the policies, and a pull to the reference with one policy off.
    for weights, strength in (([1.0, 3.0], 1.5), ([0.0, 1.0], 0.5)):
        body = {
            "inputs": prompt,
            "parameters": {
                "max_new_tokens": 8,
                "details": True,
                "ignore_eos": True,
                "weights": dict(zip(names, weights)),
                "strength": strength,
            },
        }
        response = family_client.post("/generate", json=body)
        assert response.status_code == 200, response.text
        served = response.json()["details"]["tokens"]
        tokens, logprobs, per_policy = _independent_mixture(family_set, ids, weights, strength, 8)
        assert [t["id"] for t in served] == tokens, (weights, strength)
        np.testing.assert_allclose([t["logprob"] for t in served], logprobs, atol=1e-4)
        for token, expected in zip(served, per_policy):
            for name, weight, value in zip(names, weights, expected):
                if weight > 0:  # a policy with weight 0 need not run
                    assert token["policy_logprobs"][name] == pytest.approx(value, abs=1e-4)


def test_emoji_and_cjk_round_trip(single_client: TestClient, single_set: PolicySet) -> None:
    content = "Translate to Chinese: good morning 🌅 (早上好?)"
    request = {
        "model": single_set.served_name,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 24,
        "temperature": 0,
    }
    whole = single_client.post("/v1/chat/completions", json=request)
    assert whole.status_code == 200, whole.text
    text = whole.json()["choices"][0]["message"]["content"]
    prompt = _chat_ids(single_set.tokenizer, content)
    assert whole.json()["usage"]["prompt_tokens"] == len(prompt)  # the prompt's bytes intact
    out = (
        single_set.policies[0]
        .model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[
            0, len(prompt) :
        ]
        .tolist()
    )
    assert text == single_set.tokenizer.decode(out, skip_special_tokens=True)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # the reply has CJK characters

    pieces = []
    with single_client.stream(
        "POST", "/v1/chat/completions", json={**request, "stream": True}
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    pieces.append(choice["delta"].get("content") or "")
    assert "".join(pieces) == text
    # A chunk never ends inside a character; only a reply cut mid-character (by
    # max_tokens) may end with the replacement character, as the decoder gives it.
    assert all("\ufffd" not in piece for piece in pieces[:-1] if piece)


def test_a_prompt_at_the_context_limit(single_client: TestClient, single_set: PolicySet) -> None:
    limit = single_set.max_context
    words = " ".join(["rice"] * limit)
    ids = single_set.tokenizer.encode(words)[: limit - 4]
    inputs = single_set.tokenizer.decode(ids)
    assert len(single_set.tokenizer.encode(inputs)) == limit - 4
    body = {
        "inputs": inputs,
        "parameters": {"max_new_tokens": 4, "ignore_eos": True, "details": True},
    }
    response = single_client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    assert details["generated_tokens"] == 4 and details["finish_reason"] == "length"

    body["parameters"]["max_new_tokens"] = 5  # one past the context: refused, named
    response = single_client.post("/generate", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert "8192" in json.dumps(error)
