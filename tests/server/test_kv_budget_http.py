"""A request whose worst-case KV cache exceeds the server's whole budget is a 400."""

from __future__ import annotations

from fastapi.testclient import TestClient
from server_helpers import assert_error

from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.models.kv_budget import token_bytes
from mpo_core.models.kvcache import _capacity_for
from server.app import create_app


def test_a_request_over_the_kv_budget_is_a_400_naming_it(policy_set, make_settings) -> None:
    per_token = sum(token_bytes(m, policy_set.kv_dtype) for m in policy_set.policies)
    budget = _capacity_for(64) * per_token  # room for one uniform request of 64 tokens
    engine = Engine(policy_set, EngineLimits(kv_cache_bytes=budget)).start()
    try:
        with TestClient(create_app(make_settings(), engine=engine)) as client:
            ok = {"inputs": "Hi", "parameters": {"max_new_tokens": 8, "ignore_eos": True}}
            assert client.post("/generate", json=ok).status_code == 200
            big = {"inputs": "Hi", "parameters": {"max_new_tokens": 200}}
            response = client.post("/generate", json=big)
            assert_error(response, 400, param="max_new_tokens", text="KV cache budget")
    finally:
        engine.stop(timeout=5)
