"""The KV-cache memory budget: worst-case cost per request, admission, static sizing."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import yaml
from transformers import DynamicCache

from mpo_core.config import parse_config
from mpo_core.decoding.sampling import SamplingParams
from mpo_core.engine.core import Engine, EngineLimits, GenerationRequest
from mpo_core.errors import InvalidParameter
from mpo_core.models.kv_budget import KVBudget, available_memory, token_bytes
from mpo_core.models.kvcache import _capacity_for
from mpo_core.runners import load_policy_set

PROMPT = "Could you please help me write a short poem?"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def test_token_bytes_is_what_a_real_cache_holds(llama_set, gpt2_set):
    for policy_set in (llama_set, gpt2_set):
        loaded = policy_set.policies[0]
        ids = torch.tensor([policy_set.tokenizer.encode(PROMPT)])  # [1, S]
        cache = DynamicCache()
        with torch.no_grad():
            loaded.model(input_ids=ids, use_cache=True, **{loaded.cache_kwarg: cache})
        held = sum(
            layer.keys.numel() * layer.keys.element_size()
            + layer.values.numel() * layer.values.element_size()
            for layer in cache.layers
        )
        assert token_bytes(loaded, torch.float32) * ids.shape[1] == held
        assert token_bytes(loaded, torch.float16) * 2 == token_bytes(loaded, torch.float32)


def test_worst_case_counts_the_models_a_mixture_runs_and_pads_a_batch():
    separate = KVBudget(10**9, [100, 100, 10], [[0], [1], [2]], growing=True)
    one_hot, both, with_ref = (1.0, 0.0, 0.0), (0.5, 0.5, 0.0), (0.25, 0.25, 0.5)
    cap = _capacity_for
    assert separate.worst_case([(one_hot, 40)]) == cap(40) * 100
    assert separate.worst_case([(both, 40)]) == cap(40) * 200
    assert separate.worst_case([(with_ref, 40)]) == cap(40) * 210
    # model 0's batch pads the short row to the long one; model 1 holds only the long one
    rows = [(one_hot, 10), (both, 300)]
    assert separate.worst_case(rows) == 2 * cap(300) * 100 + cap(300) * 100
    # an adapter family: one batch of slots over the base, padded across its models
    shared = KVBudget(10**9, [100, 100, 100], [[0, 1, 2]], growing=True)
    assert shared.worst_case(rows) == 3 * cap(300) * 100
    assert separate.tokens == 10**9 // 210
    assert separate.static_len(slots=4, context=256) == 256
    assert KVBudget(4 * 210 * 50, [100, 100, 10], [[0]], True).static_len(4, 256) == 50


def test_available_memory_is_positive_and_below_the_total():
    total = None
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    free = available_memory(torch.device("cpu"))
    assert free > 0 and (total is None or free <= total)


class HoldFirstStep:
    """Holds the engine thread after its first step until ``release`` is set; records
    every step's batch size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.reached = threading.Event()
        self.release = threading.Event()

    def on_step(self, batch_size, forward_seconds):
        self.sizes.append(batch_size)
        if len(self.sizes) == 1:
            self.reached.set()
            assert self.release.wait(timeout=60)


def _two_requests(policy_set, budget_bytes):
    """A and B (30 tokens each); B is submitted while A is running."""
    ids = policy_set.tokenizer.encode(PROMPT)
    gate = HoldFirstStep()
    limits = EngineLimits(max_running=4, kv_cache_bytes=budget_bytes)
    with Engine(policy_set, limits, observer=gate) as engine:
        mixture = engine.mixture({policy_set.names[0]: 1.0})
        a = engine.submit(GenerationRequest(ids, greedy(30), mixture))
        assert gate.reached.wait(timeout=60)
        b = engine.submit(GenerationRequest(ids, greedy(30), mixture))
        gate.release.set()
        assert len(list(a)) == 30 and len(list(b)) == 30
    return gate.sizes


def test_a_request_waits_until_its_worst_case_cache_fits(llama_set):
    ids = llama_set.tokenizer.encode(PROMPT)
    one = token_bytes(llama_set.policies[0], llama_set.kv_dtype)
    alone = _capacity_for(len(ids) + 30) * one  # one request on one model
    assert max(_two_requests(llama_set, budget_bytes=4 * alone)) == 2  # B joins A
    sizes = _two_requests(llama_set, budget_bytes=alone)  # room for one only
    assert max(sizes) == 1 and len(sizes) == 60  # B ran after A, alone


def test_a_request_that_can_never_fit_is_refused_naming_the_limit(llama_set):
    ids = llama_set.tokenizer.encode(PROMPT)
    one = token_bytes(llama_set.policies[0], llama_set.kv_dtype)
    limits = EngineLimits(kv_cache_bytes=_capacity_for(len(ids) + 30) * one)
    with Engine(llama_set, limits) as engine:
        fits = engine.mixture({llama_set.names[0]: 1.0})
        assert len(engine.generate(GenerationRequest(ids, greedy(30), fits)).token_ids) == 30
        with pytest.raises(InvalidParameter, match="KV cache budget") as info:
            engine.submit(GenerationRequest(ids, greedy(30), engine.mixture()))  # 3 models
        assert info.value.param == "max_new_tokens"
        with pytest.raises(InvalidParameter, match="KV cache budget"):
            engine.submit(GenerationRequest(ids, greedy(60), fits))  # longer
        assert engine.stats().waiting == 0


def test_the_budget_is_logged_and_sizes_static_caches(llama_family, caplog):
    raw = yaml.safe_load(llama_family.read_text())
    raw["static_cache"] = "on"  # static on CPU too (no graphs)
    policy_set = load_policy_set(parse_config(raw, base_dir=llama_family.parent))
    per_request = sum(
        token_bytes(m, policy_set.kv_dtype) for m in (*policy_set.policies, policy_set.reference)
    )
    with caplog.at_level(logging.INFO, logger="mpo_core"):
        engine = Engine(policy_set, EngineLimits(max_running=2, kv_cache_bytes=per_request * 200))
    assert engine.max_context == 100  # 200 tokens of budget over 2 slots
    assert any("KV cache budget" in r.message and "200 tokens" in r.message for r in caplog.records)
    roomy = Engine(policy_set, EngineLimits(max_running=2, kv_cache_bytes=per_request * 10**6))
    assert roomy.max_context == policy_set.max_context  # the model's context, not a fixed cap
