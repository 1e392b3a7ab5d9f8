"""Prompts that open with a known prefix: the prefix's KV is computed once and reused.

A persona family's rows share a few openings (each persona's system block, the plain
model's default one). ``PrefixCache`` runs such an opening once and keeps its keys and
values ``[1, H, L, D]`` per layer; ``prefill_after_prefixes`` then prefills newcomers by
running only what follows their opening, on top of a cache that holds the opening.

Layout of a prefill of n rows whose openings have lengths ``L_i`` (0: none) and whose
remaining tokens have lengths ``S_i``: columns ``[0, P)`` hold the openings right-aligned
(``P = max L_i``), columns ``[P, P + S)`` the remaining tokens right-aligned
(``S = max S_i``); the mask marks the real columns and each token's position is its
index in its own prompt, so the row attends to exactly what a prefill of its whole
prompt would (a row may have a hole of padding between its opening and the rest).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
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


class PrefixCache:
    """The keys and values of a few token prefixes under one model, computed on first use.

    The family's own openings stay for good; a request's openings (``pinned=False``: its
    own personas) are kept for the ``capacity`` most recently used, and their look-ups
    are counted (``hits``, ``misses``)."""

    def __init__(
        self,
        loaded: LoadedModel,
        vocab_size: int,
        device: torch.device,
        storage: KVStorage,
        capacity: int = 16,
    ) -> None:
        self.loaded = loaded
        self.vocab_size = vocab_size
        self.device = device
        self.storage = storage
        self.capacity = capacity
        self._kv: dict[tuple[int, ...], Layers] = {}
        self._recent: OrderedDict[tuple[int, ...], Layers] = OrderedDict()
        self.computed = 0  # prefixes run so far (a pinned one once)
        self.hits = 0  # unpinned look-ups found
        self.misses = 0  # unpinned look-ups run

    def get(self, prefix: Sequence[int], pinned: bool = True) -> Layers:
        """Per layer (keys, values) ``[1, H, L, D]`` of ``prefix`` (L = its length)."""
        key = tuple(prefix)
        kv = self._kv.get(key)
        if kv is None and not pinned:
            kv = self._recent.get(key)
            if kv is not None:
                self._recent.move_to_end(key)
        if kv is not None:
            self.hits += 0 if pinned else 1
            return kv
        _, cache, _ = prefill_prompts(
            self.loaded, [list(prefix)], self.vocab_size, self.device, self.storage
        )
        kv = [(k.clone(), v.clone()) for k, v in cache_layers(cache)]
        self.computed += 1
        if pinned:
            self._kv[key] = kv
        else:
            self.misses += 1
            self._recent[key] = kv
            while len(self._recent) > self.capacity:
                self._recent.popitem(last=False)
        return kv

    def stats(self) -> dict[str, int]:
        """The request openings' cache: hits, misses, entries held and capacity."""
        return {
            "hits": self.hits, "misses": self.misses, "entries": len(self._recent),
            "capacity": self.capacity,
        }  # fmt: skip


@torch.inference_mode()
def prefill_after_prefixes(
    prefixes: PrefixCache,
    openings: Sequence[Sequence[int]],
    rests: Sequence[Sequence[int]],
    pinned: Sequence[bool] | None = None,
) -> tuple[torch.Tensor, Cache, torch.Tensor]:
    """Prefill rows ``openings[i] + rests[i]`` (each rest non-empty), reusing the cached
    KV of every non-empty opening (``pinned[i]``, default True: the family's own, kept for
    good); same returns as ``kvcache.prefill_prompts``."""
    loaded, device, storage = prefixes.loaded, prefixes.device, prefixes.storage
    n = len(rests)
    past = max(len(o) for o in openings)  # P
    new = max(len(r) for r in rests)  # S
    ids = torch.zeros(n, new, dtype=torch.long, device=device)  # [n, S]
    mask = torch.zeros(n, past + new, dtype=torch.long, device=device)  # [n, P + S]
    positions = torch.zeros(n, new, dtype=torch.long, device=device)  # [n, S]
    for row, (opening, rest) in enumerate(zip(openings, rests)):
        ids[row, new - len(rest) :] = torch.tensor(list(rest), device=device)
        mask[row, past - len(opening) : past] = 1
        mask[row, past + new - len(rest) :] = 1
        positions[row, new - len(rest) :] = torch.arange(
            len(opening), len(opening) + len(rest), device=device
        )
    keeps = [True] * n if pinned is None else list(pinned)
    kvs = [prefixes.get(o, keep) if o else None for o, keep in zip(openings, keeps)]
    shape_from = next(kv for kv in kvs if kv is not None)
    layers = []
    for layer, (keys, values) in enumerate(shape_from):
        empty_k, empty_v = keys[:, :, :0], values[:, :, :0]  # [1, H, 0, D]
        parts = [(kv[layer] if kv is not None else (empty_k, empty_v)) for kv in kvs]
        layers.append(GrowingLayer.stacking(parts, past, storage))
    cache = Cache(layers=layers)  # type: ignore[arg-type]
    kwargs: dict[str, object] = {loaded.cache_kwarg: cache}
    if loaded.accepts_logits_to_keep:
        kwargs["logits_to_keep"] = 1
    logits = loaded.model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
    ).logits
    # As in prefill_prompts: padding columns may hold NaN keys/values; zero them.
    pad = (mask == 0)[:, None, :, None]  # [n, 1, P + S, 1]
    for keys, values in cache_layers(cache):
        keys.masked_fill_(pad, 0.0)
        values.masked_fill_(pad, 0.0)
    return to_logprobs(logits[:, -1], prefixes.vocab_size), cache, mask  # [n, V]
