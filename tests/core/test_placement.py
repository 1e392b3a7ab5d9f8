"""Placement per member: ``device:`` and ``dtype:`` on a policy or the reference, the
mixing device, and start-up errors that name the member and the device. On this CPU
machine every device is the CPU, so what is checked is the plumbing: each member lands
where and in the dtype its spec says, the log-probs meet on the mixing device in float32,
and a blend of members in different dtypes decodes and equals its members' own forwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mpo_core.config import parse_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import ConfigError
from mpo_core.models.kvcache import to_logprobs
from mpo_core.models.policies import PolicySet, device_of
from mpo_core.runners import all_models, load_policy_set, make_runner


def _raw(family: Path) -> dict[str, Any]:
    return yaml.safe_load(family.read_text())


def _load(raw: dict[str, Any], family: Path) -> PolicySet:
    return load_policy_set(parse_config(raw, base_dir=family.parent))


def test_each_member_lands_on_its_device_in_its_dtype(llama_family: Path) -> None:
    raw = _raw(llama_family)
    raw["policies"][1]["dtype"] = "bfloat16"
    raw["reference"]["device"] = "cpu"
    raw["reference"]["dtype"] = "bfloat16"
    raw["mixing_device"] = "cpu"
    ps = _load(raw, llama_family)
    dtypes = [next(m.model.parameters()).dtype for m in all_models(ps)]
    assert dtypes == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    assert all(device_of(m) == torch.device("cpu") for m in all_models(ps))
    assert ps.device == torch.device("cpu") and ps.dtype == torch.float32

    runner, _ = make_runner(ps, max_rows=4, max_context=ps.max_context)
    tokens = ps.tokenizer.encode("Could you help me?")

    class Row:
        sid, token_ids, coefs = 0, tokens, (0.3, 0.3, 0.2, 0.2)

    logprobs = runner.step([], [Row()]).logprobs  # [M, 1, V]
    assert logprobs.dtype == torch.float32 and logprobs.device == ps.device
    for m, loaded in enumerate(all_models(ps)):  # each member in its own dtype
        logits = loaded.model(torch.tensor([tokens])).logits
        want = to_logprobs(logits[:, -1], ps.vocab_size)[0]
        torch.testing.assert_close(logprobs[m, 0], want, atol=1e-4, rtol=1e-4)

    with Engine(ps, EngineLimits(max_running=2)) as engine:
        sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
        result = engine.generate(GenerationRequest(tokens, sampling, engine.mixture(None, 0.5)))
    assert 1 <= len(result.token_ids) <= 4  # decoded (or ended early on EOS), no failure


@pytest.mark.parametrize(
    ("where", "device", "message"),
    [
        ("reference", "cuda:3", "reference 'base': device 'cuda:3' was asked for"),
        ("policy", "cuda", "policy 'helpful': device 'cuda' was asked for"),
        ("policy", "meta", "policy 'helpful': device 'meta': only cpu and cuda"),
        ("policy", "gpu7", "policy 'helpful': device 'gpu7' is not a valid torch device"),
        ("mixing", "cuda:1", "mixing_device: device 'cuda:1' was asked for"),
    ],
)
def test_a_device_that_does_not_exist_is_named_with_its_member(
    llama_family: Path, where: str, device: str, message: str
) -> None:
    if torch.cuda.is_available():
        pytest.skip("the machine has CUDA: these devices may exist")
    raw = _raw(llama_family)
    if where == "reference":
        raw["reference"]["device"] = device
    elif where == "policy":
        raw["policies"][0]["device"] = device
    else:
        raw["mixing_device"] = device
    with pytest.raises(ConfigError) as err:
        _load(raw, llama_family)
    assert message in str(err.value)


def test_a_persona_or_adapter_member_has_no_device_of_its_own(tmp_path: Path) -> None:
    """Members of a one-model family are slots of the shared model: only the model itself
    is placed, and a member's ``device:`` is refused by name."""
    from mpo_core.testing.families import make_persona_family

    family = make_persona_family(tmp_path, True)
    raw = _raw(family)
    raw["policies"][0]["device"] = "cpu"
    with pytest.raises(ConfigError, match="device"):
        _load(raw, family)
