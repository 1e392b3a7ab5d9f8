"""The engine's speculation policy: who drafts how many tokens this step, and the tallies.

A request drafts when speculation is on (the policy set's ``speculative.method``, or
the engine's override), the request did not opt out, the runner can verify, and at most
``max_batch_size`` rows are running (past that a step is compute-bound and verifying
drafts costs more than it saves). Its gamma adapts to its own acceptance rate
(``speculative.AdaptiveGamma``) and never drafts past ``max_new_tokens`` or the context.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ModelSpec, SpeculativeConfig
from ..engine.requests import SequenceState
from ..errors import ConfigError
from ..models.cpu_linear import apply_cpu_linear, weight_elements
from ..models.kvcache import KVStorage
from ..models.policies import (
    LoadedModel,
    PolicySet,
    check_tokenizers_agree,
    device_of,
    load_model,
    load_tokenizer,
)
from .acceptance import AdaptiveGamma, Draft
from .drafts import Drafter, ModelDrafter, NgramDrafter

logger = logging.getLogger(__name__)


class Speculator:
    """Drafts for the rows of a step, and each request's adaptive gamma."""

    def __init__(self, settings: SpeculativeConfig, drafter: Drafter, min_models: int = 1) -> None:
        self.settings = settings
        self.drafter = drafter
        self.min_models = min_models  # a row drafts only if it runs at least this many models
        self._gamma: dict[int, AdaptiveGamma] = {}
        self.drafted = 0  # tokens drafted, all requests
        self.accepted = 0  # of those, kept

    def gamma_of(self, seq: SequenceState) -> AdaptiveGamma:
        state = self._gamma.get(seq.sid)
        if state is None:
            state = self._gamma[seq.sid] = AdaptiveGamma(self.settings.max_draft_tokens)
        return state

    def gammas(self, running: Sequence[SequenceState], max_context: int) -> list[int]:
        """How many tokens each row may draft this step (0: none)."""
        if not running or len(running) > self.settings.max_batch_size:
            return [0] * len(running)
        # The batch's longest row bounds everyone's drafts: a static cache verifies every
        # row in the same G columns (DecodeBatch.verify).
        room = max_context - max(len(s.token_ids) for s in running)
        out = []
        for seq in running:
            if not seq.sampling.speculative or self._models(seq) < self.min_models:
                out.append(0)
                continue
            left = seq.sampling.max_new_tokens - len(seq.generated) - 1  # the last is sampled
            out.append(max(0, min(self.gamma_of(seq).gamma, left, room)))
        return out

    @staticmethod
    def _models(seq: SequenceState) -> int:
        return sum(1 for c in seq.coefs if c != 0)

    def drafts(
        self,
        running: Sequence[SequenceState],
        max_context: int,
        newcomers: Sequence[SequenceState] = (),
    ) -> dict[int, Draft]:
        """The non-empty drafts of this step's running rows, by sid. A grammar's mask is
        formed for one position per step: a step with a grammar row in it (a newcomer's
        too) decodes plainly (docs/speculative.md)."""
        if any(s.grammar is not None for s in (*running, *newcomers)):
            return {}
        gammas = self.gammas(running, max_context)
        if max(gammas, default=0) == 0:
            for seq in running:
                if seq.sampling.speculative:
                    self.gamma_of(seq).update(0, 0)  # idle steps count towards a probe
            return {}
        proposals = self.drafter.propose(running, gammas)
        drafts = {}
        for seq, draft in zip(running, proposals):
            if draft.tokens:
                drafts[seq.sid] = draft
            elif seq.sampling.speculative:
                self.gamma_of(seq).update(0, 0)
        return drafts

    def record(self, seq: SequenceState, drafted: int, accepted: int) -> None:
        """One row's step: ``accepted`` of its ``drafted`` tokens were kept."""
        self.gamma_of(seq).update(drafted, accepted)
        self.drafted += drafted
        self.accepted += accepted
        seq.stream.drafted_tokens += drafted
        seq.stream.accepted_tokens += accepted

    def keep(self, sids: set[int]) -> None:
        self.drafter.keep(sids)
        self._gamma = {sid: g for sid, g in self._gamma.items() if sid in sids}


def make_speculator(
    policy_set: PolicySet, settings: SpeculativeConfig | None = None, shared_forward: bool = False
) -> Speculator | None:
    """The speculator ``settings`` (default: the policy set's) ask for; None when off.
    ``shared_forward``: the runner runs every model of a row in one forward
    (``runners.Capabilities``)."""
    settings = settings or policy_set.config.speculative
    if settings.method == "off" or settings.max_draft_tokens == 0:
        return None
    drafter: Drafter
    method = settings.method
    if method == "draft" and settings.draft_model is None and policy_set.reference is None:
        logger.info("speculative: no reference to draft with and no draft_model: using ngram")
        method = "ngram"
    explicit = settings.draft_model is not None or settings.draft_layers is not None
    if method == "draft" and not explicit and shared_forward:
        # The grouped forward runs every model of a row at once: a draft forward of the
        # shared model costs about a whole step, so the default draft could only slow it.
        logger.info(
            "speculative: an adapter or persona family drafts only with an explicit "
            "draft_model (or draft_layers); using ngram"
        )
        method = "ngram"
    members = [None, policy_set.reference_name, *policy_set.names]  # None: the reference
    if method == "draft" and settings.draft_model in members:
        model = draft_model(policy_set, settings.draft_model)
        # a torch model (or an adapter family's view) runs as a draft; a GGUF member on
        # llama.cpp has no torch parameters
        if not callable(getattr(model.model, "parameters", None)):
            logger.info("speculative: %r does not run as a torch model: using ngram", model.name)
            method = "ngram"
    if method == "ngram":
        return Speculator(settings, NgramDrafter())
    model = draft_model(policy_set, settings.draft_model)
    if settings.draft_layers is not None:
        model = first_layers(model, settings.draft_layers)
    logger.info("speculative decoding drafts with %r", model.name)
    if device_of(model) != policy_set.device:
        raise ConfigError(
            f"speculative: the draft {model.name!r} is on {device_of(model)}, not on the "
            f"mixing device {policy_set.device}: drafts are compared with the mixture there "
            "(set mixing_device, or draft with a model placed on it)"
        )
    drafter = ModelDrafter(
        model, policy_set.vocab_size, policy_set.device, KVStorage(policy_set.kv_dtype)
    )
    # A draft as big as a policy costs a forward per drafted token: it pays only for rows
    # that run two models or more (one-hot rows at strength 1 decode as cheaply alone).
    small = _parameters(model) * 2 <= min(_parameters(m) for m in policy_set.policies)
    return Speculator(settings, drafter, min_models=1 if small else 2)


def _parameters(loaded: LoadedModel) -> int:
    model = loaded.model  # a module, or an adapter family's view (parameters() only)
    if isinstance(model, nn.Module):
        return weight_elements(model)  # packed weights count too
    if not callable(getattr(model, "parameters", None)):  # a GGUF or another rank's member
        return int(getattr(model, "parameter_count", 0))
    return sum(p.numel() for p in model.parameters())


def _sharing(module: nn.Module, **children: nn.Module) -> Any:
    """A shallow copy of ``module`` (same parameters) with some children replaced."""
    clone = copy.copy(module)
    clone._modules = {**module._modules, **children}
    return clone


def first_layers(loaded: LoadedModel, layers: int) -> LoadedModel:
    """``loaded`` running only its first ``layers`` decoder layers, then its final norm
    and head, on the same weights (nothing is copied): a cheap self-speculative draft."""
    # An adapter family's member is an ``adapters.AdapterView`` over the shared model.
    is_view = hasattr(loaded.model, "adapter") and hasattr(loaded.model, "index")
    view = loaded.model if is_view else None
    model = view.model if view is not None else loaded.model
    for outer, attr in (("model", "layers"), ("transformer", "h")):  # Llama-like, GPT-2
        inner = getattr(model, outer, None)
        blocks = getattr(inner, attr, None)
        if isinstance(blocks, nn.ModuleList):
            break
    else:
        raise ConfigError(
            f"speculative.draft_layers: cannot find the decoder layers of {loaded.name!r} "
            "(supported: Llama-style model.layers and GPT-2-style transformer.h)"
        )
    assert inner is not None
    if layers >= len(blocks):
        return loaded
    config = copy.copy(model.config)
    config.num_hidden_layers = layers
    trimmed = _sharing(inner, **{attr: nn.ModuleList(list(blocks)[:layers])})
    trimmed.config = config
    shallow = _sharing(model, **{outer: trimmed})
    shallow.config = config
    runnable: Any = shallow
    if view is not None:
        runnable = copy.copy(view)
        runnable.model = shallow
    name = f"{loaded.name}[:{layers} layers]"
    return LoadedModel(name, runnable, loaded.cache_kwarg, loaded.accepts_logits_to_keep)


def draft_model(policy_set: PolicySet, name: str | None) -> LoadedModel:
    """The draft: a policy or the reference by name (None: the reference; an adapter
    family's is its bare base), else a model path or hub id sharing the tokenizer."""
    members = {m.name: m for m in [*policy_set.policies, policy_set.reference] if m is not None}
    if name is None:
        if policy_set.reference is None:
            raise ConfigError(
                "speculative.method draft needs speculative.draft_model (a policy's name or "
                "a model path) when the policy set has no reference"
            )
        return policy_set.reference
    if name in members:
        return members[name]
    spec = ModelSpec(name="draft", model=str(Path(name).expanduser()) if "/" in name else name)
    tokenizer = load_tokenizer(spec, "draft model")
    check_tokenizers_agree(("the policies", policy_set.tokenizer), ("draft", tokenizer))
    draft = load_model(spec, "draft model", policy_set.device, policy_set.dtype)
    config = policy_set.config
    apply_cpu_linear(config.cpu_linear, [draft.model], policy_set.device, policy_set.dtype)
    return draft
