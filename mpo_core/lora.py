"""Grouped LoRA: every row of a batch runs its own adapter in one forward.

PEFT loads the adapters (``adapters``); this module then replaces each LoRA-wrapped
linear layer by a ``GroupedLoraLinear`` that holds the adapters' factors stacked::

    y[b] = base(x[b]) + x[b] @ A[slot[b]] @ B[slot[b]]        # A: [S, in, R], B: [S, R, out]

``slot[b]`` is row b's adapter in this layer's stack. Slot 0 is all zeros: the base with
no adapter, which is the family's reference. Ranks are padded with zero columns to the
layer's largest rank, and an adapter that does not target the layer maps to slot 0, so
adapters of different ranks, alphas and target modules share one stack per layer. The
scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rslora, or a rank/alpha pattern's
value) is folded into B when the stacks are built.

The per-row adapter index lives in one ``AdapterIndex`` shared by every layer: a
preallocated buffer that the runner fills before each forward (row order of the
batch). Layers read ``index[:B]`` (B from the input's shape) through a gather and two
batched products: no data-dependent indexing, no Python branch on data, so a CUDA graph
can capture the forward and replay it after the buffers are refilled in place.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from .errors import ConfigError

BASE = 0  # the adapter index of "no adapter": the base model, the family's reference


class AdapterIndex:
    """Row -> adapter, shared by every grouped layer of one model.

    ``index`` holds, per batch row, 0 for the base or ``1 + k`` for adapter k. Layers
    differ in which adapters target them, so each distinct layout (a ``table`` mapping
    adapter index -> slot in the layer's stack) gets its own slot buffer, filled from
    ``index`` once per ``set`` rather than once per layer.
    """

    def __init__(self, num_adapters: int, device: torch.device, capacity: int = 16) -> None:
        self.num_adapters = num_adapters
        self.device = device
        self._tables: list[torch.Tensor] = []  # per layout: [N + 1] adapter -> slot
        self._slots: list[torch.Tensor] = []  # per layout: [capacity] slot per row
        self._index = torch.zeros(capacity, dtype=torch.long, device=device)  # [capacity]
        self.rows = 0

    @property
    def capacity(self) -> int:
        return self._index.shape[0]

    def layout(self, table: list[int]) -> int:
        """The id of the layout ``table`` (adapter index -> slot), added if new."""
        wanted = torch.tensor(table, dtype=torch.long, device=self.device)  # [N + 1]
        for i, known in enumerate(self._tables):
            if torch.equal(known, wanted):
                return i
        self._tables.append(wanted)
        self._slots.append(torch.zeros(self.capacity, dtype=torch.long, device=self.device))
        return len(self._tables) - 1

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` rows. Growing allocates new buffers: a captured graph
        must be captured after the largest ``reserve``."""
        if rows <= self.capacity:
            return
        capacity = max(rows, self.capacity * 2)
        self._index = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self._slots = [torch.zeros_like(self._index) for _ in self._tables]

    def set(self, adapters: torch.Tensor) -> None:
        """Rows ``0..len(adapters)-1`` run ``adapters`` ([B] long, 0 = base), in place."""
        rows = adapters.shape[0]
        self.reserve(rows)
        self._index[:rows].copy_(adapters)
        for table, slots in zip(self._tables, self._slots):
            torch.index_select(table, 0, self._index[:rows], out=slots[:rows])
        self.rows = rows

    def fill(self, rows: int, adapter: int) -> None:
        """Every one of ``rows`` rows runs ``adapter``."""
        self.set(torch.full((rows,), adapter, dtype=torch.long, device=self.device))

    def slots(self, layout: int, rows: int) -> torch.Tensor:
        assert rows <= self.rows, "the adapter index was set for fewer rows than the batch has"
        return self._slots[layout][:rows]  # [B]


class GroupedLoraLinear(nn.Module):
    """A linear layer plus per-row LoRA deltas from stacked factors (module docstring)."""

    def __init__(
        self,
        base_layer: nn.Module,
        lora_a: torch.Tensor,  # [S, in, R]; slot 0 zeros
        lora_b: torch.Tensor,  # [S, R, out], scaling folded in; slot 0 zeros
        index: AdapterIndex,
        layout: int,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_a: torch.Tensor
        self.lora_b: torch.Tensor
        self.register_buffer("lora_a", lora_a)
        self.register_buffer("lora_b", lora_b)
        self.index = index
        self.layout = layout

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # [B, T, out]
        rows = x.shape[0]
        slots = self.index.slots(self.layout, rows)  # [B]
        hidden = torch.bmm(x.reshape(rows, -1, x.shape[-1]), self.lora_a[slots])  # [B, T, R]
        delta = torch.baddbmm(
            result.reshape(rows, -1, result.shape[-1]), hidden, self.lora_b[slots]
        )  # [B, T, out]
        return delta.view_as(result)


def _check_layer(name: str, module: LoraLayer, adapters: list[str]) -> None:
    """Raise ConfigError naming the adapter if the layer is not plain LoRA on a Linear."""
    for adapter in adapters:
        if adapter not in module.lora_A:
            continue
        if not isinstance(module, PeftLoraLinear):
            kind = type(module.get_base_layer()).__name__
            raise ConfigError(
                f"adapter {adapter!r} puts LoRA on {name!r}, a {kind}: only linear layers "
                "(nn.Linear, GPT-2's Conv1D) are supported"
            )
        if adapter in getattr(module, "lora_variant", {}):
            variant = type(module.lora_variant[adapter]).__name__
            raise ConfigError(
                f"adapter {adapter!r} is a LoRA variant ({variant}) on {name!r}: "
                "only plain LoRA is supported (no DoRA, aLoRA, ...)"
            )
        if module.lora_B[adapter].bias is not None:
            raise ConfigError(
                f"adapter {adapter!r} has a LoRA bias (lora_bias=True) on {name!r}: not supported"
            )


def _stack(
    module: Any, present: list[str], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked factors of one layer (a PEFT LoRA Linear): slot 0 zeros, then
    ``present`` in order."""
    rank = max(int(module.r[a]) for a in present)
    fan_in, fan_out = int(module.in_features), int(module.out_features)
    lora_a = torch.zeros(1 + len(present), fan_in, rank, dtype=dtype, device=device)  # [S, in, R]
    lora_b = torch.zeros(1 + len(present), rank, fan_out, dtype=dtype, device=device)  # [S, R, out]
    for slot, adapter in enumerate(present, start=1):
        weight_a = module.lora_A[adapter].weight.float()  # [r, in]
        weight_b = module.lora_B[adapter].weight.float() * module.scaling[adapter]  # [out, r]
        r = weight_a.shape[0]
        # PEFT's forward is lora_B(lora_A(x)) * scaling whatever fan_in_fan_out says: that
        # flag only transposes the delta when it is merged into a Conv1D's [in, out] weight.
        lora_a[slot, :, :r] = weight_a.t().to(dtype)
        lora_b[slot, :r, :] = weight_b.t().to(dtype)
    return lora_a, lora_b


@torch.no_grad()
def group_lora_layers(
    model: nn.Module, adapters: list[str], dtype: torch.dtype, device: torch.device
) -> AdapterIndex:
    """Replace every PEFT LoRA layer of ``model`` (in place) by a ``GroupedLoraLinear``.

    ``adapters`` are PEFT adapter names; adapter index ``1 + k`` is ``adapters[k]``.
    After this the model holds no PEFT layer and runs whatever the returned index says.
    """
    index = AdapterIndex(len(adapters), device)
    lora_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, module in lora_layers:
        _check_layer(name, module, adapters)
        assert isinstance(module, PeftLoraLinear)
        present = [a for a in adapters if a in module.lora_A]
        unknown = set(module.lora_A) - set(adapters)
        assert not unknown, f"layer {name} has adapters {unknown} that were not asked for"
        base_layer = module.get_base_layer()
        if not present:  # wrapped by PEFT, but no adapter of ours has weights here
            grouped: nn.Module = base_layer
        else:
            lora_a, lora_b = _stack(module, present, dtype, device)
            table = [BASE] + [present.index(a) + 1 if a in present else BASE for a in adapters]
            grouped = GroupedLoraLinear(base_layer, lora_a, lora_b, index, index.layout(table))
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, grouped)
    return index
