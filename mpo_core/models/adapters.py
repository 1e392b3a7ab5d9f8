"""Adapter families: one base model and K PEFT LoRA adapters of it (docs/adapters.md).

PEFT is the loader: each adapter's config is read and checked first (LoRA, no DoRA,
``bias: none``, nothing trained outside the LoRA factors, trained on this base), then
the weights are loaded with ``PeftModel.from_pretrained`` / ``load_adapter`` (hub ids or
local folders, ``revision`` and ``HF_HUB_OFFLINE`` honoured), and finally ``lora``
replaces PEFT's layers by grouped ones that run each batch row with its own adapter.

Whether an adapter was trained on the family's base is decided from the
``base_model_name_or_path`` that PEFT recorded in its ``adapter_config.json``:

- empty: accepted (the shapes are still checked while loading);
- a local path: it must be the base's folder (compared after resolving links);
- a hub id: it must equal the base's hub id (case-insensitively, as the hub does), or the
  base must be that repository's folder in the hub cache (``models--org--name/...``).

A local copy of a hub model, or a renamed folder, fails this rule; ``check_base: false`` on
that policy skips it (the shapes are still checked).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, PeftType
from torch import nn

from ..config import AdapterSpec, ModelSpec, looks_local
from ..errors import ConfigError
from .lora import BASE, AdapterIndex, group_lora_layers

logger = logging.getLogger(__name__)


@dataclass
class AdapterInfo:
    """What /info and the docs say about one adapter."""

    name: str
    source: str
    rank: int
    alpha: float
    target_modules: list[str]


@dataclass
class AdapterFamily:
    """The base model with grouped LoRA layers, and the index its layers read."""

    model: Any  # the base PreTrainedModel, its LoRA layers replaced by grouped ones
    index: AdapterIndex  # per row: 0 = base (the reference), 1 + k = adapter k
    adapters: list[AdapterInfo]

    def view(self, adapter: int) -> AdapterView:
        return AdapterView(self.model, self.index, adapter)


class AdapterView:
    """One member of the family as a model of its own: every row runs ``adapter``.

    Code that runs one model at a time (teacher-forced scoring, the K-separate-models
    runner, baselines) uses views; the grouped runner calls the shared model directly.
    """

    def __init__(self, model: Any, index: AdapterIndex, adapter: int) -> None:
        self.model = model
        self.index = index
        self.adapter = adapter
        self.config = model.config
        self.generation_config = model.generation_config

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        self.index.fill(input_ids.shape[0], self.adapter)
        return self.model(input_ids=input_ids, **kwargs)

    def get_output_embeddings(self) -> nn.Module:
        module: nn.Module = self.model.get_output_embeddings()
        return module

    def parameters(self) -> Any:
        return self.model.parameters()


def _hub_cache_repo(path: Path) -> str | None:
    """``org/name`` if ``path`` lies in a hub cache folder ``models--org--name``."""
    for part in path.parts:
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/")
    return None


def same_base(recorded: str | None, base_model: str) -> bool:
    """The rule of the module docstring: was an adapter recorded against this base?"""
    if not recorded:
        return True
    if looks_local(base_model):
        base_path = Path(base_model).expanduser().resolve()
        if looks_local(recorded):
            return Path(recorded).expanduser().resolve() == base_path
        cached = _hub_cache_repo(base_path)
        return cached is not None and cached.casefold() == recorded.casefold()
    return not looks_local(recorded) and recorded.casefold() == base_model.casefold()


def _adapter_source(spec: AdapterSpec) -> str:
    if looks_local(spec.adapter):
        path = Path(spec.adapter).expanduser()
        if not (path / "adapter_config.json").is_file():
            what = "has no adapter_config.json" if path.is_dir() else "does not exist"
            raise ConfigError(f"adapter {spec.name!r}: path {spec.adapter!r} {what}")
        return str(path)
    return spec.adapter


def read_adapter_config(spec: AdapterSpec, base: ModelSpec) -> PeftConfig:
    """Load and check one adapter's PEFT config (ConfigError naming the adapter)."""
    source = _adapter_source(spec)
    try:
        config = PeftConfig.from_pretrained(source, revision=spec.revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"adapter {spec.name!r}: cannot read a PEFT adapter config from {source!r}: {exc}"
        ) from None
    problems = {
        config.peft_type != PeftType.LORA: (
            f"is a PEFT {PeftType(config.peft_type).value} adapter, not LoRA"
        ),
        bool(getattr(config, "use_dora", False)): "uses DoRA (use_dora=True)",
        getattr(config, "bias", "none") != "none": (
            f"trains biases (bias={getattr(config, 'bias', None)!r}); only bias='none'"
        ),
        bool(getattr(config, "lora_bias", False)): "has a LoRA bias (lora_bias=True)",
        bool(getattr(config, "modules_to_save", None)): (
            f"trains whole modules {getattr(config, 'modules_to_save', None)} "
            "(modules_to_save); only the LoRA factors may differ from the base"
        ),
        bool(getattr(config, "trainable_token_indices", None)): (
            "trains token embeddings (trainable_token_indices)"
        ),
    }
    for failed, message in problems.items():
        if failed:
            raise ConfigError(f"adapter {spec.name!r} {message}: not supported")
    recorded = config.base_model_name_or_path
    if spec.check_base and not same_base(recorded, base.model):
        raise ConfigError(
            f"adapter {spec.name!r} was trained on {recorded!r}, but the family's base "
            f"{base.name!r} is {base.model!r} (set check_base: false on the policy if they "
            "are the same model under two names)"
        )
    return config


def _info(spec: AdapterSpec, config: Any) -> AdapterInfo:
    targets = config.target_modules
    names = sorted(targets) if isinstance(targets, (set, list, tuple)) else [str(targets)]
    return AdapterInfo(spec.name, spec.adapter, int(config.r), float(config.lora_alpha), names)


def _load_weights(model: Any, spec: AdapterSpec, peft_model: PeftModel | None) -> PeftModel:
    source = _adapter_source(spec)
    try:
        if peft_model is None:
            return PeftModel.from_pretrained(
                model, source, adapter_name=spec.name, revision=spec.revision
            )
        peft_model.load_adapter(source, adapter_name=spec.name, revision=spec.revision)
        return peft_model
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        # size mismatch (another base's shapes), target modules the base lacks, no weights
        raise ConfigError(
            f"adapter {spec.name!r}: cannot load it onto the base from {source!r}: {exc}"
        ) from None


def read_adapter_configs(base: ModelSpec, specs: Sequence[AdapterSpec]) -> list[PeftConfig]:
    """Every adapter's checked config: cheap, so done before the base is loaded."""
    return [read_adapter_config(spec, base) for spec in specs]


def load_adapters(
    model: Any,
    specs: Sequence[AdapterSpec],
    configs: Sequence[PeftConfig],
    dtype: torch.dtype,
    device: torch.device,
) -> AdapterFamily:
    """Load ``specs`` (checked ``configs``) onto ``model`` (modified in place) and group
    their LoRA layers."""
    peft_model: PeftModel | None = None
    for spec in specs:
        logger.info("loading adapter %r from %s", spec.name, spec.adapter)
        peft_model = _load_weights(model, spec, peft_model)
    assert peft_model is not None
    inner: Any = peft_model.base_model.model  # the transformers model, with LoRA layers
    index = group_lora_layers(inner, [s.name for s in specs], dtype, device)
    inner.eval().requires_grad_(False)
    infos = [_info(spec, config) for spec, config in zip(specs, configs)]
    return AdapterFamily(inner, index, infos)


__all__ = [
    "BASE",
    "AdapterFamily",
    "AdapterInfo",
    "AdapterView",
    "load_adapters",
    "read_adapter_configs",
    "same_base",
]
