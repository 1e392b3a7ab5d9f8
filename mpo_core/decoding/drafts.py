"""Where drafted tokens come from: n-gram lookup (free) or a cheap draft model.

``NgramDrafter`` is prompt lookup: the row's last few tokens are searched for earlier in
its prompt and reply, and the tokens that followed the latest match are proposed (each
with probability one for the acceptance rule). Replies that quote or repeat their
context (code, extraction, lists, chat templates) get long runs for nothing.

``ModelDrafter`` runs a small model that shares the tokenizer, one token at a time, on a
KV cache of its own: each step it first catches up with the tokens its rows emitted
since (one forward over up to ``gamma + 1`` tokens a row), then drafts. A greedy row
drafts the argmax; a sampled row draws from the draft model's distribution after the
row's own processors, with the row's generator, and reports that distribution as ``q``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from ..engine.requests import SequenceState
from ..models.kvcache import GrowingBatch, KVStorage
from ..models.policies import LoadedModel
from .acceptance import Draft, target_probs


class Drafter(Protocol):
    def propose(self, rows: Sequence[SequenceState], gammas: Sequence[int]) -> list[Draft]:
        """Up to ``gammas[i]`` drafted tokens for each row (maybe fewer, maybe none)."""
        ...

    def keep(self, sids: set[int]) -> None:
        """Forget every row whose sid is not in ``sids``."""
        ...


class NgramDrafter:
    """Prompt lookup over the prompt and the reply so far."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, rows: Sequence[SequenceState], gammas: Sequence[int]) -> list[Draft]:
        return [
            Draft(lookup(row.token_ids, g, self.max_ngram, self.min_ngram))
            for row, g in zip(rows, gammas)
        ]

    def keep(self, sids: set[int]) -> None:
        pass


def lookup(tokens: Sequence[int], gamma: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """The ``gamma`` tokens after the latest earlier occurrence of the longest suffix
    (``max_ngram`` down to ``min_ngram`` tokens) of ``tokens``; [] if none occurs."""
    if gamma <= 0:
        return []
    n_tokens = len(tokens)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        suffix = list(tokens[n_tokens - n :])
        for start in range(n_tokens - n - 1, -1, -1):  # latest match first
            if list(tokens[start : start + n]) == suffix:
                follow = list(tokens[start + n : start + n + gamma])
                if follow:
                    return follow
    return []


class ModelDrafter:
    """A draft model on its own growing cache (rows keyed by the requests' sids)."""

    def __init__(
        self,
        loaded: LoadedModel,
        vocab_size: int,
        device: torch.device,
        storage: KVStorage | None = None,
    ) -> None:
        # An adapter family's member is a view that sets the adapter index itself.
        self.batch = GrowingBatch(loaded, vocab_size, device, storage)
        self.device = device
        self.cached: dict[int, int] = {}  # sid -> tokens of it in the draft cache

    def keep(self, sids: set[int]) -> None:
        self.batch.keep(sids)
        self.cached = {sid: n for sid, n in self.cached.items() if sid in sids}

    @torch.inference_mode()
    def propose(self, rows: Sequence[SequenceState], gammas: Sequence[int]) -> list[Draft]:
        """Only rows with gamma > 0 run (a row that pauses is dropped from the draft
        cache, and prefilled again when it drafts again)."""
        drafting = {row.sid: row for row, g in zip(rows, gammas) if g > 0}
        if not drafting:
            return [Draft([]) for _ in rows]
        gamma_of = {row.sid: g for row, g in zip(rows, gammas)}
        drafts = self._draft(drafting, gamma_of)
        return [drafts.get(row.sid, Draft([])) for row in rows]

    def _catch_up(self, rows: Mapping[int, SequenceState]) -> torch.Tensor:
        """Bring every batch row's cache up to its tokens; next-token log-probs [B, V]."""
        newcomers = [sid for sid in rows if sid not in self.cached]
        if newcomers:
            # A running row has its prompt and at least one reply token: [:-1] is not empty.
            self.batch.prefill(newcomers, [rows[sid].token_ids[:-1] for sid in newcomers])
            for sid in newcomers:
                self.cached[sid] = len(rows[sid].token_ids) - 1
        order = self.batch.row_ids
        missing = [rows[sid].token_ids[self.cached[sid] :] for sid in order]  # >= 1 each
        width = max(len(m) for m in missing)
        tokens = [m + [m[-1]] * (width - len(m)) for m in missing]
        positions = [
            [min(self.cached[sid] + j, len(rows[sid].token_ids) - 1) for j in range(width)]
            for sid in order
        ]
        logprobs = self.batch.verify(
            torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device)
        )  # [B, W, V]
        self.batch.rollback([len(m) for m in missing])
        for sid in order:
            self.cached[sid] = len(rows[sid].token_ids)
        last = torch.tensor([len(m) - 1 for m in missing], device=self.device)  # [B]
        return logprobs[torch.arange(len(order), device=self.device), last]  # [B, V]

    def _draft(
        self, rows: Mapping[int, SequenceState], gamma_of: Mapping[int, int]
    ) -> dict[int, Draft]:
        self.keep(set(rows))
        logprobs = self._catch_up(rows)  # [B, V]
        order = list(self.batch.row_ids)
        seqs = [rows[sid] for sid in order]
        gamma = max(gamma_of[sid] for sid in order)
        tokens: list[list[int]] = [[] for _ in order]
        dists: list[list[torch.Tensor]] = [[] for _ in order]
        for step in range(gamma):
            seen = [s.token_ids + t for s, t in zip(seqs, tokens)]
            probs = target_probs(logprobs, [s.sampling for s in seqs], seen)  # [B, V]
            picks = []
            for b, seq in enumerate(seqs):
                if seq.sampling.greedy:
                    picks.append(int(probs[b].argmax()))
                else:
                    picks.append(int(torch.multinomial(probs[b], 1, generator=seq.generator)))
                tokens[b].append(picks[-1])
                dists[b].append(probs[b])
            if step + 1 == gamma:
                break
            positions = [len(s.token_ids) + step for s in seqs]
            logprobs = self.batch.verify(
                torch.tensor(picks, device=self.device).unsqueeze(1),
                torch.tensor(positions, device=self.device).unsqueeze(1),
            )[:, 0]  # [B, V]
        self.batch.rollback([0] * len(order))  # the drafted columns: settled next step
        out = {}
        for b, (sid, seq) in enumerate(zip(order, seqs)):
            g = gamma_of[sid]
            sampled = not seq.sampling.greedy and g > 0
            out[sid] = Draft(tokens[b][:g], torch.stack(dists[b][:g]) if sampled else None)
        return out
