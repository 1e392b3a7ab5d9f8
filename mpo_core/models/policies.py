"""Load a policy family: K causal LMs (and an optional reference) that share one tokenizer.

Everything the engine needs to know about the models is gathered here once: the shared
vocabulary size (embedding rows past the tokenizer are padding and are ignored), the
context limit, the EOS ids and the keyword a model's ``forward`` takes for its KV cache
(``cache`` in transformers >= 5, ``past_key_values`` before).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..config import ModelSpec, PolicySetConfig, looks_local
from ..errors import ConfigError
from .cpu_linear import apply_cpu_linear
from .personas import PersonaPrompts
from .sources import gguf_checkpoint, is_gguf

if TYPE_CHECKING:  # peft is imported only when an adapter family is loaded
    from .adapters import AdapterFamily

logger = logging.getLogger(__name__)

_DEFAULT_CONTEXT = 2048


@dataclass
class LoadedModel:
    """One loaded causal LM and the facts about its ``forward`` the engine relies on."""

    name: str
    model: PreTrainedModel
    cache_kwarg: str  # keyword of forward() that takes the KV cache
    accepts_logits_to_keep: bool  # prefill can skip the logits of all but the last token


def _placed(model: PreTrainedModel) -> tuple[torch.device, torch.dtype]:
    """A model's device and dtype, read off its first parameter."""
    first = next(model.parameters())
    return first.device, first.dtype


def device_of(loaded: LoadedModel) -> torch.device:
    """Where a member runs: its weights' device (members may each name their own)."""
    return next(loaded.model.parameters()).device


@dataclass
class Kernels:
    """Which models ``cpu_linear`` sets up, for how many rows a step, packed or not: a
    backend's choice (one row per model for full models; a row per policy on the shared
    model of a one-forward family, whose persona weights may be packed)."""

    models: list[PreTrainedModel]
    rows: int = 1
    pack: bool = False


@dataclass
class PolicySet:
    """K policies (+ reference), each on its device, with their shared tokenizer."""

    config: PolicySetConfig
    policies: list[LoadedModel]
    reference: LoadedModel | None
    tokenizer: Any
    vocab_size: int  # len(tokenizer): logits are cut to this many columns
    device: torch.device  # where the members' log-probs are mixed and sampled
    dtype: torch.dtype  # the set's default dtype (a member may name its own)
    kv_dtype: torch.dtype  # what the KV cache is stored in (config.kv_cache_dtype)
    max_context: int  # prompt + generated tokens, the smallest of the models' limits
    eos_token_ids: list[int] = field(default_factory=list)
    # An adapter family's shared model and adapter index (policies and reference are then
    # views of it, each running one adapter); None for a family of full models.
    adapters: AdapterFamily | None = None
    # A persona family's prompt rule (policies and reference are then the same model,
    # each conditioned on its own prompt); None for other families.
    personas: PersonaPrompts | None = None
    # The backend that runs it (``runners.factory.BACKENDS``), set by that backend's loader.
    backend: str = "separate"
    # What the backend's loader leaves for its runner (the distributed backend's group of
    # ranks); None for the one-process backends.
    backend_state: Any = None

    @classmethod
    def build(
        cls,
        config: PolicySetConfig,
        policies: list[LoadedModel],
        reference: LoadedModel | None,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        *,
        vocab_size: int | None = None,
        max_context: int | None = None,
        eos_token_ids: list[int] | None = None,
        adapters: AdapterFamily | None = None,
        personas: PersonaPrompts | None = None,
        backend: str = "separate",
        kernels: Kernels | None = None,
    ) -> PolicySet:
        """The one way to assemble a policy set; what is not given is read off the models.

        ``vocab_size`` defaults to the tokenizer's length, ``max_context`` to the smallest
        of the models' limits, ``eos_token_ids`` to the tokenizer's and the first policy's
        generation config; every model must have an output row per token. ``device`` is
        where the members' log-probs are mixed; ``kernels`` says how the CPU linear layers
        are chosen (by default: each member's own, one row a step).
        """
        members = [*policies, *([reference] if reference is not None else [])]
        vocab = len(tokenizer) if vocab_size is None else vocab_size
        for member in members:
            check_output_rows(member, "reference" if member is reference else "policy", vocab)
        # After the checks, which read the head's dense weight: packing may drop it.
        kernels = kernels or Kernels([m.model for m in members])
        # Only models that run on the CPU in float32 (each member may have its own place).
        cpu = torch.device("cpu")
        on_cpu = [m for m in kernels.models if _placed(m) == (cpu, torch.float32)]
        apply_cpu_linear(
            config.cpu_linear, on_cpu, cpu, torch.float32, rows=kernels.rows, pack=kernels.pack
        )  # fmt: skip
        return cls(
            config=config,
            policies=policies,
            reference=reference,
            tokenizer=tokenizer,
            vocab_size=vocab,
            device=device,
            dtype=dtype,
            kv_dtype=_kv_dtype(config, device, dtype),
            max_context=(
                min(context_limit_of(m.model) for m in members)
                if max_context is None
                else max_context
            ),
            eos_token_ids=(
                _eos_ids(tokenizer, policies[0].model) if eos_token_ids is None else eos_token_ids
            ),
            adapters=adapters,
            personas=personas,
            backend=backend,
        )

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.policies]

    @property
    def models(self) -> list[PreTrainedModel]:
        return [p.model for p in self.policies]

    @property
    def reference_name(self) -> str | None:
        return self.reference.name if self.reference is not None else None

    @property
    def served_name(self) -> str:
        return self.config.served_name


def resolve_device(device: str, who: str = "") -> torch.device:
    """A torch device that exists here; ``who`` (e.g. "policy 'polite'") names the member
    whose ``device:`` it is in the error."""
    of = f"{who}: " if who else ""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"{of}device {device!r} is not a valid torch device: {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{of}device {device!r} was asked for but CUDA is not available")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(
                f"{of}device {device!r} does not exist: this machine has {count} CUDA "
                f"device(s), cuda:0 to cuda:{count - 1}"
            )
    elif resolved.type != "cpu":
        raise ConfigError(f"{of}device {device!r}: only cpu and cuda devices are supported")
    return resolved


def member_placement(
    config: PolicySetConfig, spec: ModelSpec, role: str
) -> tuple[torch.device, torch.dtype]:
    """A member's device and dtype: its own ``device:``/``dtype:``, else the set's."""
    who = f"{role} {spec.name!r}"
    device = resolve_device(spec.device or config.device, who)
    return device, resolve_dtype(spec.dtype or config.dtype, device)


def mixing_device(config: PolicySetConfig, first_member: torch.device) -> torch.device:
    """Where log-probs are mixed: ``mixing_device:``, else the first member's device."""
    if config.mixing_device is None:
        return first_member
    return resolve_device(config.mixing_device, "mixing_device")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def model_source(spec: ModelSpec, role: str) -> str:
    """What ``from_pretrained`` reads: a hub id, a local folder, or a GGUF file's copy."""
    who = f"{role} {spec.name!r}"
    if spec.gguf_file is not None:
        return str(gguf_checkpoint(_gguf_location(spec, who), who))
    if not looks_local(spec.model):
        return spec.model
    path = Path(spec.model).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{who}: model path {spec.model!r} does not exist (a relative path is taken from "
            "the policy-set YAML's folder)"
        )
    if is_gguf(path):
        return str(gguf_checkpoint(path, who))
    if (
        path.is_dir()
        and (path / "adapter_config.json").is_file()
        and not (path / "config.json").exists()
    ):
        raise ConfigError(
            f"{who}: {spec.model!r} is a LoRA adapter, not a model: use `base:` + `adapter:` "
            "(base: {name: base, model: <the model it was trained on>}, and the policy as "
            f"{{name: {spec.name}, adapter: {spec.model}}}; docs/adapters.md)"
        )
    return str(path)


def _gguf_location(spec: ModelSpec, who: str) -> Path:
    """The local path of ``gguf_file`` in ``model`` (a folder, or a hub repository)."""
    assert spec.gguf_file is not None
    if looks_local(spec.model):
        return Path(spec.model).expanduser() / spec.gguf_file
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec.model, spec.gguf_file, revision=spec.revision))
    except Exception as exc:  # offline, no such repository or file: one line, no traceback
        raise ConfigError(
            f"{who}: cannot fetch {spec.gguf_file!r} from the hub repository {spec.model!r}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(download the file and give its local path as `model:`)"
        ) from None


def load_tokenizer(spec: ModelSpec, role: str) -> Any:
    source = model_source(spec, role)
    try:
        return AutoTokenizer.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except Exception as exc:  # tokenizers raises bare Exception on a corrupt file
        if source == spec.model and not looks_local(source) and _unreachable_hub(exc):
            raise ConfigError(
                f"{role} {spec.name!r}: hub model {source!r} is not in the local hub cache and "
                f"the hub cannot be reached{' (HF_HUB_OFFLINE is set)' if _hub_offline() else ''}"
                f": download it once where the hub is reachable (`hf download {source}`), or "
                "point `model:` at a local folder or a .gguf file"
            ) from None
        raise ConfigError(
            f"{role} {spec.name!r}: cannot load tokenizer from {source!r}: {exc}"
        ) from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _unreachable_hub(exc: Exception) -> bool:
    """transformers' error for a hub id it could neither download nor find in the cache."""
    text = str(exc)
    return _hub_offline() or "couldn't connect" in text or "offline mode" in text


def load_model(spec: ModelSpec, role: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    source = model_source(spec, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code, dtype=dtype
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"{role} {spec.name!r}: cannot load model from {source!r}: {exc}"
        ) from None
    model.to(device)  # type: ignore[arg-type]
    return wrap_model(spec.name, model)


def wrap_model(name: str, model: PreTrainedModel) -> LoadedModel:
    """A model already on its device, in eval mode, with the facts about its forward."""
    model.eval().requires_grad_(False)
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    return LoadedModel(name, model, cache_kwarg, "logits_to_keep" in params)


def check_tokenizers_agree(first: tuple[str, Any], other: tuple[str, Any]) -> None:
    """Raise ConfigError naming both models and the first token on which they differ."""
    (name_a, tok_a), (name_b, tok_b) = first, other
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if vocab_a != vocab_b:
        by_id_a = {i: t for t, i in vocab_a.items()}
        by_id_b = {i: t for t, i in vocab_b.items()}
        for token_id in range(max(len(by_id_a), len(by_id_b), 1)):
            a, b = by_id_a.get(token_id), by_id_b.get(token_id)
            if a != b:
                raise ConfigError(
                    f"tokenizers of {name_a!r} and {name_b!r} disagree: token id {token_id} is "
                    f"{a!r} in {name_a!r} but {b!r} in {name_b!r}; "
                    "mixed policies must share a vocabulary"
                )
        raise ConfigError(f"tokenizers of {name_a!r} and {name_b!r} have different vocabularies")
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(tok_a, attr, None), getattr(tok_b, attr, None)
        if a != b:
            raise ConfigError(
                f"tokenizers of {name_a!r} and {name_b!r} disagree on the special token {attr}: "
                f"{a!r} vs {b!r}"
            )


def context_limit_of(model: PreTrainedModel) -> int:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return _DEFAULT_CONTEXT


def _eos_ids(tokenizer: Any, model: PreTrainedModel) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def load_full_models(config: PolicySetConfig) -> PolicySet:
    """Load K full models (+ a reference), each on its own device and in its own dtype
    (``device:``/``dtype:`` per member, default the set's), and check they can be mixed."""
    specs: list[tuple[ModelSpec, str]] = [(p, "policy") for p in config.model_policies]
    if config.reference is not None:
        specs.append((config.reference, "reference"))
    placements = [member_placement(config, spec, role) for spec, role in specs]

    # Tokenizers first: they are cheap, and a mismatch should fail before loading weights.
    tokenizers = [(spec.name, load_tokenizer(spec, role)) for spec, role in specs]
    for other in tokenizers[1:]:
        check_tokenizers_agree(tokenizers[0], other)
    tokenizer = tokenizers[0][1]
    vocab_size = len(tokenizer)

    loaded = []
    for (spec, role), (device, dtype) in zip(specs, placements):
        logger.info("loading %s %r from %s on %s (%s)", role, spec.name, spec.model, device, dtype)
        model = load_model(spec, role, device, dtype)
        check_output_rows(model, role, vocab_size)  # before loading the next one
        loaded.append(model)
    policies = loaded[: len(config.policies)]
    reference = loaded[len(config.policies)] if config.reference is not None else None
    device = mixing_device(config, placements[0][0])
    set_dtype = resolve_dtype(config.dtype, device)
    return PolicySet.build(config, policies, reference, tokenizer, device, set_dtype)


def check_output_rows(loaded: LoadedModel, role: str, vocab_size: int) -> None:
    """Logits are cut to the tokenizer's length: a model needs at least that many rows."""
    rows = loaded.model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise ConfigError(
            f"{role} {loaded.name!r} has {rows} output rows "
            f"but the tokenizer has {vocab_size} tokens"
        )


def _kv_dtype(config: PolicySetConfig, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if config.kv_cache_dtype == "auto":
        return dtype
    return resolve_dtype(config.kv_cache_dtype, device)
