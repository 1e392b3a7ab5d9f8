"""Static KV caches and CUDA graphs: a decode step with fixed shapes, captured once.

A ``StaticBatch`` is a drop-in for ``GrowingBatch`` (same ``decode``/``prefill``/``keep``).
Its keys and values live in buffers allocated once, ``[slots, H, max_len, D]`` per layer,
and rows occupy slots ``0..n-1``. As in the growing cache, rows are left-padded so that
every row writes its next token into the same column ``c``; a boolean mask
``[slots, max_len]`` says which columns each row attends to. A decode step therefore
has the same shapes every time for a given row count: tokens, positions and the mask
are copied into static input buffers, the column into a one-element tensor that the
cache layers write at, and the whole forward (embedding, every layer, the head and the
log-softmax) replays as one CUDA graph. Graphs are captured at start-up for bucket
sizes 1, 2, 4, ... up to ``slots``; a step with n rows replays the smallest bucket that
holds them (the spare rows compute garbage that nobody reads).

Everything that changes shapes stays outside the graph and runs eagerly: the prefill
of newcomers (through the growing cache, then copied into free slots), a leave (the
last rows move into the holes), and compaction (when ``c`` reaches ``max_len`` the used
window is moved back to column 0). On the CPU the same code runs without graphs, which
is how the tests check it against the growing cache.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .kvcache import (
    KVStorage,
    Prefiller,
    cache_layers,
    prefill_prompts,
    squeeze_columns,
    to_logprobs,
)
from .policies import LoadedModel

logger = logging.getLogger(__name__)

DEFAULT_MAX_CACHE_LEN = 4096  # columns per slot when the config does not say


def buckets_for(slots: int) -> list[int]:
    """Row counts a graph is captured for: powers of two below ``slots``, then ``slots``."""
    sizes, size = [], 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return [*sizes, slots]


def static_unsupported(loaded: LoadedModel, max_len: int) -> str | None:
    """Why this model cannot decode from a static cache with our mask, or None."""
    config = loaded.model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (static caches need 'sdpa' or 'eager')"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    window = getattr(config, "sliding_window", None)
    sliding_on = getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = sliding_on and (window is not None or any(t != "full_attention" for t in layer_types))
    # With a window at least as long as the cache, sliding attention sees every column.
    if sliding and (window is None or window < max_len):
        return f"sliding-window attention (window {window} < {max_len} cache columns)"
    return None


class SlotLayer(DynamicLayer):
    """One layer's keys and values for the first ``b`` slots; writes at the shared column."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values  # [b, H, T, D] views of the slot buffers
        self.column = column  # [1] long: where this step's token goes
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        keys.index_copy_(2, self.column, key_states.to(keys.dtype))  # [b, H, 1, D]
        values.index_copy_(2, self.column, value_states.to(values.dtype))
        if keys.dtype != key_states.dtype:  # stored narrower: attention reads a cast copy
            return keys.to(key_states.dtype), values.to(value_states.dtype)
        return keys, values

    def get_seq_length(self) -> int:
        return int(self.keys.shape[2]) if self.keys is not None else 0


class StaticBatch:
    """The rows one model decodes, in preallocated slots; optionally CUDA-graphed."""

    def __init__(
        self,
        loaded: LoadedModel,
        vocab_size: int,
        device: torch.device,
        slots: int,
        max_len: int,
        kv_dtype: torch.dtype | None = None,
        graphs: bool = False,
        pool: Any = None,
    ) -> None:
        self.loaded = loaded
        self.vocab_size = vocab_size
        self.device = device
        self.slots = slots
        self.max_len = max_len
        self.storage = KVStorage(kv_dtype)
        self.row_ids: list[int] = []  # sequence ids, in slot order
        self.compactions = 0  # times the used window was moved back to column 0
        self.column = 0  # next column every row writes to
        self._column = torch.zeros(1, dtype=torch.long, device=device)  # the same, for the graph
        self.mask = torch.zeros(slots, max_len, dtype=torch.bool, device=device)
        self.ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.keys, self.values = self._allocate(kv_dtype)
        self._caches: dict[int, Cache] = {}
        self._eager_mask = getattr(loaded.model.config, "_attn_implementation", "") == "eager"
        self._verified = 0  # columns the last verify wrote (rollback's to settle)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if graphs:
            self._capture_all(pool)

    def __len__(self) -> int:
        return len(self.row_ids)

    @torch.inference_mode()
    def _allocate(self, kv_dtype: torch.dtype | None) -> tuple[list[torch.Tensor], ...]:
        """Slot buffers shaped after one probe token's keys and values, layer by layer."""
        _, cache, _ = prefill_prompts(
            self.loaded, [[0]], self.vocab_size, self.device, self.storage
        )
        keys, values = [], []
        for k, v in cache_layers(cache):  # [1, H, 1, D]
            dtype = kv_dtype or k.dtype
            keys.append(
                k.new_zeros((self.slots, k.shape[1], self.max_len, k.shape[3]), dtype=dtype)
            )
            values.append(
                v.new_zeros((self.slots, v.shape[1], self.max_len, v.shape[3]), dtype=dtype)
            )
        return keys, values

    # -- the fixed-shape step ----------------------------------------------------------
    def _cache(self, rows: int) -> Cache:
        cache = self._caches.get(rows)
        if cache is None:
            layers = [
                SlotLayer(k[:rows], v[:rows], self._column) for k, v in zip(self.keys, self.values)
            ]
            cache = self._caches[rows] = Cache(layers=layers)  # type: ignore[arg-type]
        return cache

    def _forward(self, rows: int) -> torch.Tensor:
        """Log-probs [rows, V] of the first ``rows`` slots' tokens in the input buffers."""
        mask = self.mask[:rows, None, None, :]  # [b, 1, 1, T] True = attend
        if self._eager_mask:  # eager attention adds its mask to the scores
            mask = self._additive(mask)
        logits = self.loaded.model(
            input_ids=self.ids[:rows],  # [b, 1]
            attention_mask=mask,
            position_ids=self.positions[:rows],  # [b, 1]
            use_cache=True,
            **{self.loaded.cache_kwarg: self._cache(rows)},
        ).logits
        return to_logprobs(logits[:, -1], self.vocab_size)  # [b, V]

    @torch.inference_mode()
    def _capture_all(self, pool: Any) -> None:
        """Capture one graph per bucket (the batch is empty: warm-up writes are harmless)."""
        self.mask[:, 0] = True  # every slot attends to something during the warm-up
        with torch.cuda.device(self.device):  # capture on the model's GPU, not the current one
            stream = torch.cuda.Stream(self.device)
            for rows in buckets_for(self.slots):
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):  # lazy initialisation, kernel autotuning
                        self._forward(rows)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._forward(rows)
                self.graphs[rows] = (graph, out)
        self.mask.zero_()
        for buf in (*self.keys, *self.values):
            buf.zero_()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run the rows' newest tokens ([n] each, in slot order); return log-probs [n, V].

        The result may be a view of a graph's output: copy it before the next step.
        """
        n = len(self.row_ids)
        if self.column >= self.max_len:
            self._compact()
        c = self.column
        self.ids[:n, 0] = tokens
        self.positions[:n, 0] = positions
        self.mask[:, c] = True  # each slot's token lands here (spare slots attend to it alone)
        self._column.fill_(c)
        self.column = c + 1
        if self.graphs:
            rows = next(b for b in sorted(self.graphs) if b >= n)
            graph, out = self.graphs[rows]
            with torch.cuda.device(self.device):  # the graph's GPU, whatever the thread's
                graph.replay()
            return out[:n]
        return self._forward(n)

    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run ``G`` tokens per row ([n, G] each) in one eager forward; log-probs [n, G, V].

        The rows write columns ``c .. c + G - 1``; ``rollback`` masks out what they reject.
        """
        n, width = tokens.shape
        if self.column + width > self.max_len:
            self._compact(width)
        c = self.column
        columns = torch.arange(c, c + width, device=self.device)  # [G]
        self.mask[:, c : c + width] = True
        mask = self.mask[:n, None, None, :].expand(n, 1, width, self.max_len).clone()
        # [n, 1, G, T]: a drafted token sees the ones before it, not those after.
        later = torch.ones(width, width, dtype=torch.bool, device=self.device).triu(1)
        mask[:, 0, :, c : c + width] &= ~later
        self.column = c + width
        self._verified += width  # unsettled columns, maybe of several verifies
        layers = [SlotLayer(k[:n], v[:n], columns) for k, v in zip(self.keys, self.values)]
        logits = self.loaded.model(
            input_ids=tokens,  # [n, G]
            attention_mask=self._additive(mask) if self._eager_mask else mask,
            position_ids=positions,  # [n, G]
            use_cache=True,
            **{self.loaded.cache_kwarg: Cache(layers=layers)},  # type: ignore[arg-type]
        ).logits
        return to_logprobs(logits, self.vocab_size)  # [n, G, V]

    @torch.inference_mode()
    def rollback(self, kept: list[int]) -> None:
        """Keep the first ``kept[r]`` of the last ``verify``'s columns of row r (slot order):
        the others are masked out (dead columns), and compaction reclaims them."""
        width, self._verified = self._verified, 0
        if not width:
            return
        c = self.column - width
        kept = [min(k, width) for k in kept]  # a row that joined since keeps its columns
        keep = torch.tensor(kept, device=self.device)  # [n]
        live = torch.arange(width, device=self.device) < keep.unsqueeze(1)  # [n, G]
        self.mask[: len(kept), c : c + width] &= live
        crop = width - max(kept)  # columns no row keeps: the next step writes over them
        self.mask[:, self.column - crop : self.column] = False
        self.column -= crop

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        """A boolean mask as eager attention wants it: 0 to attend, the dtype's min not to."""
        dtype = self.loaded.model.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )

    # -- shape changes (eager) -----------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self, row_ids: list[int], prompts: list[list[int]], parts: Prefiller | None = None
    ) -> torch.Tensor:
        """Prefill the newcomers' prompts (the rest of them, for rows ``parts`` has
        started) into free slots; return their log-probs [m, V]."""
        if parts is not None:
            result, cache, prompt_mask = parts.prefill(row_ids, prompts)
        else:
            result, cache, prompt_mask = prefill_prompts(
                self.loaded, prompts, self.vocab_size, self.device, self.storage
            )
        n, m, length = len(self.row_ids), len(prompts), prompt_mask.shape[1]
        assert n + m <= self.slots, "more rows than slots: the engine admits at most max_running"
        if n == 0:
            self.column = length
        elif self.column < length:  # make room on the left for the longer prompt
            start = self._first_used_column()
            self._move(start, start + length - self.column, self.column - start)
        c = self.column
        for buf, (k, v) in zip(zip(self.keys, self.values), cache_layers(cache)):
            buf[0][n : n + m, :, c - length : c] = k  # [m, H, L, D]
            buf[1][n : n + m, :, c - length : c] = v
        self.mask[n : n + m] = False
        self.mask[n : n + m, c - length : c] = prompt_mask.bool()
        self.row_ids += row_ids
        return result

    @torch.inference_mode()
    def keep(self, keep_ids: set[int]) -> None:
        """Drop every row not in ``keep_ids``; the last rows move into the holes."""
        kept = [i for i, rid in enumerate(self.row_ids) if rid in keep_ids]
        if len(kept) == len(self.row_ids):
            return
        self._verified = 0
        remaining = len(kept)
        if remaining == 0:
            self.row_ids, self.column = [], 0
            self.mask.zero_()
            return
        kept_set = set(kept)
        holes = [i for i in range(remaining) if i not in kept_set]
        movers = [i for i in kept if i >= remaining]
        ids = list(self.row_ids)
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            for buf in (*self.keys, *self.values, self.mask):
                buf.index_copy_(0, dst, buf.index_select(0, src))
            for hole, mover in zip(holes, movers):
                ids[hole] = ids[mover]
        self.mask[remaining:] = False
        self.row_ids = ids[:remaining]

    def _first_used_column(self) -> int:
        used = self.mask[: len(self.row_ids), : self.column].any(dim=0)  # [c]
        return int(used.nonzero()[0]) if bool(used.any()) else self.column

    def _compact(self, room: int = 1) -> None:
        """The column reached the end: move the used window back to column 0, squeezing
        out the dead columns that rejected drafts left (``room``: columns needed next)."""
        n = len(self.row_ids)
        width = int(self.mask[:n].sum(dim=1).max()) if n else 0
        if width + room > self.max_len:
            raise RuntimeError(
                f"a row needs more than the static cache's {self.max_len} columns"
            )  # the engine caps prompt + reply (and drafts) at max_len, so this is a bug
        start = self._first_used_column()
        if width == self.column - start:  # no dead columns: one move of the window
            self._move(start, 0, width)
        else:
            self._squeeze(width)
        self.compactions += 1

    def _squeeze(self, width: int) -> None:
        """Each used slot's live columns, right-aligned in columns [0, width)."""
        n = len(self.row_ids)
        layers = list(zip(self.keys, self.values))
        mask, parts = squeeze_columns(
            self.mask[:n], [(k[:n], v[:n]) for k, v in layers], width
        )  # [n, W]; [n, H, W, D] per layer
        for (keys, values), (k, v) in zip(layers, parts):
            keys[:n, :, :width] = k
            values[:n, :, :width] = v
        self.mask[:n] = False
        self.mask[:n, :width] = mask.bool()
        self.column = width

    def _move(self, src: int, dst: int, width: int) -> None:
        """Move columns [src, src + width) of the used slots to [dst, dst + width)."""
        n = len(self.row_ids)
        for buf in (*self.keys, *self.values):
            buf[:n, :, dst : dst + width] = buf[:n, :, src : src + width].clone()
        window = self.mask[:n, src : src + width].clone()
        self.mask[:n] = False
        self.mask[:n, dst : dst + width] = window
        self.column = dst + width
