"""Grouped LoRA: every row of a batch runs its own adapter in one forward.

PEFT loads the adapters (``adapters``); this module then replaces each LoRA-wrapped
linear layer by a ``GroupedLoraLinear`` that holds, side by side, the factors of the S
adapters that target it, each padded with zeros to the layer's largest rank R::

    A = [A_1 | ... | A_S]          # [in, S * R]
    B = [B_1 ; ... ; B_S]          # [S * R, out], each B_s times its scaling
    y = base(x) + ((x @ A) * mask[row]) @ B

``mask[row]`` is 1 on the R columns of the row's adapter and 0 elsewhere; a row running
no adapter (the base: the family's reference), or an adapter that does not target this
layer, has an all-zero mask. So adapters of different ranks, alphas and target modules
share one pair of matrices per layer. The scaling (``alpha / r``, ``alpha / sqrt(r)``
with rslora, or a rank/alpha pattern's value) is folded into B when it is built.

When every row of a step runs the same adapter (a one-hot mixture at strength 1, or the
base alone), a CPU forward uses only that adapter's R columns (or none): one policy costs
what the base plus one LoRA costs, whatever S is. On a GPU the masked product always
runs, so that the forward has no branch on the data and a graph can replay it.

Why all S adapters for every row, rather than gathering each row's own factors: on a CPU
the gather copies ``rows x R x (in + out)`` values per layer and step, which outgrows the
layer's own weight past a dozen rows, while two plain matrix products read every
adapter's factors once whatever the batch (S * R * (in + out) values: 9 % of the
100M-parameter shape's weights for 3 rank-16 adapters on every linear layer).

The per-row adapter index lives in one ``AdapterIndex`` shared by every layer: static
buffers that the runner fills in place before each forward (in the batch's row order).
A layer reads ``mask[:B]`` (B from the input's shape): no data-dependent indexing, no
Python branch on data, so a CUDA graph can capture the forward and replay it after the
buffers are refilled.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from ..errors import ConfigError

BASE = 0  # the adapter index of "no adapter": the base model, the family's reference


class AdapterIndex:
    """Row -> adapter, shared by every grouped layer of one model.

    ``set`` takes, per batch row, 0 for the base or ``1 + k`` for adapter k. Layers
    differ in which adapters target them, so each distinct layout (a ``table`` mapping
    adapter index -> the layer's slot, 1..S, or 0 for none) gets its own mask buffer
    ``[capacity, S]``, filled once per ``set`` rather than once per layer.
    """

    def __init__(
        self,
        num_adapters: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        capacity: int = 16,
    ) -> None:
        self.num_adapters = num_adapters
        self.device = device
        self.dtype = dtype
        self._tables: list[torch.Tensor] = []  # per layout: [N + 1] adapter -> slot
        self._masks: list[torch.Tensor] = []  # per layout: [capacity, S] 1 = row's slot
        self._index = torch.zeros(capacity, dtype=torch.long, device=device)  # [capacity]
        self._uniform: list[int | None] = []  # per layout: the one slot every row runs
        self.rows = 0

    @property
    def capacity(self) -> int:
        return self._index.shape[0]

    def layout(self, table: list[int]) -> int:
        """The id of the layout ``table`` (adapter index -> slot 1..S, 0 = none)."""
        wanted = torch.tensor(table, dtype=torch.long, device=self.device)  # [N + 1]
        for i, known in enumerate(self._tables):
            if torch.equal(known, wanted):
                return i
        self._tables.append(wanted)
        self._masks.append(self._new_mask(wanted, self.capacity))
        return len(self._tables) - 1

    def _new_mask(self, table: torch.Tensor, capacity: int) -> torch.Tensor:
        slots = int(table.max())
        return torch.zeros(capacity, slots, dtype=self.dtype, device=self.device)

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` rows. Growing allocates new buffers: a captured graph
        must be captured after the largest ``reserve``."""
        if rows <= self.capacity:
            return
        capacity = max(rows, self.capacity * 2)
        self._index = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self._masks = [self._new_mask(table, capacity) for table in self._tables]

    def set(self, adapters: torch.Tensor) -> None:
        """Rows ``0..len(adapters)-1`` run ``adapters`` ([B] long, 0 = base), in place."""
        rows = adapters.shape[0]
        self.reserve(rows)
        self._index[:rows].copy_(adapters)
        self._uniform = []
        for table, mask in zip(self._tables, self._masks):
            slots = table[self._index[:rows]]  # [B] 0 = none, else 1..S
            wanted = torch.arange(1, mask.shape[1] + 1, device=self.device)  # [S]
            mask[:rows] = slots[:, None] == wanted  # [B, S]
            self._uniform.append(self._one_slot(slots))
        self.rows = rows

    def _one_slot(self, slots: torch.Tensor) -> int | None:
        """The slot all rows share (0: none of them runs an adapter here), else None.

        Only on the CPU: a GPU would wait for the answer (a host sync), and a captured
        graph must not branch on it."""
        if self.device.type != "cpu" or slots.numel() == 0:
            return None
        first = int(slots[0])
        return first if bool((slots == first).all()) else None

    def uniform_slot(self, layout: int) -> int | None:
        """``_one_slot`` of the rows last ``set``, for layers of ``layout``."""
        return self._uniform[layout] if layout < len(self._uniform) else None

    def fill(self, rows: int, adapter: int) -> None:
        """Every one of ``rows`` rows runs ``adapter``."""
        self.set(torch.full((rows,), adapter, dtype=torch.long, device=self.device))

    def table(self, layout: int) -> list[int]:
        """Adapter index -> slot (1..S) in ``layout``'s layers, 0 where they lack it."""
        return [int(slot) for slot in self._tables[layout]]

    def mask(self, layout: int, rows: int) -> torch.Tensor:
        assert rows <= self.rows, "the adapter index was set for fewer rows than the batch has"
        return self._masks[layout][:rows]  # [B, S]

    def slots(self, layout: int, rows: int) -> list[int]:
        """Each row's slot in ``layout`` (0 = none): for tests and debugging."""
        mask = self.mask(layout, rows)  # [B, S]
        return [int(r.nonzero()[0]) + 1 if bool(r.any()) else 0 for r in mask]


class GroupedLoraLinear(nn.Module):
    """A linear layer plus per-row LoRA deltas from side-by-side factors (module docstring)."""

    def __init__(
        self,
        base_layer: nn.Module,
        lora_a: torch.Tensor,  # [in, S * R]
        lora_b: torch.Tensor,  # [S * R, out], scaling folded in
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
        self.slots = index.mask(layout, 0).shape[1]  # S: adapters that target this layer
        self.rank = lora_a.shape[1] // self.slots  # R: their largest rank

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # [B, T, out]
        rows, out = x.shape[0], result.shape[-1]
        uniform = self.index.uniform_slot(self.layout)
        if uniform is not None:  # every row runs one adapter (or none): only its factors
            if uniform == BASE:
                return result
            columns = slice((uniform - 1) * self.rank, uniform * self.rank)
            hidden = x @ self.lora_a[:, columns]  # [B, T, R]
            delta = torch.addmm(
                result.reshape(-1, out), hidden.reshape(-1, self.rank), self.lora_b[columns]
            )  # [B * T, out]
            return delta.view_as(result)
        mask = self.index.mask(self.layout, rows)  # [B, S]
        hidden = x @ self.lora_a  # [B, T, S * R]
        hidden = hidden.view(rows, -1, mask.shape[1], self.rank) * mask[:, None, :, None]
        delta = torch.addmm(
            result.reshape(-1, out), hidden.view(-1, self.lora_a.shape[1]), self.lora_b
        )  # [B * T, out]
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
    """The side-by-side factors of one layer (a PEFT LoRA Linear), ``present`` in order."""
    rank = max(int(module.r[a]) for a in present)
    fan_in, fan_out = int(module.in_features), int(module.out_features)
    lora_a = torch.zeros(fan_in, len(present) * rank, dtype=dtype, device=device)  # [in, SR]
    lora_b = torch.zeros(len(present) * rank, fan_out, dtype=dtype, device=device)  # [SR, out]
    for slot, adapter in enumerate(present):
        weight_a = module.lora_A[adapter].weight.float()  # [r, in]
        weight_b = module.lora_B[adapter].weight.float() * module.scaling[adapter]  # [out, r]
        r, start = weight_a.shape[0], slot * rank
        # PEFT's forward is lora_B(lora_A(x)) * scaling whatever fan_in_fan_out says: that
        # flag only transposes the delta when it is merged into a Conv1D's [in, out] weight.
        lora_a[:, start : start + r] = weight_a.t().to(dtype)
        lora_b[start : start + r, :] = weight_b.t().to(dtype)
    return lora_a, lora_b


@torch.no_grad()
def group_lora_layers(
    model: nn.Module, adapters: list[str], dtype: torch.dtype, device: torch.device
) -> AdapterIndex:
    """Replace every PEFT LoRA layer of ``model`` (in place) by a ``GroupedLoraLinear``.

    ``adapters`` are PEFT adapter names; adapter index ``1 + k`` is ``adapters[k]``.
    After this the model holds no PEFT layer and runs whatever the returned index says.
    """
    index = AdapterIndex(len(adapters), device, dtype)
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
