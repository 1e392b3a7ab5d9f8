"""Choosing a step's tokens from the rows' mixtures: sampled one per row (grammar masks
first), or, after a verify of drafted tokens, the drafts the acceptance rule keeps and
one more token (``acceptance``). A row whose mixture has no finite token to choose emits
nothing and is reported, for the engine to fail it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .acceptance import Draft, verify_rows
from .grammar import advance, constrain
from .sampling import sample_tokens

if TYPE_CHECKING:
    from ..engine.requests import SequenceState


def sample_rows(
    rows: Sequence[SequenceState],
    mixed: torch.Tensor,  # [B, V]
) -> tuple[list[list[int]], list[bool]]:
    """A plain step: one token per row from its grammar-masked mixture, with its sampling
    parameters and generator (the grammar advances). Per row its tokens ([] when it has
    no finite token) and whether it was usable."""
    allowed = constrain(mixed, [s.grammar for s in rows])  # [B, V] grammar rows masked
    usable = torch.isfinite(allowed.logsumexp(dim=-1)).tolist()  # [B] False: NaN, no token
    emitted: list[list[int]] = [[] for _ in rows]
    live = [b for b, ok in enumerate(usable) if ok]
    if live:
        picked = [rows[b] for b in live]
        index = torch.tensor(live, device=allowed.device)
        candidates = allowed if len(live) == len(rows) else allowed[index]  # [B', V]
        tokens = sample_tokens(
            candidates,
            [s.sampling for s in picked],
            [s.generator for s in picked],
            [s.token_ids for s in picked],
        )  # [B']
        advance([s.grammar for s in picked], tokens)
        for b, token in zip(live, tokens.tolist()):
            emitted[b] = [token]
    return emitted, usable


def accept_rows(
    rows: Sequence[SequenceState],
    drafts: Sequence[Draft],  # per row, maybe empty (a newcomer, or nothing drafted)
    mixed: torch.Tensor,  # [B, G, V]
) -> tuple[list[list[int]], list[bool]]:
    """A step with drafts: per row the drafts the mixture accepts, then one sampled token
    ([] when its first position has no finite token), and whether it was usable."""
    finite = torch.isfinite(mixed.logsumexp(dim=-1)).tolist()  # [B][G]
    emitted = verify_rows(mixed, rows, drafts, finite)
    usable = [row[0] for row in finite]
    return [tokens if ok else [] for tokens, ok in zip(emitted, usable)], usable
