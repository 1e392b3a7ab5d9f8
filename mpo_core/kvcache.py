"""One model's running batch: its rows, their KV cache and attention mask.

Rows are left-padded so that every row's next token lands in the same cache column.
A row joins after a prefill of its prompt (newcomers are prefilled together, then their
cache is padded to the batch's length and concatenated), and leaves by an index select;
columns that only padding occupies are then trimmed from the left.

Each layer's keys and values live in a buffer with spare columns (``GrowingLayer``), so
a decode step writes its column in place instead of concatenating a new tensor, as
transformers' ``DynamicLayer`` does: no copy of the whole cache per step, and no heap
fragmentation from blocks that grow by one column at a time. The buffer grows by half
its length when full. transformers sees an ordinary ``Cache`` of layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .mixing import to_logprobs
from .policies import LoadedModel

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, H, T, D]


MIN_SPARE = 32  # free columns a buffer keeps at least, so growth is rare


class GrowingLayer(DynamicLayer):
    """A layer cache whose buffer has spare columns; ``keys``/``values`` are views of it."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True
        self._length = 0
        self._key_buf = self._value_buf = keys[:, :, :0]
        self._reserve(keys.shape[2])
        self._write(keys, values)

    def _reserve(self, needed: int) -> None:
        capacity = self._key_buf.shape[2]
        if needed <= capacity:
            return
        shape = list(self._key_buf.shape)
        shape[2] = needed + max(MIN_SPARE, needed // 2)
        key_buf = self._key_buf.new_empty(shape)  # [B, H, C, D]
        value_buf = self._value_buf.new_empty(shape[:3] + [self._value_buf.shape[3]])
        key_buf[:, :, : self._length] = self._key_buf[:, :, : self._length]
        value_buf[:, :, : self._length] = self._value_buf[:, :, : self._length]
        self._key_buf, self._value_buf = key_buf, value_buf

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        start, end = self._length, self._length + keys.shape[2]
        self._key_buf[:, :, start:end] = keys
        self._value_buf[:, :, start:end] = values
        self._length = end
        self.keys = self._key_buf[:, :, :end]  # [B, H, T, D] views
        self.values = self._value_buf[:, :, :end]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("GrowingLayer is built with its tensors")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._reserve(self._length + key_states.shape[2])
        self._write(key_states, value_states)
        return self.keys, self.values  # type: ignore[return-value]

    def get_seq_length(self) -> int:
        return self._length


def cache_layers(cache: Cache) -> Layers:
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]


def build_cache(layers: Layers) -> Cache:
    return Cache(layers=[GrowingLayer(k, v) for k, v in layers])


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pad)


class ModelBatch:
    """The sequences that one model (a policy or the reference) is decoding."""

    def __init__(self, loaded: LoadedModel, vocab_size: int, device: torch.device) -> None:
        self.loaded = loaded
        self.vocab_size = vocab_size
        self.device = device
        self.row_ids: list[int] = []  # sequence ids, in cache row order
        self.cache: Cache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # [B, T] 1 = real token
        # False while no row has left padding: the forward then gets no mask at all and
        # transformers skips building a [B, 1, 1, T] mask per layer call (pure causal).
        self.padded = False

    def __len__(self) -> int:
        return len(self.row_ids)

    def _forward(self, **kwargs: object) -> torch.Tensor:
        kwargs[self.loaded.cache_kwarg] = kwargs.pop("cache")
        return self.loaded.model(**kwargs, use_cache=True).logits

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run the rows' newest tokens ([B] each, in row order); return log-probs [B, V]."""
        ones = torch.ones(len(self), 1, dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)  # [B, T + 1]
        logits = self._forward(
            input_ids=tokens.unsqueeze(1),  # [B, 1]
            attention_mask=self.mask if self.padded else None,
            position_ids=positions.unsqueeze(1),  # [B, 1]
            cache=self.cache,
        )
        return to_logprobs(logits[:, -1], self.vocab_size)  # [B, V]

    @torch.inference_mode()
    def prefill(self, row_ids: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run the newcomers' prompts, add them to the batch; return their log-probs [n, V]."""
        length = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), length, dtype=torch.long, device=self.device)  # [n, L]
        mask = torch.zeros_like(ids)  # [n, L]
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.tensor(prompt, device=self.device)
            mask[row, length - len(prompt) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [n, L]
        cache = DynamicCache()
        kwargs: dict[str, object] = {}
        if self.loaded.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        logits = self._forward(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, **kwargs
        )
        # Padding positions never get attended to, but their keys/values can hold NaN (a
        # query row with nothing to attend to); 0 * NaN would leak through the softmax.
        pad = (mask == 0)[:, None, :, None]  # [n, 1, L, 1]
        layers = [
            (k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)) for k, v in cache_layers(cache)
        ]
        self._append(row_ids, layers, mask)
        return to_logprobs(logits[:, -1], self.vocab_size)  # [n, V]

    def _append(self, row_ids: list[int], layers: Layers, mask: torch.Tensor) -> None:
        if self.cache is None or not self.row_ids:
            self.cache, self.mask, self.row_ids = build_cache(layers), mask, list(row_ids)
            self.padded = not bool(mask.all())
            return
        length = max(self.mask.shape[1], mask.shape[1])
        merged = [
            (
                torch.cat([_left_pad(k0, length, 2), _left_pad(k1, length, 2)]),
                torch.cat([_left_pad(v0, length, 2), _left_pad(v1, length, 2)]),
            )
            for (k0, v0), (k1, v1) in zip(cache_layers(self.cache), layers)
        ]
        self.cache = build_cache(merged)
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
        self.padded = not bool(self.mask.all())
        self.row_ids += row_ids

    def keep(self, keep_ids: set[int]) -> None:
        """Drop every row whose id is not in ``keep_ids``; trim all-padding columns."""
        rows = [i for i, rid in enumerate(self.row_ids) if rid in keep_ids]
        if len(rows) == len(self.row_ids):
            return
        self.row_ids = [self.row_ids[i] for i in rows]
        if not rows or self.cache is None:
            self.cache, self.mask, self.padded = None, self.mask[:0, :0], False
            return
        index = torch.tensor(rows, device=self.device)
        mask = self.mask.index_select(0, index)  # [B', T]
        start = int((mask.sum(dim=0) > 0).nonzero()[0])  # first column some row uses
        self.mask = mask[:, start:]
        self.padded = not bool(self.mask.all())
        self.cache = build_cache(
            [
                (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                for k, v in cache_layers(self.cache)
            ]
        )
