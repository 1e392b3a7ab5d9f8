"""Reward soups: the policies averaged in parameter space, served as one extra model.

A soup at weights ``w`` is the model whose every parameter is ``sum_k w_k theta_k``
(Rame et al., "Rewarded soups", 2023): the baseline the MPO paper compares the
log-linear mixture against. It needs policies of one architecture fine-tuned from one
base (the case here), and it is one model, so it decodes at the cost of one policy.

For an adapter family (one base, K LoRA adapters) the soup is the base plus the
weighted sum of the adapters' deltas, ``W + sum_k w_k B_k A_k``: with weights on the
simplex that is the same model as the soup of the adapters merged into full copies.

A persona family's members share one set of weights and differ only in their prompt, so
every soup of it is that model itself, without any persona's prompt: the plain model
(the family's reference). No copy is made.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedModel

from ..config import ModelSpec, PolicySetConfig
from ..errors import ConfigError, InvalidParameter
from .lora import GroupedLoraLinear
from .policies import LoadedModel, PolicySet

logger = logging.getLogger(__name__)

__all__ = ["build_soup", "soup_policy_set", "soup_state_dict"]


def soup_state_dict(
    models: Sequence[torch.nn.Module], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``sum_k w_k theta_k`` for every floating-point tensor of the models' state dicts.

    Integer buffers (position ids and the like) must agree across the models and are
    copied. The sum runs in float32 and is cast back to each tensor's dtype. Models with
    weight 0 are skipped, so a one-hot soup is that policy exactly.
    """
    if len(models) != len(weights) or not models:
        raise InvalidParameter("weights", "a soup needs one weight per model, and a model")
    used = [(m.state_dict(), float(w)) for m, w in zip(models, weights) if w != 0]
    if not used:
        raise InvalidParameter("weights", "soup weights must not all be zero")
    first = used[0][0]
    for state, _ in used[1:]:
        if state.keys() != first.keys():
            raise ConfigError(
                "soup: the policies do not share one architecture (their keys differ)"
            )
        for key, tensor in state.items():
            if tensor.shape != first[key].shape:
                raise ConfigError(
                    f"soup: parameter {key!r} has shape {tuple(tensor.shape)} in one policy "
                    f"and {tuple(first[key].shape)} in another"
                )
    averaged: dict[str, torch.Tensor] = {}
    for key, tensor in first.items():
        if not tensor.is_floating_point():
            if any(not torch.equal(state[key], tensor) for state, _ in used[1:]):
                raise ConfigError(f"soup: integer buffer {key!r} differs between the policies")
            averaged[key] = tensor.clone()
            continue
        total = torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
        for state, weight in used:
            total += weight * state[key].float()
        averaged[key] = total.to(tensor.dtype)
    return averaged


def _is_adapter_family(policy_set: PolicySet) -> bool:
    """True when the policies are LoRA adapters of one base."""
    return policy_set.adapters is not None


@torch.no_grad()
def adapter_soup(policy_set: PolicySet, weights: Sequence[float]) -> PreTrainedModel:
    """The base with ``sum_k w_k`` of the adapters' deltas merged into its weights."""
    family = policy_set.adapters
    assert family is not None
    soup = copy.deepcopy(family.model)
    grouped = [(n, m) for n, m in soup.named_modules() if isinstance(m, GroupedLoraLinear)]
    for name, module in grouped:
        table = module.index.table(module.layout)  # adapter index -> slot (1..S), 0 = none
        rank = module.rank
        delta = torch.zeros(module.lora_a.shape[0], module.lora_b.shape[1])  # [in, out]
        for k, weight in enumerate(weights):
            slot = table[1 + k]
            if slot == 0 or weight == 0:
                continue
            cols = slice((slot - 1) * rank, slot * rank)
            delta += weight * (module.lora_a[:, cols].float() @ module.lora_b[cols].float()).cpu()
        base = module.base_layer
        weight_param: torch.Tensor = base.weight  # type: ignore[assignment]  # Linear: [out, in]; Conv1D: [in, out]
        update = delta.t() if isinstance(base, torch.nn.Linear) else delta
        weight_param += update.to(weight_param.dtype).to(weight_param.device)
        parent, _, child = name.rpartition(".")
        soup.get_submodule(parent).register_module(child, base)
    soup.eval().requires_grad_(False)
    return soup


def build_soup(policy_set: PolicySet, weights: Sequence[float]) -> PreTrainedModel:
    """One model: the policies' parameters averaged with ``weights`` (policy order, sum 1)."""
    total = sum(weights)
    if len(weights) != len(policy_set.policies) or total <= 0:
        raise InvalidParameter("weights", "soup weights: one per policy, not all zero")
    normalised = [w / total for w in weights]
    if policy_set.personas is not None and policy_set.reference is not None:
        return policy_set.reference.model  # the average of K copies of one model
    if _is_adapter_family(policy_set):
        return adapter_soup(policy_set, normalised)
    template = next(p for p, w in zip(policy_set.policies, normalised) if w != 0)
    soup = copy.deepcopy(template.model)  # same architecture, device and dtype
    soup.load_state_dict(soup_state_dict(policy_set.models, normalised))
    soup.eval().requires_grad_(False)
    return soup


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
