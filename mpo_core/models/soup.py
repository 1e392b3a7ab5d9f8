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


Which of these a family gets is its backend's choice (``runners.soups.build_soup``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from ..errors import ConfigError, InvalidParameter
from .lora import GroupedLoraLinear

if TYPE_CHECKING:
    from .adapters import AdapterFamily

__all__ = ["adapter_soup", "soup_state_dict"]


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


@torch.no_grad()
def adapter_soup(family: AdapterFamily, weights: Sequence[float]) -> PreTrainedModel:
    """The base with ``sum_k w_k`` of the adapters' deltas merged into its weights."""
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
