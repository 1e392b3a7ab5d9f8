"""An adapter family served over HTTP agrees with the same adapters merged into full models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import ClientFactory

from mpo_core.config import load_config
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.runners import load_policy_set
from mpo_core.testing.lora import AdapterFamilyPaths, LoraShape, make_adapter_family

SHAPES = [
    LoraShape(r=4, alpha=8, targets="attention"),
    LoraShape(r=8, alpha=4, targets="mlp"),
    LoraShape(r=2, alpha=16, targets="all"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> AdapterFamilyPaths:
    return make_adapter_family(tmp_path_factory.mktemp("lora_http"), SHAPES)


@pytest.fixture(scope="module")
def engines(paths: AdapterFamilyPaths) -> Iterator[tuple[Engine, Engine]]:
    limits = EngineLimits(max_running=8, max_queued=16)
    adapters = Engine(load_policy_set(load_config(paths.adapters_yaml)), limits).start()
    merged = Engine(load_policy_set(load_config(paths.merged_yaml)), limits).start()
    yield adapters, merged
    adapters.stop(timeout=5)
    merged.stop(timeout=5)


def _details(client: TestClient, **parameters: object) -> dict:
    body = {"inputs": "Could you please help me?", "parameters": parameters}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["details"]


@pytest.mark.parametrize(
    ("weights", "strength"),
    [({"helpful": 1.0}, 1.0), ({"harmless": 0.3, "concise": 0.7}, 0.6), (None, 0.5)],
)
def test_served_adapter_family_agrees_with_merged_family(
    make_client: ClientFactory,
    engines: tuple[Engine, Engine],
    weights: dict[str, float] | None,
    strength: float,
    tmp_path: Path,
) -> None:
    adapters = make_client(engines[0], data_dir=tmp_path / "a")
    merged = make_client(engines[1], data_dir=tmp_path / "m")
    params = dict(max_new_tokens=8, details=True, top_n_tokens=3, ignore_eos=True)
    params.update(strength=strength, **({"weights": weights} if weights else {}))
    got, want = _details(adapters, **params), _details(merged, **params)
    assert [t["id"] for t in got["tokens"]] == [t["id"] for t in want["tokens"]]
    for g, w in zip(got["tokens"], want["tokens"], strict=True):
        assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-4)
        assert g["policy_logprobs"].keys() == w["policy_logprobs"].keys()
        for name, value in g["policy_logprobs"].items():
            assert (value is None) == (w["policy_logprobs"][name] is None)
            if value is not None:
                assert value == pytest.approx(w["policy_logprobs"][name], abs=1e-4)
    for g_top, w_top in zip(got["top_tokens"], want["top_tokens"], strict=True):
        assert [t["id"] for t in g_top] == [t["id"] for t in w_top]
    info = adapters.get("/info").json()
    assert info["reference"] == "base"  # the base with the adapters off
    listed = info["adapters"]
    assert [a["name"] for a in listed] == ["helpful", "harmless", "concise"]
    assert [(a["rank"], a["alpha"]) for a in listed] == [(s.r, s.alpha) for s in SHAPES]
    assert all(a["target_modules"] and a["source"] for a in listed)
