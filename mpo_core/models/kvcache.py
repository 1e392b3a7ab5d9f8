"""One model's running batch: its rows, their KV cache and attention mask.

Rows are left-padded so that every row's next token lands in the same cache column.
A row joins after a prefill of its prompt (newcomers are prefilled together, then their
cache is stacked with the batch's, left-padded to a common length), and leaves by an index select;
columns that only padding occupies are then trimmed from the left.

Each layer's keys and values live in a buffer with spare columns (``GrowingLayer``), so
a decode step writes its column in place instead of concatenating a new tensor, as
transformers' ``DynamicLayer`` does: no copy of the whole cache per step, and no heap
fragmentation from blocks that grow by one column at a time. The buffer grows by half
its length when full. transformers sees an ordinary ``Cache`` of layers.

The buffer may be kept in a narrower dtype than the model computes in (the policy set's
``kv_cache_dtype``, e.g. float16 under float32 weights): a new column is rounded when
written, and each layer's cache is cast back up when attention reads it. That halves
the cache's memory at the price of one cast of the cache per layer and step, and of
rounding the keys and values (the mixture's log-probs move by ~1e-2, not 1e-6).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from .policies import LoadedModel

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, H, T, D]


def to_logprobs(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Float32 log-softmax over the shared vocabulary (padding rows dropped)."""
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)  # [..., V]


MIN_SPARE = 32  # free columns a buffer keeps at least, so growth is rare


def _capacity_for(needed: int) -> int:
    """Columns to allocate for ``needed``: half as many again spare, at least MIN_SPARE."""
    return needed + max(MIN_SPARE, needed // 2)


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl has no malloc_trim)
        return None
    trim: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``; else nothing).

    After a prefill, a join, a leave or a growth the freed blocks (old buffers, the
    prefill's activations) lie between live cache buffers, and glibc keeps them resident;
    on the 100M benchmark that was ~50 MiB per model at a 16-row prefill. It takes a
    few milliseconds, against hundreds for the prefill that precedes it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class KVStorage:
    """How caches are stored: their dtype (None: the model's), and, when that is narrower
    than the model's, one reusable buffer that a layer's cache is cast up into for
    attention. One instance may serve every batch of an engine: layers (and models) run
    one at a time on its thread, and attention is done with a layer's cast before the
    next layer casts. Reusing the buffer avoids allocating a cast copy per layer and step,
    one column bigger each step, which fragments the heap."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self._flat: torch.Tensor | None = None  # [N] holding keys then values

    def widen(
        self, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys``/``values`` cast to ``dtype``: views of the buffer, valid until the next call."""
        nk, nv = keys.numel(), values.numel()
        flat = self._flat
        if (
            flat is None
            or flat.numel() < nk + nv
            or flat.dtype != dtype
            or flat.device != keys.device
        ):
            flat = self._flat = keys.new_empty((nk + nv) * 3 // 2, dtype=dtype)
        wide_keys = flat[:nk].view(keys.shape)
        wide_values = flat[nk : nk + nv].view(values.shape)
        wide_keys.copy_(keys)
        wide_values.copy_(values)
        return wide_keys, wide_values


class GrowingLayer(DynamicLayer):
    """A layer cache whose buffer has spare columns; ``keys``/``values`` are views of it.

    The buffer's dtype is ``storage.dtype`` (default: that of the first keys written).
    Built empty, the layer allocates its buffer at the first ``update``, so a prefill
    writes its keys and values straight into the buffer that decoding goes on filling.
    """

    def __init__(self, storage: KVStorage | None = None) -> None:
        super().__init__()
        self._storage = storage or KVStorage()
        self._length = 0

    @classmethod
    def stacking(cls, parts: Layers, length: int, storage: KVStorage | None = None) -> GrowingLayer:
        """The rows of ``parts`` (keys, values) in order, each left-padded with zeros to
        ``length`` columns, in one new buffer."""
        keys, values = parts[0]
        layer = cls(storage)
        layer._allocate(keys, values, sum(k.shape[0] for k, _ in parts), length, zeroed=True)
        row = 0
        for keys, values in parts:
            rows, columns = keys.shape[0], keys.shape[2]
            layer._key_buf[row : row + rows, :, length - columns : length] = keys
            layer._value_buf[row : row + rows, :, length - columns : length] = values
            row += rows
        layer._set_length(length)
        return layer

    @property
    def capacity(self) -> int:
        return self._key_buf.shape[2] if self.is_initialized else 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate(key_states, value_states, key_states.shape[0], 0, zeroed=False)

    def _allocate(
        self, keys: torch.Tensor, values: torch.Tensor, rows: int, needed: int, zeroed: bool
    ) -> None:
        self.device = keys.device
        self.dtype = self._storage.dtype or keys.dtype
        capacity = _capacity_for(needed) if needed else 0
        new = keys.new_zeros if zeroed else keys.new_empty
        self._key_buf = new((rows, keys.shape[1], capacity, keys.shape[3]), dtype=self.dtype)
        self._value_buf = new((rows, values.shape[1], capacity, values.shape[3]), dtype=self.dtype)
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        capacity = self._key_buf.shape[2]
        if needed <= capacity:
            return
        shape = list(self._key_buf.shape)
        shape[2] = _capacity_for(needed)
        key_buf = self._key_buf.new_empty(shape)  # [B, H, C, D]
        value_buf = self._value_buf.new_empty([*shape[:3], self._value_buf.shape[3]])
        key_buf[:, :, : self._length] = self._key_buf[:, :, : self._length]
        value_buf[:, :, : self._length] = self._value_buf[:, :, : self._length]
        self._key_buf, self._value_buf = key_buf, value_buf

    def _set_length(self, length: int) -> None:
        self._length = length
        self.keys = self._key_buf[:, :, :length]  # [B, H, T, D] views
        self.values = self._value_buf[:, :, :length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[2]
        self._reserve(end)
        self._key_buf[:, :, start:end] = key_states
        self._value_buf[:, :, start:end] = value_states
        self._set_length(end)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        if self.dtype != key_states.dtype:  # stored narrower: attention reads a cast copy
            return self._storage.widen(keys, values, key_states.dtype)
        return keys, values

    def get_seq_length(self) -> int:
        return self._length


def growing_layers(cache: Cache) -> list[GrowingLayer]:
    """``cache.layers`` itself (assigning to it replaces a layer), typed."""
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    return cache.layers  # type: ignore[return-value]


def cache_layers(cache: Cache) -> Layers:
    return [(layer.keys, layer.values) for layer in growing_layers(cache)]  # type: ignore[misc]


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pad)


def squeeze_columns(
    mask: torch.Tensor,  # [B, T] nonzero = a live column
    layers: Layers,  # keys, values [B, H, T, D] per layer
    width: int,  # the most live columns of a row
) -> tuple[torch.Tensor, Layers]:
    """Each row's live columns, in order, right-aligned in ``width`` columns (left
    padding is zeroed and masked out). Attention does not care where a column sits:
    keys carry their position, so gathering them is exact."""
    live = mask != 0  # [B, T]
    count = live.sum(dim=1, keepdim=True)  # [B, 1]
    order = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [B, T]
    # Live columns sort first (by position), dead ones after: take the first ``count``.
    rank = torch.where(live, order, order + mask.shape[1])
    source = rank.argsort(dim=1)[:, :width]  # [B, W] ascending live columns, then dead
    slot = torch.arange(width, device=mask.device).unsqueeze(0)  # [1, W]
    shift = width - count  # [B, 1] left padding of each row
    target = (slot - shift).clamp(min=0)  # [B, W] which of the row's live columns lands here
    index = source.gather(1, target)  # [B, W]
    new_mask = (slot >= shift).to(mask.dtype)  # [B, W]
    pad = (new_mask == 0)[:, None, :, None]  # [B, 1, W, 1]
    out: Layers = []
    for keys, values in layers:
        gather = index[:, None, :, None]
        k = keys.gather(2, gather.expand(-1, keys.shape[1], -1, keys.shape[3]))
        v = values.gather(2, gather.expand(-1, values.shape[1], -1, values.shape[3]))
        out.append((k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)))
    return new_mask, out


@torch.inference_mode()
def prefill_prompts(
    loaded: LoadedModel,
    prompts: list[list[int]],
    vocab_size: int,
    device: torch.device,
    storage: KVStorage,
) -> tuple[torch.Tensor, Cache, torch.Tensor]:
    """Run left-padded prompts through a fresh cache of growing layers.

    Returns the last position's log-probs [n, V], the cache (keys and values [n, H, L, D],
    padding columns zeroed) and the mask [n, L] (1 = real token).
    """
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long, device=device)  # [n, L]
    mask = torch.zeros_like(ids)  # [n, L]
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, length - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [n, L]
    # The prompt's keys and values go straight into growing buffers (in the cache dtype).
    cache = Cache(layer_class_to_replicate=functools.partial(GrowingLayer, storage))  # type: ignore[arg-type]
    kwargs: dict[str, object] = {loaded.cache_kwarg: cache}
    if loaded.accepts_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    logits = loaded.model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
    ).logits
    if not bool(mask.all()):
        # Padding positions never get attended to, but their keys/values can hold NaN (a
        # query row with nothing to attend to); 0 * NaN would leak through the softmax.
        pad = (mask == 0)[:, None, :, None]  # [n, 1, L, 1]
        for keys, values in cache_layers(cache):
            keys.masked_fill_(pad, 0.0)  # views of the buffers: zeroed in place
            values.masked_fill_(pad, 0.0)
    return to_logprobs(logits[:, -1], vocab_size), cache, mask  # [n, V]


class Prefiller(Protocol):
    """Runs a batch's newcomers whose prompts were partly run before, chunk by chunk
    (``chunked_prefill.PartialPrefills``): the rest of each prompt, with the returns of
    ``prefill_prompts``, rows in the order given."""

    def prefill(
        self, row_ids: list[int], prompts: list[list[int]]
    ) -> tuple[torch.Tensor, Cache, torch.Tensor]: ...


class GrowingBatch:
    """The sequences that one model (a policy or the reference) is decoding."""

    max_len: int | None = None  # the cache grows: no limit of its own

    def __init__(
        self,
        loaded: LoadedModel,
        vocab_size: int,
        device: torch.device,
        storage: KVStorage | None = None,
    ) -> None:
        self.loaded = loaded
        self.vocab_size = vocab_size
        self.device = device
        self.storage = storage or KVStorage()  # the cache's dtype (default: the model's)
        self.row_ids: list[int] = []  # sequence ids, in cache row order
        self.cache: Cache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # [B, T] 1 = real token
        # False while no row has left padding: the forward then gets no mask at all and
        # transformers skips building a [B, 1, 1, T] mask per layer call (pure causal).
        self.padded = False
        self._verified = 0  # columns the last verify wrote (rollback's to settle)

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
        assert self.cache is not None
        capacity = growing_layers(self.cache)[0].capacity
        logits = self._forward(
            input_ids=tokens.unsqueeze(1),  # [B, 1]
            attention_mask=self.mask if self.padded else None,
            position_ids=positions.unsqueeze(1),  # [B, 1]
            cache=self.cache,
        )
        if growing_layers(self.cache)[0].capacity != capacity:  # the buffers grew
            self._release()
        return to_logprobs(logits[:, -1], self.vocab_size)  # [B, V]

    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run ``G`` tokens per row ([B, G] each) in one forward; log-probs [B, G, V].

        Every row writes ``G`` new columns; ``rollback`` then says how many each keeps.
        """
        width = tokens.shape[1]
        ones = torch.ones(len(self), width, dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)  # [B, T + G]
        assert self.cache is not None
        capacity = growing_layers(self.cache)[0].capacity
        logits = self._forward(
            input_ids=tokens,  # [B, G]
            attention_mask=self.mask if self.padded else None,
            position_ids=positions,  # [B, G]
            cache=self.cache,
        )
        if growing_layers(self.cache)[0].capacity != capacity:
            self._release()
        self._verified += width  # unsettled columns, maybe of several verifies
        return to_logprobs(logits, self.vocab_size)  # [B, G, V]

    @torch.inference_mode()
    def rollback(self, kept: list[int]) -> None:
        """Keep the first ``kept[r]`` of the last ``verify``'s columns of row r (row order).

        Columns no row keeps are cropped; the others are masked out (a hole attention
        skips: positions are explicit), and squeezed away once they add up."""
        width, self._verified = self._verified, 0
        if not width or self.cache is None:
            return
        kept = [min(k, width) for k in kept]  # a row that joined since keeps its columns
        keep = torch.tensor(kept, device=self.device)  # [B]
        live = torch.arange(width, device=self.device) < keep.unsqueeze(1)  # [B, G]
        self.mask[:, -width:] *= live.long()
        crop = width - max(kept)
        if crop:
            self.mask = self.mask[:, : self.mask.shape[1] - crop]
            for layer in growing_layers(self.cache):
                layer._set_length(layer.get_seq_length() - crop)
        if min(kept) < max(kept):
            self.padded = True
            self._squeeze_if_sparse()

    def _squeeze_if_sparse(self) -> None:
        """Gather each row's live columns to the right when holes fill a quarter of them."""
        used = self.mask.sum(dim=1)  # [B]
        width, columns = int(used.max()), self.mask.shape[1]
        if columns - width < max(MIN_SPARE, columns // 4):
            return
        assert self.cache is not None
        self.mask, parts = squeeze_columns(self.mask, cache_layers(self.cache), width)
        layers = growing_layers(self.cache)
        for i, part in enumerate(parts):
            layers[i] = GrowingLayer.stacking([part], width, self.storage)
        self._release()

    def _release(self) -> None:
        if self.device.type == "cpu":  # on a GPU the cache is not on the C heap
            release_free_memory()

    @torch.inference_mode()
    def prefill(
        self, row_ids: list[int], prompts: list[list[int]], parts: Prefiller | None = None
    ) -> torch.Tensor:
        """Run the newcomers' prompts (the rest of them, for rows ``parts`` has started),
        add them to the batch; return their log-probs [n, V]."""
        if parts is not None:
            result, cache, mask = parts.prefill(row_ids, prompts)
        else:
            result, cache, mask = prefill_prompts(
                self.loaded, prompts, self.vocab_size, self.device, self.storage
            )
        self._stack(row_ids, cache, mask)
        del cache
        self._release()
        return result

    def append(self, row_ids: list[int], cache: Cache, mask: torch.Tensor) -> None:
        """Add rows prefilled elsewhere (``prefix_cache``): their ``cache`` of growing
        layers and ``mask`` [n, L]; the caller drops its reference to ``cache``."""
        self._stack(row_ids, cache, mask)

    def _stack(self, row_ids: list[int], cache: Cache, mask: torch.Tensor) -> None:
        if self.cache is None or not self.row_ids:
            self.cache, self.mask, self.row_ids = cache, mask, list(row_ids)
            self.padded = not bool(mask.all())
            return
        length = max(self.mask.shape[1], mask.shape[1])
        # Layer by layer, so that only one layer's old and new buffers coexist.
        layers = growing_layers(self.cache)
        for i, (old, new) in enumerate(zip(layers, growing_layers(cache))):
            parts = [(old.keys, old.values), (new.keys, new.values)]
            layers[i] = GrowingLayer.stacking(parts, length, self.storage)  # type: ignore[arg-type]
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
        self.padded = not bool(self.mask.all())
        self.row_ids += row_ids

    def keep(self, keep_ids: set[int]) -> None:
        """Drop every row whose id is not in ``keep_ids``; trim all-padding columns."""
        rows = [i for i, rid in enumerate(self.row_ids) if rid in keep_ids]
        if len(rows) == len(self.row_ids):
            return
        self._verified = 0
        self.row_ids = [self.row_ids[i] for i in rows]
        if not rows or self.cache is None:
            self.cache, self.mask, self.padded = None, self.mask[:0, :0], False
            self._release()
            return
        index = torch.tensor(rows, device=self.device)
        mask = self.mask.index_select(0, index)  # [B', T]
        start = int((mask.sum(dim=0) > 0).nonzero()[0])  # first column some row uses
        self.mask = mask[:, start:]
        self.padded = not bool(self.mask.all())
        layers = growing_layers(self.cache)
        for i, layer in enumerate(layers):
            assert layer.keys is not None and layer.values is not None
            parts = [
                (
                    layer.keys.index_select(0, index)[:, :, start:],
                    layer.values.index_select(0, index)[:, :, start:],
                )
            ]
            layers[i] = GrowingLayer.stacking(parts, self.mask.shape[1], self.storage)
        self._release()
