"""Prompts prefilled in chunks: each row's keys and values so far, until its last chunk.

A long prompt's prefill may run in pieces between decode steps (the engine's per-step
prompt budget, docs/engine.md, "Chunked prefill"). Until its last piece a row is not in
its batch: its keys and values grow in a one-row cache of its own (``GrowingLayer``s),
each piece running on top of it at the positions that follow, with logits for its last
position only. The last piece (``prefill``) returns what ``kvcache.prefill_prompts``
returns for whole prompts, the last position's log-probs, a cache and a mask, with the
rows in the order asked, so a batch stacks or copies it in exactly as it does a prefill.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from .kvcache import (
    GrowingLayer,
    KVStorage,
    Layers,
    cache_layers,
    prefill_prompts,
    to_logprobs,
)
from .policies import LoadedModel


class PartialPrefills:
    """One model's rows whose prompts are partly prefilled, by row id."""

    def __init__(
        self,
        loaded: LoadedModel,
        vocab_size: int,
        device: torch.device,
        storage: KVStorage,
        select: Callable[[list[int]], object] | None = None,
    ) -> None:
        self.loaded = loaded
        self.vocab_size = vocab_size
        self.device = device
        self.storage = storage
        # Called with a forward's row ids, in its row order, before it runs (an adapter
        # family writes each row's adapter into its index).
        self.select = select or (lambda _rows: None)
        self._caches: dict[int, Cache] = {}

    def __contains__(self, row_id: int) -> bool:
        return row_id in self._caches

    def __len__(self) -> int:
        return len(self._caches)

    def done(self, row_id: int) -> int:
        """Tokens of the row's prompt already in its cache (0: not started)."""
        cache = self._caches.get(row_id)
        return 0 if cache is None else cache.get_seq_length()

    def extend(self, row_id: int, prompt: list[int], opening: Layers | None = None) -> None:
        """Run ``prompt`` (the row's prompt up to this chunk's end) after what the row's
        cache holds. A row not started yet may start from ``opening``: the keys and values
        ``[1, H, L, D]`` per layer of its first L tokens (a persona's cached opening,
        shorter than the row's whole prompt)."""
        if row_id not in self._caches and opening is not None:
            length = opening[0][0].shape[2]
            layers = [GrowingLayer.stacking([kv], length, self.storage) for kv in opening]
            self._caches[row_id] = Cache(layers=layers)  # type: ignore[arg-type]
        if len(prompt) > self.done(row_id):
            self._run(row_id, prompt)

    @torch.inference_mode()
    def _run(self, row_id: int, prompt: list[int]) -> torch.Tensor:
        """Run the tokens of ``prompt`` past the row's cache; the last one's log-probs [V]."""
        cache = self._caches.get(row_id)
        if cache is None:
            storage = self.storage
            cache = Cache(layer_class_to_replicate=functools.partial(GrowingLayer, storage))  # type: ignore[arg-type]
            self._caches[row_id] = cache
        done = cache.get_seq_length()
        self.select([row_id])
        ids = torch.tensor([prompt[done:]], device=self.device)  # [1, n]
        positions = torch.arange(done, len(prompt), device=self.device).unsqueeze(0)  # [1, n]
        kwargs: dict[str, object] = {self.loaded.cache_kwarg: cache}
        if self.loaded.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        # No mask: one row, no padding; the cache's length places the chunk causally.
        logits = self.loaded.model(
            input_ids=ids, position_ids=positions, use_cache=True, **kwargs
        ).logits
        return to_logprobs(logits[0, -1], self.vocab_size)  # [V]

    def prefill(
        self, row_ids: list[int], prompts: list[list[int]]
    ) -> tuple[torch.Tensor, Cache, torch.Tensor]:
        """The last chunk of the started rows and the whole prompt of the others: the same
        returns as ``prefill_prompts`` (log-probs [n, V], a cache, a mask [n, L]), rows in
        the order of ``row_ids``; the started rows are forgotten here."""
        started = [i for i, rid in enumerate(row_ids) if rid in self._caches]
        if not started:
            return prefill_prompts(self.loaded, prompts, self.vocab_size, self.device, self.storage)
        fresh = [i for i in range(len(row_ids)) if i not in set(started)]
        logprobs: list[torch.Tensor] = [torch.empty(0)] * len(row_ids)  # [V] each
        layers: list[Layers] = [[] for _ in row_ids]  # per row: (keys, values) [1, H, L, D]
        masks: list[torch.Tensor] = [torch.empty(0)] * len(row_ids)  # [1, L] each
        if fresh:
            self.select([row_ids[i] for i in fresh])
            out, cache, mask = prefill_prompts(
                self.loaded, [prompts[i] for i in fresh], self.vocab_size, self.device,
                self.storage,
            )  # fmt: skip
            kv = cache_layers(cache)
            for j, i in enumerate(fresh):
                logprobs[i], masks[i] = out[j], mask[j : j + 1]
                layers[i] = [(k[j : j + 1], v[j : j + 1]) for k, v in kv]
        for i in started:
            logprobs[i] = self._run(row_ids[i], prompts[i])
            cache = self._caches.pop(row_ids[i])
            if len(row_ids) == 1:  # alone: its own cache is the result, no copy
                ones = torch.ones(1, len(prompts[i]), dtype=torch.long, device=self.device)
                return logprobs[i].unsqueeze(0), cache, ones
            layers[i] = cache_layers(cache)
            masks[i] = torch.ones(1, len(prompts[i]), dtype=torch.long, device=self.device)
        length = max(m.shape[1] for m in masks)
        stacked = [
            GrowingLayer.stacking([row[layer] for row in layers], length, self.storage)
            for layer in range(len(layers[0]))
        ]
        mask = torch.cat([F.pad(m, (length - m.shape[1], 0)) for m in masks])  # [n, L]
        return torch.stack(logprobs), Cache(layers=stacked), mask  # type: ignore[arg-type]

    def keep(self, keep_ids: set[int]) -> None:
        """Forget the started rows whose id is not in ``keep_ids``."""
        for row_id in [r for r in self._caches if r not in keep_ids]:
            del self._caches[row_id]
