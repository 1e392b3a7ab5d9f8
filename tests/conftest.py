"""Shared fixtures: tiny policy families saved to disk and loaded through the real path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mpo_core.config import load_config
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.models.policies import PolicySet
from mpo_core.runners import load_policy_set
from mpo_core.testing.families import make_tiny_family


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """A llama.cpp runner puts torch on one thread for its whole process
    (runners/llama_context.py); the tests after it get the count they started with."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_family(tmp_path_factory.mktemp("llama"), arch="llama", num_policies=3)


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_family(tmp_path_factory.mktemp("gpt2"), arch="gpt2", num_policies=2)


@pytest.fixture(scope="session")
def no_reference_family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_family(tmp_path_factory.mktemp("noref"), num_policies=2, with_reference=False)


@pytest.fixture(scope="session")
def llama_set(llama_family: Path) -> PolicySet:
    return load_policy_set(load_config(llama_family))


@pytest.fixture(scope="session")
def gpt2_set(gpt2_family: Path) -> PolicySet:
    return load_policy_set(load_config(gpt2_family))


@pytest.fixture(scope="session")
def policy_sets(llama_set: PolicySet, gpt2_set: PolicySet) -> dict[str, PolicySet]:
    return {"llama": llama_set, "gpt2": gpt2_set}


@pytest.fixture()
def engine(llama_set: PolicySet):
    """A started engine on the tiny Llama family, stopped after the test."""
    eng = Engine(llama_set, EngineLimits(max_running=8, max_queued=16)).start()
    yield eng
    eng.stop(timeout=5)


@pytest.fixture(scope="session")
def llama_set_f16_cache(llama_family: Path) -> PolicySet:
    """The tiny Llama family again, its KV cache stored in float16 under float32 weights."""
    import yaml

    from mpo_core.config import parse_config

    raw = yaml.safe_load(llama_family.read_text())
    raw["kv_cache_dtype"] = "float16"
    return load_policy_set(parse_config(raw, base_dir=llama_family.parent))
