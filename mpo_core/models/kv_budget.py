"""A memory budget for the KV caches: admit a request only when its worst case fits.

One token of one model's cache holds a key and a value per layer and KV head:
``2 * layers * kv_heads * head_dim * itemsize`` bytes (46,080 for SmolLM2-135M in
float32). A request needs a cache row in every model its mixture runs (a policy whose
weight is not zero, the reference when ``strength != 1``), up to ``prompt +
max_new_tokens`` columns.

The growing caches (``kvcache``) keep a model's rows left-padded to the longest row, in
a buffer with half as many columns again to spare, so the worst case of a set of
requests is, per batch, ``rows * capacity(longest) * bytes_per_token``; K separate models
are K + 1 batches, an adapter or persona family one batch of slots over the shared
model (a persona's slot is longer than its request by its persona's prompt, at most
``PersonaPrompts.longest_extra`` tokens, which this worst case leaves out). The engine
admits the next waiting request only when that worst case, with it, stays within the
budget, and refuses at once (400) a request that could not fit even alone.

Static caches (CUDA graphs) are preallocated: ``slots * max_len`` columns per model. The
budget then sets ``max_len`` (up to the models' context) instead of admitting.

The default budget is a fraction (``kv_cache_fraction``, 0.5) of the memory available
when the engine starts, after the weights are loaded: ``MemAvailable`` of /proc/meminfo
(else the free physical pages) on CPU, ``torch.cuda.mem_get_info`` on a GPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from .kvcache import _capacity_for
from .policies import LoadedModel, PolicySet

logger = logging.getLogger(__name__)

GiB = 1 << 30
_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")


def format_bytes(count: float) -> str:
    """``count`` bytes in the largest binary unit that keeps the number at 1 or more, with
    three significant digits: ``512 bytes``, ``3.50 KiB``, ``96.0 MiB``, ``1.25 GiB`` (a
    small budget never reads "0.00 GiB")."""
    value, unit = float(count), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    if unit == 0:
        return f"{int(value)} bytes"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {_UNITS[unit]}"


def token_bytes(model: LoadedModel, kv_dtype: torch.dtype) -> int:
    """Bytes one token takes in ``model``'s KV cache (keys and values, every layer)."""
    config: Any = model.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=kv_dtype).element_size()


def available_memory(device: torch.device) -> int:
    """Bytes the device has free now: GPU free memory, or the host's available memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class KVBudget:
    """The KV-cache budget of one engine and the worst-case cost of its requests."""

    def __init__(
        self,
        budget_bytes: int,
        model_token_bytes: Sequence[int],  # [K + 1] (or [K]): per model, in coefs order
        groups: Sequence[Sequence[int]],  # the models that share one padded batch
        growing: bool,  # False: static caches, preallocated (nothing to admit)
    ) -> None:
        self.budget_bytes = budget_bytes
        self.model_token_bytes = list(model_token_bytes)
        self.groups = [list(g) for g in groups]
        self.growing = growing

    @property
    def request_token_bytes(self) -> int:
        """One token of a request that runs every model."""
        return sum(self.model_token_bytes)

    @property
    def tokens(self) -> int:
        """How many tokens of requests that run every model the budget holds."""
        return self.budget_bytes // max(1, self.request_token_bytes)

    def worst_case(self, rows: Sequence[tuple[Sequence[float], int]]) -> int:
        """Bytes the caches of ``rows`` (coefficients [K + 1 (+ R)], prompt + max_new_tokens)
        may reach together: per batch, its slots padded to the longest, plus spare."""
        total = 0
        fixed = len(self.model_token_bytes)
        for group in self.groups:
            # A request's own personas (coefficients past the fixed models) are slots of
            # the one shared batch, each costing a token of its shared model.
            extra = [group[-1]] if len(self.groups) == 1 else []
            slots = [
                (length, m if m < fixed else extra[0])
                for coefs, length in rows
                for m, coef in enumerate(coefs)
                if coef != 0 and (m in group or (m >= fixed and extra))
            ]
            if slots:
                columns = _capacity_for(max(length for length, _ in slots))
                total += columns * sum(self.model_token_bytes[m] for _, m in slots)
        return total

    def fits(self, rows: Sequence[tuple[Sequence[float], int]]) -> bool:
        return not self.growing or self.worst_case(rows) <= self.budget_bytes

    def static_len(self, slots: int, context: int) -> int:
        """Columns per slot of static caches for ``slots`` requests within the budget."""
        return min(context, self.budget_bytes // max(1, slots * self.request_token_bytes))

    def describe(self) -> str:
        return (
            f"KV cache budget {format_bytes(self.budget_bytes)} = {self.tokens:,} tokens of a "
            f"request over all {len(self.model_token_bytes)} models "
            f"({format_bytes(self.request_token_bytes)} a token)"
        )


def kv_budget_for(
    policy_set: PolicySet,
    budget_bytes: int | None,
    fraction: float,
    growing: bool,
    shared_forward: bool = False,
) -> KVBudget:
    """The engine's budget for ``policy_set`` (its models in ``coefs`` order):
    ``budget_bytes``, else ``fraction`` of the memory available now. ``shared_forward``:
    every model's rows are slots of one batch (``runners.Capabilities``)."""
    models = [*policy_set.policies]
    if policy_set.reference is not None:
        models.append(policy_set.reference)
    per_model = [token_bytes(m, policy_set.kv_dtype) for m in models]
    # One batch of slots over a shared model, else a batch per model.
    groups = [list(range(len(models)))] if shared_forward else [[m] for m in range(len(models))]
    if budget_bytes is None:
        budget_bytes = int(fraction * available_memory(policy_set.device))
    return KVBudget(budget_bytes, per_model, groups, growing)
