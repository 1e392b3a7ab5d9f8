"""The demo family built as LoRA adapters of its reference (``mpo demo build --adapters``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpo_core.config import load_config
from mpo_core.demo import build_demo
from mpo_core.demo.build import family_dir
from mpo_core.engine.core import Engine, GenerationRequest
from mpo_core.runners import AdapterRunner, load_policy_set
from mpo_core.runners.scoring import score_sequences


@pytest.fixture(scope="module")
def adapter_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    return Path(build_demo(home=home, variant="small", seed=0, progress=False, adapters=True))


def test_adapter_demo_is_an_adapter_family_of_its_reference(adapter_demo: Path) -> None:
    config = load_config(adapter_demo)
    assert config.is_adapter_family and config.reference is None
    assert config.base is not None and config.base.name == "base"
    assert config.policy_names == ["polite", "concise", "upbeat"]
    meta = json.loads((adapter_demo.parent / "recipe.json").read_text())
    assert meta["adapters"]["rank"] > 0
    for name in config.policy_names:  # adapters, not full models
        assert (adapter_demo.parent / name / "adapter_config.json").is_file()
        assert not (adapter_demo.parent / name / "config.json").exists()
    home = adapter_demo.parent.parent.parent
    assert adapter_demo.parent == family_dir(home, "small", 0, adapters=True)
    assert family_dir(home, "small", 0) != adapter_demo.parent  # the full family's folder


def test_adapter_demo_serves_and_its_adapters_moved(adapter_demo: Path) -> None:
    policy_set = load_policy_set(load_config(adapter_demo))
    ids = policy_set.tokenizer.encode("Hello, how are you?")
    scores = score_sequences(policy_set, [ids[:3]], [ids[3:]])
    assert scores.reference_logprobs is not None
    moved = (scores.policy_logprobs[0] - scores.reference_logprobs[0]).abs()  # [K]
    assert bool((moved > 1e-3).all()), "a fine-tuned adapter left the reference unchanged"
    with Engine(policy_set) as engine:
        assert isinstance(engine.runner, AdapterRunner)
        result = engine.generate(GenerationRequest(ids, mixture=engine.mixture(None, 0.5)))
    assert result.token_ids and torch.isfinite(torch.tensor(result.events[0].logprob))


def test_cli_demo_build_adapters_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from server import cli

    calls: list[dict[str, object]] = []

    def fake_build_demo(**kwargs: object) -> Path:
        calls.append(kwargs)
        return tmp_path / "policy_set.yaml"

    monkeypatch.setenv("MPO_HOME", str(tmp_path))
    monkeypatch.setattr("mpo_core.demo.build_demo", fake_build_demo)
    assert cli.main(["demo", "build", "--adapters", "--seed", "3"]) == 0
    assert calls == [{"home": tmp_path, "seed": 3, "adapters": True}]
