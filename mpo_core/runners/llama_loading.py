"""Which families run on llama.cpp (``backend:``), and how they are loaded: the GGUF files
by llama.cpp, the tokenizer (the GGUF's own vocabulary) by transformers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoTokenizer, PreTrainedModel

from ..config import ModelSpec, PolicySetConfig
from ..errors import ConfigError
from ..models.personas import build_persona_prompts
from ..models.policies import LoadedModel, PolicySet, check_tokenizers_agree
from ..models.sources import is_gguf
from .llama_context import GGUFModel, import_llama, llama_cpp_available

logger = logging.getLogger(__name__)

KIND = "llama.cpp"
# The KV cache's dtype (``kv_cache_dtype``): auto is llama.cpp's own default, float16.
KV_DTYPES = {
    "auto": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
_NOT_INSTALLED = "llama-cpp-python is not installed"


def gguf_file(spec: ModelSpec) -> Path | None:
    """The local GGUF file a member is (``model:`` a .gguf, or a folder + ``gguf_file:``)."""
    if spec.gguf_file is not None:
        path = Path(spec.model).expanduser() / spec.gguf_file
    elif is_gguf(spec.model):
        path = Path(spec.model).expanduser()
    else:
        return None
    return path if path.is_file() else None


def members_of(config: PolicySetConfig) -> list[ModelSpec]:
    """The models llama.cpp would load: a persona family's one model, else every model
    (an adapter family: its base)."""
    if config.persona_host is not None:
        return [config.persona_host]
    if config.base is not None:
        return [config.base]
    specs = list(config.model_policies)
    return [*specs, config.reference] if config.reference is not None else specs


def runs_on_llama_cpp(config: PolicySetConfig) -> tuple[bool, str]:
    """Whether ``config``'s family runs on llama.cpp, and why. ``backend: llama.cpp`` on a
    family it cannot run, or without llama-cpp-python, is a ConfigError of one line."""
    if config.backend == "transformers":
        return False, "backend: transformers"
    not_gguf = [m.name for m in members_of(config) if gguf_file(m) is None]
    if config.is_adapter_family:
        why = "an adapter family: LoRA adapters run on transformers only"
    elif not_gguf:
        why = f"{', '.join(repr(n) for n in not_gguf)} is not a local GGUF file"
    elif not llama_cpp_available():
        why = _NOT_INSTALLED
    else:
        return True, "every member is a local GGUF file and llama-cpp-python imports"
    if config.backend == "llama.cpp":
        if why == _NOT_INSTALLED:
            import_llama()  # raises the one line that names the install command
        raise ConfigError(f"backend llama.cpp cannot run this family: {why}")
    return False, why


def load_tokenizer_of(path: Path, who: str) -> Any:
    """The transformers tokenizer a GGUF file holds (its own vocabulary)."""
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # a file transformers cannot read the tokenizer of
        raise ConfigError(f"{who}: cannot read the tokenizer of {str(path)!r}: {exc}") from None


def _load(spec: ModelSpec, role: str, config: PolicySetConfig, vocab_size: int) -> GGUFModel:
    path = gguf_file(spec)
    assert path is not None  # runs_on_llama_cpp checked it
    logger.info("loading %s %r from %s on llama.cpp", role, spec.name, path)
    model = GGUFModel.load(path, config.llama_cpp, f"{role} {spec.name!r}")
    if model.n_vocab < vocab_size:
        raise ConfigError(
            f"{role} {spec.name!r}: {str(path)!r} has {model.n_vocab} output rows but the "
            f"tokenizer has {vocab_size} tokens"
        )
    return model


def _member(name: str, model: GGUFModel) -> LoadedModel:
    """A GGUF model in a member's place (``LoadedModel.model``; the runner knows it)."""
    return LoadedModel(name, cast(PreTrainedModel, model), "", False)


def load_gguf_family(config: PolicySetConfig) -> PolicySet:
    """A persona family on one GGUF file, or K GGUF models (+ a GGUF reference)."""
    personas = None
    host = config.persona_host
    if host is not None:
        path = gguf_file(host)
        assert path is not None
        tokenizer = load_tokenizer_of(path, f"reference {host.name!r}")
        # The prompt rule first: it is cheap, and a template without system messages fails.
        personas = build_persona_prompts(tokenizer, config.persona_policies, host.name)
        shared = _load(host, "reference", config, len(tokenizer))
        policies = [_member(p.name, shared) for p in config.persona_policies]
        reference: LoadedModel | None = _member(host.name, shared)
        limit = shared.n_ctx_train - personas.longest_extra
        if limit < 2:
            raise ConfigError(
                f"the personas' prompts ({personas.longest_extra} tokens) leave no room in "
                f"the context of {host.name!r} ({shared.n_ctx_train} tokens)"
            )
        eos = shared.eos_ids
    else:
        specs = [(p, "policy") for p in config.model_policies]
        if config.reference is not None:
            specs.append((config.reference, "reference"))
        tokenizers = []
        for spec, role in specs:
            path = gguf_file(spec)
            assert path is not None
            tokenizers.append((spec.name, load_tokenizer_of(path, f"{role} {spec.name!r}")))
        for other in tokenizers[1:]:
            check_tokenizers_agree(tokenizers[0], other)
        tokenizer = tokenizers[0][1]
        loaded = [_load(spec, role, config, len(tokenizer)) for spec, role in specs]
        members = [_member(spec.name, model) for (spec, _), model in zip(specs, loaded)]
        policies = members[: len(config.policies)]
        reference = members[-1] if config.reference is not None else None
        limit = min(model.n_ctx_train for model in loaded)
        eos = loaded[0].eos_ids
    if tokenizer.eos_token_id is not None:
        eos = sorted({*eos, int(tokenizer.eos_token_id)})
    return PolicySet(
        config=config,
        policies=policies,
        reference=reference,
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        device=torch.device("cpu"),  # llama.cpp hands its logits over in host memory
        dtype=torch.float32,
        kv_dtype=KV_DTYPES[config.kv_cache_dtype],
        max_context=limit,
        eos_token_ids=[t for t in eos if t < len(tokenizer)],
        personas=personas,
        backend=KIND,
    )
