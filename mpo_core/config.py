"""Policy-set description: which models to load, on which device, in which dtype.

A policy set is a YAML file::

    served_name: mpo
    reference: {name: base, model: <hub id or local path>}   # optional
    policies:
      - {name: helpful,  model: <hub id or local path>}
      - {name: harmless, model: <hub id or local path>, revision: main}
    device: auto      # cuda when available, else cpu
    dtype: auto       # bfloat16 on cuda, float32 on cpu
    kv_cache_dtype: auto   # the models' dtype; bfloat16/float16 halve a float32 cache

Relative local paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class ModelSpec(BaseModel):
    """One causal LM: a policy or the reference."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME_PATTERN)  # used in requests: {"weights": {name: w}}
    model: str = Field(min_length=1)  # hub id ("org/repo") or a local folder
    revision: str | None = None  # hub branch, tag or commit; ignored for local folders
    trust_remote_code: bool = False


class PolicySetConfig(BaseModel):
    """The family of aligned policies served together (DESIGN.md §2.1)."""

    model_config = ConfigDict(extra="forbid")

    served_name: str = Field(default="mpo", pattern=_NAME_PATTERN)
    reference: ModelSpec | None = None  # needed for strength != 1 and for fitting
    policies: list[ModelSpec]
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # The dtype the KV cache is stored in; attention still runs in ``dtype`` (each layer's
    # cache is cast up when read). "auto" stores it in ``dtype``.
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Static KV caches (preallocated slots x max_cache_len columns, docs/engine.md) let a
    # decode step run as one CUDA graph. "auto": static with graphs on CUDA, the growing
    # cache on CPU; "on": static everywhere (graphs only on CUDA); "off": growing cache.
    static_cache: Literal["auto", "on", "off"] = "auto"
    cuda_graphs: bool = True  # capture the static decode step; false = run it eagerly
    # Columns per slot of a static cache: the longest prompt + reply it can hold. None:
    # the models' context, at most DEFAULT_MAX_CACHE_LEN (each column costs memory).
    max_cache_len: int | None = Field(default=None, ge=2)

    @field_validator("policies")
    @classmethod
    def _at_least_one(cls, policies: list[ModelSpec]) -> list[ModelSpec]:
        if not policies:
            raise ValueError("a policy set needs at least one policy")
        return policies

    @model_validator(mode="after")
    def _unique_names(self) -> PolicySetConfig:
        names = [p.name for p in self.policies]
        if self.reference is not None:
            names.append(self.reference.name)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(
                    f"duplicate model name {name!r}: policy and reference names must be unique"
                )
            seen.add(name)
        return self

    @property
    def policy_names(self) -> list[str]:
        return [p.name for p in self.policies]


def parse_config(data: object, base_dir: Path | None = None) -> PolicySetConfig:
    """Validate a mapping (already parsed YAML) into a config, with a readable error."""
    try:
        config = PolicySetConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid policy-set config: {problems}") from None
    if base_dir is not None:
        for spec in _all_specs(config):
            candidate = base_dir / spec.model
            if not Path(spec.model).is_absolute() and candidate.exists():
                spec.model = str(candidate.resolve())
    return config


def load_config(path: str | Path) -> PolicySetConfig:
    """Read and validate a policy-set YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"policy-set config {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy-set config {str(path)!r} is not valid YAML: {exc}") from None
    return parse_config(data, base_dir=path.parent)


def _all_specs(config: PolicySetConfig) -> list[ModelSpec]:
    specs = list(config.policies)
    if config.reference is not None:
        specs.append(config.reference)
    return specs
