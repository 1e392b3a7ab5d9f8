"""Policy-set description: which models to load, on which device, in which dtype.

A policy set is a YAML file::

    served_name: mpo
    reference: {name: base, model: <hub id or local path>}   # optional
    policies:
      - {name: helpful,  model: <hub id or local path>}
      - {name: harmless, model: <hub id or local path>, revision: main}
      - {name: small,    model: ./smollm2.Q4_K_M.gguf}   # or model: <folder>, gguf_file: <name>
    device: auto      # cuda when available, else cpu
    dtype: auto       # bfloat16 on cuda, float32 on cpu
    kv_cache_dtype: auto   # the models' dtype; bfloat16/float16 halve a float32 cache
    cpu_linear: auto       # float32 on CPU: the faster of oneDNN and torch's MKL, timed at start
    speculative: {method: draft, max_draft_tokens: 4, draft_model: null}  # docs/speculative.md

or an *adapter family*: one base model and K PEFT LoRA adapters of it, where the base
with the adapters switched off is the reference (docs/adapters.md)::

    served_name: mpo
    base: {name: base, model: <hub id or local path>}
    policies:
      - {name: helpful,  adapter: <hub id or local folder>}
      - {name: harmless, adapter: ./adapters/harmless, revision: main}

or a *persona family*: one model and K system prompts, each persona the model
conditioned on its own (docs/models.md); the plain model is the reference::

    served_name: mpo
    reference: {name: smol, model: <hub id or local path>}
    policies:
      - {name: polite,  persona: smol, system: "Always answer politely."}
      - {name: concise, persona: smol, prefix: "Answer in one sentence.\n"}   # raw text

Relative local paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .names import NAME_HINT, Name, is_valid_name


def looks_local(model: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else is taken as a local path."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.count("/") > 1
        or Path(model).expanduser().exists()
    )


class ModelSpec(BaseModel):
    """One causal LM: a policy or the reference."""

    model_config = ConfigDict(extra="forbid")

    name: Name  # used in requests: {"weights": {name: w}}
    # hub id ("org/repo"), a local folder, or a local ``.gguf`` file (docs/models.md)
    model: str = Field(min_length=1)
    # A GGUF file inside ``model`` (a folder or a hub repository), e.g. "model.Q4_K_M.gguf"
    gguf_file: str | None = Field(default=None, min_length=1)
    revision: str | None = None  # hub branch, tag or commit; ignored for local folders
    trust_remote_code: bool = False
    # Where this member runs and in which dtype; None: the set's ``device``/``dtype``
    # (docs/models.md, "Placing members on devices").
    device: str | None = Field(default=None, min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    # The process that hosts it (docs/distributed.md): 0 is the one that serves HTTP and
    # mixes; another rank is a worker process (spawned by ``mpo serve`` on one machine, or
    # started by torchrun across machines).
    rank: int = Field(default=0, ge=0, le=1023)

    @model_validator(mode="after")
    def _one_gguf(self) -> ModelSpec:
        if self.gguf_file is not None and self.model.lower().endswith(".gguf"):
            raise ValueError(
                "`model:` is already a GGUF file; drop `gguf_file:` or make "
                "`model:` the folder (or hub repository) that holds it"
            )
        return self


class AdapterSpec(BaseModel):
    """One policy given as a PEFT LoRA adapter of the family's ``base`` model."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    adapter: str = Field(min_length=1)  # hub id ("org/repo") or a local adapter folder
    revision: str | None = None  # hub branch, tag or commit; ignored for local folders
    # Compare the adapter's recorded base_model_name_or_path with the family's base
    # (mpo_core/models/adapters.py gives the rule); false skips it, the shapes are still checked.
    check_base: bool = True
    # The process that runs it (as for a model); the family's `base:` is loaded on every
    # rank that hosts an adapter (docs/distributed.md).
    rank: int = Field(default=0, ge=0, le=1023)


class PersonaSpec(BaseModel):
    """One policy given as the family's model conditioned on its own prompt (a persona).

    ``system`` is rendered by the chat template as the conversation's system message;
    ``prefix`` is raw text whose tokens go in front of every prompt (mpo_core/models/personas.py
    gives the rule). Exactly one of the two."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    persona: str = Field(min_length=1)  # the name of the model it conditions: the reference
    system: str | None = Field(default=None, min_length=1)
    prefix: str | None = Field(default=None, min_length=1)
    # The process that runs it (as for a model); the persona's model is loaded on every
    # rank that hosts a persona (docs/distributed.md).
    rank: int = Field(default=0, ge=0, le=1023)

    @model_validator(mode="after")
    def _one_prompt(self) -> PersonaSpec:
        if (self.system is None) == (self.prefix is None):
            raise ValueError(
                f"persona {self.name!r} needs exactly one of `system:` (a system message "
                "the chat template renders) or `prefix:` (raw text put before the prompt)"
            )
        return self


def _policy_kind(value: Any) -> str:
    """Which spec a policy entry is: ``adapter:`` entries are adapters, ``persona:``
    entries personas, the rest models."""
    if isinstance(value, AdapterSpec) or (isinstance(value, dict) and "adapter" in value):
        return "adapter"
    if isinstance(value, PersonaSpec) or (isinstance(value, dict) and "persona" in value):
        return "persona"
    return "model"


PolicySpec = Annotated[
    Annotated[ModelSpec, Tag("model")]
    | Annotated[AdapterSpec, Tag("adapter")]
    | Annotated[PersonaSpec, Tag("persona")],
    Discriminator(_policy_kind),
]


class SpeculativeConfig(BaseModel):
    """Speculative decoding of the mixture (docs/speculative.md)."""

    model_config = ConfigDict(extra="forbid")

    # off; ngram: prompt lookup over the prompt and reply; draft: a cheap model drafts
    # (the default: fastest on the demo family, bench/results/speculative_demo.json)
    method: Literal["off", "ngram", "draft"] = "draft"
    max_draft_tokens: int = Field(default=4, ge=0, le=16)  # gamma's upper bound
    # For method draft: a policy's or the reference's name, or a model path / hub id that
    # shares the tokenizer. None: the reference; a family with no reference, or an adapter
    # family (its grouped forward costs about one draft forward), then uses ngram.
    draft_model: str | None = None
    # Draft with only the first N decoder layers of the draft model, then its final norm
    # and head (self-speculative drafting: no extra weights; None: every layer).
    draft_layers: int | None = Field(default=None, ge=1)
    # Above this many running rows a step does not speculate (it is compute-bound there).
    max_batch_size: int = Field(default=4, ge=0)


class DistributedConfig(BaseModel):
    """How the ranks of a family placed over several processes meet (docs/distributed.md)."""

    model_config = ConfigDict(extra="forbid")

    # torch.distributed's transport: "auto" is NCCL when CUDA is available, else gloo.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Where rank 0's rendezvous listens. ``mpo serve`` spawning its own workers uses
    # 127.0.0.1 and a free port; under torchrun MASTER_ADDR / MASTER_PORT win.
    master_addr: str = Field(default="127.0.0.1", min_length=1)
    master_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port
    # A worker that has not loaded its members and joined by then is a start-up error.
    start_timeout_s: float = Field(default=600.0, gt=0)
    # A step (or any call) that a worker has not answered by then ends the group: the
    # requests in flight fail, /health turns unhealthy. Long enough for the longest prefill.
    step_timeout_s: float = Field(default=300.0, gt=0)
    # When idle, rank 0 pings the workers this often (a worker lost while idle is noticed).
    heartbeat_s: float = Field(default=5.0, gt=0)


class LlamaCppConfig(BaseModel):
    """The llama.cpp backend's settings (docs/models.md, "GGUF families on llama.cpp")."""

    model_config = ConfigDict(extra="forbid")

    threads: int | None = Field(default=None, ge=1)  # None: every core the process may use
    # Tokens one llama_decode takes (n_batch); a longer step is split into several.
    batch_size: int = Field(default=512, ge=1)
    # KV cells of each context (n_ctx, shared by its sequences); None: what the KV cache
    # budget holds, at most 4096.
    context_tokens: int | None = Field(default=None, ge=16)
    gpu_layers: int = Field(default=0, ge=-1)  # layers offloaded (n_gpu_layers); -1: all


class PolicySetConfig(BaseModel):
    """The family of aligned policies served together (docs/architecture.md)."""

    model_config = ConfigDict(extra="forbid")

    served_name: Name = "mpo"
    # Which backend runs the family: "llama.cpp" runs GGUF files on llama-cpp-python (the
    # ``llama`` extra); "auto" does when every member is a GGUF file (or a persona of one)
    # and llama-cpp-python imports, else transformers.
    backend: Literal["auto", "transformers", "llama.cpp"] = "auto"
    llama_cpp: LlamaCppConfig = Field(default_factory=LlamaCppConfig)
    reference: ModelSpec | None = None  # needed for strength != 1 and for fitting
    # An adapter family's base model: every policy is a LoRA adapter of it, and the base
    # with the adapters switched off is the reference (so ``reference`` stays unset).
    base: ModelSpec | None = None
    policies: list[PolicySpec]
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...: each member's default
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Where the members' log-probs meet to be mixed and sampled; None: the first member's
    # device.
    mixing_device: str | None = Field(default=None, min_length=1)
    # The dtype the KV cache is stored in; attention still runs in ``dtype`` (each layer's
    # cache is cast up when read). "auto" stores it in ``dtype``.
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Static KV caches (preallocated slots x max_cache_len columns, docs/engine.md) let a
    # decode step run as one CUDA graph. "auto": static with graphs on CUDA, the growing
    # cache on CPU; "on": static everywhere (graphs only on CUDA); "off": growing cache.
    static_cache: Literal["auto", "on", "off"] = "auto"
    cuda_graphs: bool = True  # capture the static decode step; false = run it eagerly
    # Linear layers of float32 models on CPU (mpo_core/models/cpu_linear.py): "onednn" runs them
    # through oneDNN (a persona family's on packed weights), "torch" keeps torch's default
    # (MKL), "auto" times both at start-up on the models' own layers and keeps the faster:
    # which wins depends on the CPU. Ignored on CUDA and in other dtypes.
    cpu_linear: Literal["auto", "torch", "onednn"] = "auto"
    # Columns per slot of a static cache: the longest prompt + reply it can hold. None:
    # the models' context, as far as the KV cache budget allows (docs/models.md).
    max_cache_len: int | None = Field(default=None, ge=2)
    # Reward sets a fit may name (``POST /admin/fit`` with ``"rewards": "<name>"``): name ->
    # a rewards YAML (docs/evaluation.md), relative paths against this file's folder. Only
    # these can be named: a request never gives code or a path.
    rewards: dict[str, str] = Field(default_factory=dict)

    @field_validator("rewards")
    @classmethod
    def _reward_set_names(cls, rewards: dict[str, str]) -> dict[str, str]:
        for name, path in rewards.items():
            if not is_valid_name(name):
                raise ValueError(f"invalid reward set name {name!r}: {NAME_HINT}")
            if not path.strip():
                raise ValueError(f"reward set {name!r} needs the path of a rewards YAML")
        return rewards

    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    # Members placed on ranks > 0 (``rank:``): how the processes meet.
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("policies")
    @classmethod
    def _at_least_one(cls, policies: list[ModelSpec]) -> list[ModelSpec]:
        if not policies:
            raise ValueError("a policy set needs at least one policy")
        return policies

    @model_validator(mode="after")
    def _one_kind_of_family(self) -> PolicySetConfig:
        adapters = [p.name for p in self.policies if isinstance(p, AdapterSpec)]
        models = [p.name for p in self.policies if isinstance(p, ModelSpec)]
        if adapters and models:
            raise ValueError(
                f"policies {adapters} are adapters and {models} are full models: a family is "
                "either full models or LoRA adapters of one `base:`, not both (merge the "
                "adapters into full models, or make every policy an adapter)"
            )
        if adapters and self.base is None:
            raise ValueError(
                f"adapter policy {adapters[0]!r} needs the family's `base:` model "
                "(base: {name: ..., model: <hub id or path>})"
            )
        if self.base is not None and models:
            raise ValueError(
                f"policy {models[0]!r} is a full model, but `base:` makes this an adapter "
                "family: give every policy an `adapter:` instead of a `model:`"
            )
        if self.base is not None and self.reference is not None and not self.persona_policies:
            raise ValueError(
                "an adapter family's reference is its `base:` with the adapters off; "
                "remove `reference:`"
            )
        return self

    @model_validator(mode="after")
    def _one_host_for_personas(self) -> PolicySetConfig:
        personas = self.persona_policies
        if not personas:
            return self
        others = [p.name for p in self.policies if not isinstance(p, PersonaSpec)]
        if others:
            raise ValueError(
                f"policies {others} are not personas: a persona family is one model and its "
                "personas only (give every policy `persona:` and a prompt)"
            )
        host = self.reference or self.base
        if host is None:
            raise ValueError(
                f"persona {personas[0].name!r} needs the model it conditions: "
                "reference: {name: ..., model: <hub id or path>} (the plain model is the "
                "family's reference)"
            )
        if self.reference is not None and self.base is not None:
            raise ValueError("a persona family has one model: give `reference:` or `base:`")
        for persona in personas:
            if persona.persona != host.name:
                raise ValueError(
                    f"persona {persona.name!r} conditions {persona.persona!r}, but the "
                    f"family's model is {host.name!r}: every persona names it"
                )
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> PolicySetConfig:
        names = [p.name for p in self.policies]
        for extra in (self.reference, self.base):
            if extra is not None:
                names.append(extra.name)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(
                    f"duplicate model name {name!r}: policy and reference names must be unique"
                )
            seen.add(name)
        return self

    @model_validator(mode="after")
    def _ranks_in_use(self) -> PolicySetConfig:
        ranks = self.ranks
        missing = sorted(set(range(1, max(ranks) + 1)) - set(ranks))
        if missing:
            raise ValueError(
                f"rank {missing[0]} hosts no member, but rank {max(ranks)} does: ranks are "
                "processes numbered from 0 with no gaps (docs/distributed.md)"
            )
        return self

    @property
    def reference_rank(self) -> int:
        """The rank that runs the reference's rows (a persona or adapter family's model)."""
        host = self.reference or self.base
        return host.rank if host is not None else 0

    @property
    def ranks(self) -> list[int]:
        """Every rank a member is placed on (0 always: it serves and mixes)."""
        placed = {0, *(p.rank for p in self.policies)}
        if self.reference is not None or self.base is not None:
            placed.add(self.reference_rank)
        return sorted(placed)

    @property
    def policy_names(self) -> list[str]:
        return [p.name for p in self.policies]

    @property
    def is_adapter_family(self) -> bool:
        return self.base is not None and not self.persona_policies

    @property
    def is_persona_family(self) -> bool:
        return bool(self.persona_policies)

    @property
    def persona_policies(self) -> list[PersonaSpec]:
        """The policies of a persona family (empty otherwise)."""
        return [p for p in self.policies if isinstance(p, PersonaSpec)]

    @property
    def persona_host(self) -> ModelSpec | None:
        """A persona family's one model (its reference); None for other families."""
        if not self.persona_policies:
            return None
        return self.reference or self.base

    @property
    def model_policies(self) -> list[ModelSpec]:
        """The policies of a full-model family (empty for an adapter family)."""
        return [p for p in self.policies if isinstance(p, ModelSpec)]

    @property
    def adapter_policies(self) -> list[AdapterSpec]:
        """The policies of an adapter family (empty for a full-model family)."""
        return [p for p in self.policies if isinstance(p, AdapterSpec)]


def validation_problems(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field.path: message; ...``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
    )


def _entry_name(data: object, loc: tuple[Any, ...]) -> tuple[str, int]:
    """``("policy 'helpful'", 3)``: who a validation error is about, and how many parts of
    ``loc`` that consumed (``policies, 0, <kind tag>`` or ``reference``/``base``)."""
    raw: Any = data if isinstance(data, dict) else {}
    if loc[:1] == ("policies",) and len(loc) >= 2 and isinstance(loc[1], int):
        entries = raw.get("policies")
        entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else {}
        name = entry.get("name") if isinstance(entry, dict) else None
        used = 3 if len(loc) >= 3 and loc[2] in ("model", "adapter") else 2
        return (f"policy {name!r}" if name else f"policies[{loc[1]}]"), used
    if loc[:1] in (("reference",), ("base",)):
        entry = raw.get(loc[0])
        name = entry.get("name") if isinstance(entry, dict) else None
        return (f"{loc[0]} {name!r}" if name else str(loc[0])), 1
    return "", 0


def config_problems(exc: ValidationError, data: object) -> str:
    """The policy-set's validation errors as one line, each naming the policy it is about
    ("policy 'helpful': unknown field `modle`; policy 'helpful': `model` is missing")."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        who, used = _entry_name(data, loc)
        field = ".".join(str(p) for p in loc[used:])
        if err["type"] == "extra_forbidden":
            message = f"unknown field `{field}` (a typo? docs/models.md lists the fields)"
        elif err["type"] == "missing":
            message = f"`{field}` is missing"
        else:
            text = str(err["msg"]).removeprefix("Value error, ")
            message = f"`{field}`: {text}" if field else text
        problems.append(f"{who}: {message}" if who else message)
    return "; ".join(problems)


def parse_config(data: object, base_dir: Path | None = None) -> PolicySetConfig:
    """Validate a mapping (already parsed YAML) into a config, with a readable error."""
    try:
        config = PolicySetConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid policy-set config: {config_problems(exc, data)}") from None
    if base_dir is not None:
        for spec in _all_specs(config):
            candidate = base_dir / spec.model
            if not Path(spec.model).is_absolute() and candidate.exists():
                spec.model = str(candidate.resolve())
        for adapter in config.adapter_policies:
            candidate = base_dir / adapter.adapter
            if not Path(adapter.adapter).is_absolute() and candidate.exists():
                adapter.adapter = str(candidate.resolve())
        for name, rewards in config.rewards.items():
            if not Path(rewards).expanduser().is_absolute():
                config.rewards[name] = str((base_dir / rewards).resolve())
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
    specs = config.model_policies
    for extra in (config.reference, config.base):
        if extra is not None:
            specs.append(extra)
    return specs
