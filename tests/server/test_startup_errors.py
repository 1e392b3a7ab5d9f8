"""A policy set that cannot be served stops ``mpo serve`` with one readable line.

Each case runs ``python -m server serve --config bad.yaml`` as a user would: the exit code
is not zero, stderr names the policy and the fix, and no traceback is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpo_core.testing.gguf import write_tiny_gguf
from mpo_core.testing.lora import LoraShape, make_adapter_family

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

CASES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown field": (
        {"policies": [{"name": "helpful", "modle": "fam/base"}]},
        "policy 'helpful': unknown field `modle`",
    ),
    "wrong path": (
        {"policies": [{"name": "helpful", "model": "./nowhere"}]},
        "policy 'helpful': model path './nowhere' does not exist (a relative path is taken "
        "from the policy-set YAML's folder)",
    ),
    "gguf architecture": (
        {"backend": "transformers", "policies": [{"name": "helpful", "model": "odd.gguf"}]},
        "has architecture 'rwkv6', which transformers cannot load from GGUF",
    ),
    "peft base mismatch": (
        {
            "base": {"name": "base", "model": "fam/base"},
            "policies": [{"name": "helpful", "adapter": "other_lora"}],
        },
        "adapter 'helpful' was trained on 'someone/else-1B', but the family's base 'base'",
    ),
    "hub id offline": (
        {"policies": [{"name": "helpful", "model": "nobody-mpo/not-cached"}]},
        "policy 'helpful': hub model 'nobody-mpo/not-cached' is not in the local hub cache and "
        "the hub cannot be reached (HF_HUB_OFFLINE is set): download it once",
    ),
    "adapter as a model": (
        {"policies": [{"name": "helpful", "model": "fam/lora_helpful"}]},
        "is a LoRA adapter, not a model: use `base:` + `adapter:`",
    ),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad-configs")
    make_adapter_family(folder / "fam", [LoraShape(r=2)], merged=False)
    other = folder / "other_lora"
    other.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (other / name).write_bytes((folder / "fam" / "lora_helpful" / name).read_bytes())
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/else-1B"
    (other / "adapter_config.json").write_text(json.dumps(config))
    write_tiny_gguf(folder / "odd.gguf", architecture="rwkv6")
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_policy_set_is_one_line_and_a_nonzero_exit(folder: Path, case: str) -> None:
    config, expected = CASES[case]
    path = folder / f"{case.replace(' ', '_')}.yaml"
    path.write_text(yaml.safe_dump({"device": "cpu", **config}))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MPO_HOME": str(folder / "home"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--config", str(path), "--port", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("mpo: error:")]
    assert len(errors) == 1, done.stderr
    assert expected in errors[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert "Started server process" not in done.stderr  # it failed before serving
