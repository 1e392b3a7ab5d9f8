"""Linear layers through oneDNN on CPU (mpo_core/models/cpu_linear.py): same numbers as torch's
kernels, only where they pay, never under autograd, and the policy-set setting."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from mpo_core.config import load_config
from mpo_core.models import cpu_linear
from mpo_core.runners import load_policy_set
from mpo_core.testing.families import make_tiny_family

pytestmark = pytest.mark.skipif(
    not cpu_linear.onednn_linear_available(), reason="this torch build has no oneDNN linear"
)


def _model() -> LlamaForCausalLM:
    """Layers big enough to be switched (512 x 512 and more) and some that are not (k, v)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The input shapes of every oneDNN linear call."""
    seen: list[tuple[int, ...]] = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(x: torch.Tensor, *args: Any) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    return seen


def test_decode_rows_run_on_onednn_and_equal_torchs_kernels(calls: list) -> None:
    plain = _model()
    fast = copy.deepcopy(plain)
    switched = cpu_linear.use_onednn_linears(fast)
    # q and o (512 x 512), gate/up/down (512 x 1024) per layer, and the head; k and v
    # (64 x 512) are below the size at which oneDNN pays.
    assert switched == 2 * 5 + 1
    assert cpu_linear.use_onednn_linears(fast) == 0  # idempotent
    assert cpu_linear.uses_onednn(fast) and not cpu_linear.uses_onednn(plain)
    ids = torch.randint(0, 1024, (3, 40))
    with torch.inference_mode():
        expected = plain(ids).logits
        got_prefill = fast(ids).logits  # 120 rows: a prefill stays on torch's kernels
        assert calls == []
        torch.testing.assert_close(got_prefill, expected, rtol=0, atol=0)
        step = ids[:, -1:]  # 3 rows, as a decode step of 3 slots
        expected_step = plain(step).logits
        got_step = fast(step).logits
    assert len(calls) == switched and all(shape[:-1] == (3, 1) for shape in calls)
    torch.testing.assert_close(got_step, expected_step, rtol=1e-4, atol=1e-4)


def test_autograd_falls_back_to_torchs_kernels(calls: list) -> None:
    fast = _model()
    cpu_linear.use_onednn_linears(fast)
    fast.requires_grad_(True)
    loss = fast(torch.randint(0, 1024, (2, 3))).logits.logsumexp(-1).sum()
    loss.backward()
    assert calls == []
    assert fast.lm_head.weight.grad is not None


def _policy_set(tmp_path: Path, **extra: Any) -> Any:
    path = make_tiny_family(tmp_path, num_policies=1, with_reference=False)
    body = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**body, "device": "cpu", **extra}))
    return load_policy_set(load_config(path))


def test_the_setting_switches_a_policy_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny test model's layers are below the size at which oneDNN pays; lower it.
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 1)
    on = _policy_set(tmp_path / "on", cpu_linear="onednn")
    assert cpu_linear.uses_onednn(on.policies[0].model)
    off = _policy_set(tmp_path / "off", cpu_linear="torch")
    assert not cpu_linear.uses_onednn(off.policies[0].model)
    in_bf16 = _policy_set(tmp_path / "bf16", dtype="bfloat16", cpu_linear="onednn")
    assert not cpu_linear.uses_onednn(in_bf16.policies[0].model)


@pytest.mark.parametrize("faster", ["torch", "onednn"])
def test_auto_keeps_the_kernels_it_timed_faster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, faster: str
) -> None:
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 1)
    asked: list[tuple[int, bool]] = []

    def timed(model: Any, rows: int, pack: bool) -> dict[str, float]:
        asked.append((rows, pack))
        return {"torch": 1.0, "onednn": 2.0} if faster == "torch" else {"torch": 2.0, "onednn": 1.0}

    monkeypatch.setattr(cpu_linear, "time_kernels", timed)
    auto = _policy_set(tmp_path / "auto")
    assert cpu_linear.uses_onednn(auto.policies[0].model) == (faster == "onednn")
    assert asked == [(1, False)]  # a full family: one row a request, dense weights
    from mpo_core.testing.families import make_persona_family

    personas = load_policy_set(load_config(make_persona_family(tmp_path / "personas")))
    assert asked[1:] == [(3, True)]  # one row per persona, on packed copies
    packed = cpu_linear.packed_layers(personas.reference.model) > 0
    assert packed == (faster == "onednn")


def test_auto_keeps_torch_near_a_tie(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 1)
    monkeypatch.setattr(
        cpu_linear, "time_kernels", lambda *args: {"torch": 1.0, "onednn": 0.95}
    )  # oneDNN 5% faster in the sample: within the margin
    assert not cpu_linear.uses_onednn(_policy_set(tmp_path).policies[0].model)


def test_time_kernels_times_both_on_the_models_layers() -> None:
    model = _model()
    for pack in (False, True):
        times = cpu_linear.time_kernels(model, rows=3, pack=pack)
        assert set(times) == {"torch", "onednn"} and all(t > 0 for t in times.values())
    assert cpu_linear.packed_layers(model) == 0  # the timing packs copies, not the model
    assert not cpu_linear.uses_onednn(model)
    tiny = torch.nn.Sequential(torch.nn.Linear(8, 8))  # nothing oneDNN would take
    assert cpu_linear.time_kernels(tiny, rows=3, pack=False) == {}


def test_packed_layers_drop_the_dense_weight_and_equal_torchs_kernels(calls: list) -> None:
    plain = _model()
    packed = copy.deepcopy(plain)
    elements = cpu_linear.weight_elements(plain)
    dense_elements = sum(p.numel() for p in packed.parameters())
    assert cpu_linear.pack_onednn_linears(packed) == 2 * 5 + 1
    assert cpu_linear.pack_onednn_linears(packed) == 0  # idempotent
    assert cpu_linear.use_onednn_linears(packed) == 0  # already on oneDNN, no second patch
    assert cpu_linear.packed_layers(packed) == 11 and cpu_linear.uses_onednn(packed)
    assert "weight" not in packed.lm_head._parameters  # untied: the dense copy is gone
    assert cpu_linear.weight_elements(packed) == elements
    assert sum(p.numel() for p in packed.parameters()) < dense_elements
    ids = torch.randint(0, 1024, (3, 40))
    with torch.inference_mode():
        expected, got = plain(ids).logits, packed(ids).logits
        assert len(calls) == 11  # a prefill runs on the packed weights too
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        step = ids[:, -1:]
        torch.testing.assert_close(packed(step).logits, plain(step).logits, rtol=1e-4, atol=1e-4)
    assert len(calls) == 22


def test_a_tied_weight_keeps_its_dense_copy() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    plain = LlamaForCausalLM(config).eval()
    packed = copy.deepcopy(plain)
    cpu_linear.pack_onednn_linears(packed)
    head = packed.lm_head
    assert cpu_linear.packed_layers(head) == 1
    assert head.weight is packed.model.embed_tokens.weight  # the embedding still reads it
    ids = torch.randint(0, 1024, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_packed_layer_under_autograd_runs_torchs_kernels(calls: list) -> None:
    model = _model()
    cpu_linear.pack_onednn_linears(model)
    model.requires_grad_(True)  # the embedding's gradient flows through every packed layer
    loss = model(torch.randint(0, 1024, (2, 3))).logits.logsumexp(-1).sum()
    loss.backward()
    assert calls == []
    assert model.model.embed_tokens.weight.grad is not None


def test_a_persona_family_is_packed_and_other_families_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpo_core.testing.families import make_persona_family

    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_ELEMENTS", 1)
    path = make_persona_family(tmp_path / "personas")
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "cpu_linear": "onednn"}))
    personas = load_policy_set(load_config(path))
    assert cpu_linear.packed_layers(personas.reference.model) > 0
    full = _policy_set(tmp_path / "full", cpu_linear="onednn")
    assert cpu_linear.uses_onednn(full.policies[0].model)
    assert cpu_linear.packed_layers(full.policies[0].model) == 0  # soups average its weights
