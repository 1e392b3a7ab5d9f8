import shutil

import pytest
import yaml

from mpo_core.config import load_config, parse_config
from mpo_core.errors import ConfigError
from mpo_core.runners import load_policy_set
from mpo_core.testing.families import make_tokenizer


def test_config_requires_a_policy():
    with pytest.raises(ConfigError, match="`policies`: a policy set needs at least one policy"):
        parse_config({"policies": []})


def test_config_rejects_duplicate_names():
    with pytest.raises(ConfigError, match="duplicate model name 'a'"):
        parse_config({"policies": [{"name": "a", "model": "x/y"}, {"name": "a", "model": "x/z"}]})
    with pytest.raises(ConfigError, match="duplicate model name 'a'"):
        parse_config(
            {"policies": [{"name": "a", "model": "x/y"}], "reference": {"name": "a", "model": "r"}}
        )


def test_config_rejects_unknown_fields_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="policis"):
        parse_config({"policis": []})
    bad = tmp_path / "bad.yaml"
    bad.write_text("policies: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_missing_model_path_names_the_policy(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"policies": [{"name": "helpful", "model": "./nowhere/model"}]}))
    with pytest.raises(
        ConfigError, match=r"policy 'helpful': model path './nowhere/model' does not exist"
    ):
        load_policy_set(load_config(path))


def test_relative_paths_resolve_against_the_yaml(llama_family):
    config = load_config(llama_family)
    assert config.policies[0].model == str(llama_family.parent / "helpful")
    assert config.reference is not None and config.reference.name == "base"


def test_padding_rows_are_truncated(llama_set):
    rows = llama_set.policies[0].model.get_output_embeddings().weight.shape[0]
    assert llama_set.vocab_size == len(llama_set.tokenizer)
    assert rows == llama_set.vocab_size + 8  # the fixture adds 8 padding rows
    assert llama_set.names == ["helpful", "harmless", "concise"]
    assert llama_set.reference_name == "base"
    assert llama_set.max_context == 256


def test_disagreeing_tokenizers_name_both_policies_and_the_token(tmp_path, llama_family):
    folder = tmp_path / "family"
    shutil.copytree(llama_family.parent, folder)
    # a tokenizer trained with fewer merges: the same ids up to 299, then nothing
    make_tokenizer(vocab_size=300).save_pretrained(folder / "harmless")
    with pytest.raises(ConfigError) as err:
        load_policy_set(load_config(folder / "policies.yaml"))
    message = str(err.value)
    assert "'helpful'" in message and "'harmless'" in message
    assert "token id 300 is" in message and "but None in 'harmless'" in message


def test_unreadable_tokenizer_is_a_config_error(tmp_path, llama_family):
    folder = tmp_path / "family"
    shutil.copytree(llama_family.parent, folder)
    (folder / "concise" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="policy 'concise': cannot load tokenizer"):
        load_policy_set(load_config(folder / "policies.yaml"))


def test_disagreeing_special_tokens_are_reported(tmp_path, llama_family):
    folder = tmp_path / "family"
    shutil.copytree(llama_family.parent, folder)
    config_file = folder / "concise" / "tokenizer_config.json"
    text = config_file.read_text().replace('"eos_token": "<|eos|>"', '"eos_token": "<|pad|>"')
    assert "<|pad|>" in text
    config_file.write_text(text)
    with pytest.raises(ConfigError, match="'concise'.*eos_token"):
        load_policy_set(load_config(folder / "policies.yaml"))
