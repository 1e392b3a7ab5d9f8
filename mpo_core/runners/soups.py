"""Soups of a family (``models.soup``): built by the family's backend, served as a
policy set of their own beside the main engine (``mpo eval``'s soup rows)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from transformers import PreTrainedModel

from ..config import ModelSpec, PolicySetConfig
from ..errors import InvalidParameter
from ..models.policies import LoadedModel, PolicySet
from .factory import backend_of

logger = logging.getLogger(__name__)


def build_soup(policy_set: PolicySet, weights: Sequence[float]) -> PreTrainedModel:
    """One model: the policies' parameters averaged with ``weights`` (policy order, sum 1)."""
    total = sum(weights)
    if len(weights) != len(policy_set.policies) or total <= 0:
        raise InvalidParameter("weights", "soup weights: one per policy, not all zero")
    normalised = [w / total for w in weights]
    backend = backend_of(policy_set)
    if not backend.capabilities_of(policy_set).soups:
        raise InvalidParameter("soups", f"the {backend.kind} backend builds no soups")
    return backend.soup(policy_set, normalised)


def soup_policy_set(policy_set: PolicySet, soups: Mapping[str, Sequence[float]]) -> PolicySet:
    """A policy set whose policies are soups of ``policy_set`` (no reference).

    ``soups`` maps a name to the weights of that soup (policy order). An ``Engine`` on the
    result serves each soup alone with a one-hot mixture, next to the main engine.
    """
    if not soups:
        raise InvalidParameter("soups", "no soup to build")
    loaded: list[LoadedModel] = []
    template = policy_set.policies[0]
    for name, weights in soups.items():
        logger.info("building soup %r at weights %s", name, [round(w, 4) for w in weights])
        model = build_soup(policy_set, weights)
        loaded.append(
            LoadedModel(name, model, template.cache_kwarg, template.accepts_logits_to_keep)
        )
    config = PolicySetConfig(
        served_name=policy_set.config.served_name,
        policies=[ModelSpec(name=name, model=f"soup of {policy_set.names}") for name in soups],
        device=str(policy_set.device),
        dtype=policy_set.config.dtype,
        kv_cache_dtype=policy_set.config.kv_cache_dtype,
    )
    return PolicySet.build(
        config,
        loaded,
        None,
        policy_set.tokenizer,
        policy_set.device,
        policy_set.dtype,
        vocab_size=policy_set.vocab_size,
        max_context=policy_set.max_context,
        eos_token_ids=list(policy_set.eos_token_ids),
    )
