"""Speculative decoding of the mixture: the acceptance rule (docs/speculative.md).

A draft proposes ``x_1..x_g`` for a row, each drawn from a distribution ``q_i`` (one-hot
for an n-gram lookup). Every model has run the row's newest token and the drafts in one
forward, so the mixture is known at each of the ``g + 1`` positions. ``target_probs``
turns those mixed log-probs into the distributions the plain loop would sample from,
position by position: the row's repetition penalty counts the tokens accepted before
the position, then temperature, top-k, top-p and min-p apply as in ``sampling``.
``accept_drafts`` then keeps ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``; at
the first rejection it draws from ``normalise(max(0, p_i - q_i))`` and stops; if every
draft is kept it draws one more token from ``p_{g+1}``. The emitted tokens are distributed
exactly as tokens drawn one at a time from ``p`` (Leviathan et al. 2023; Chen et al.
2023), and a greedy row (``p`` one-hot at its argmax) keeps exactly the argmax run.
Every draw uses the row's own generator, so a seed reproduces the reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .sampling import SamplingParams, processed, usable_rows

if TYPE_CHECKING:
    from ..engine.requests import SequenceState


@dataclass
class Draft:
    """One row's proposal: tokens and, for a sampled draft, the distributions they came
    from ([g, V]); ``probs`` None means each token had probability one (n-gram lookup,
    or a greedy draft)."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # [g, V]


def target_probs(
    mixed: torch.Tensor,  # [N, V] mixed log-probs, one row per (request, position)
    params: Sequence[SamplingParams],  # [N] the request's parameters at each
    seen: Sequence[list[int]],  # [N] prompt + tokens accepted before that position
) -> torch.Tensor:
    """The distribution the plain loop samples from at each position, [N, V].

    A greedy row is one-hot at the argmax after its repetition penalty, as
    ``sample_tokens`` picks it. A row whose distribution is not usable (NaN, or nothing
    left after its filters) is one-hot at its argmax too, as in ``sample_tokens``.
    """
    scores, probs = processed(mixed, params, seen)  # [N, V] each
    best = scores.argmax(dim=-1)  # [N]
    one_hot = torch.nn.functional.one_hot(best, scores.shape[-1]).to(scores.dtype)  # [N, V]
    if probs is None:  # every row greedy
        return one_hot
    greedy = torch.tensor([p.greedy for p in params], device=mixed.device)  # [N]
    keep = (~greedy & usable_rows(probs)).unsqueeze(-1)  # [N, 1]
    return torch.where(keep, torch.nan_to_num(probs), one_hot)


def accept_drafts(
    probs: torch.Tensor,  # [g + 1, V] target distributions after the newest token, then each draft
    draft: Draft,
    greedy: bool,
    generator: torch.Generator,
) -> list[int]:
    """The tokens a row emits this step: the drafts it keeps, then one more (the
    correction at the first rejection, or the bonus after the last draft)."""
    tokens = draft.tokens
    if greedy:  # p is one-hot: keep the drafts while they are the argmax
        best = probs.argmax(dim=-1).tolist()  # [g + 1]
        out = []
        for i, token in enumerate(tokens):
            if token != best[i]:
                break
            out.append(token)
        return [*out, best[len(out)]]
    index = torch.arange(len(tokens), device=probs.device)
    drafted = torch.tensor(tokens, device=probs.device, dtype=torch.long)  # [g]
    p = probs[index, drafted].tolist()  # [g] p_i(x_i)
    q = [1.0] * len(tokens) if draft.probs is None else draft.probs[index, drafted].tolist()
    out = []
    for i, token in enumerate(tokens):
        u = float(torch.rand(1, generator=generator, device=generator.device))
        if u * q[i] < p[i]:  # u < p / q, without dividing by a q that may be tiny
            out.append(token)
            continue
        residual = probs[i].clone()  # [V]
        if draft.probs is None:
            residual[token] = 0.0  # max(0, p - onehot(x)) is p without x
        else:
            residual = (residual - draft.probs[i]).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # p <= q everywhere: only rounding put us here
            residual = probs[i]
        return [*out, int(torch.multinomial(residual, 1, generator=generator))]
    bonus = int(torch.multinomial(probs[len(tokens)], 1, generator=generator))
    return [*out, bonus]


def verify_rows(
    mixed: torch.Tensor,  # [B, G, V] each row's mixture after its newest token and drafts
    rows: Sequence[SequenceState],
    drafts: Sequence[Draft],  # per row, maybe empty (a newcomer, or nothing drafted)
    finite: Sequence[Sequence[bool]],  # [B][G] the mixture is a distribution there
) -> list[list[int]]:
    """Per row, the tokens it emits this step (``[]`` for a row not finite at position 0).

    The row's processors apply at each position with the tokens accepted before it, all
    positions of all rows in one batch; a draft is cut before a position whose mixture
    is not finite, so the row still emits what the plain loop would have.
    """
    cut: list[Draft | None] = []
    for draft, ok in zip(drafts, finite):
        n = next((j for j in range(1, len(draft.tokens) + 1) if not ok[j]), len(draft.tokens) + 1)
        probs = draft.probs[: n - 1] if draft.probs is not None else None
        cut.append(Draft(draft.tokens[: n - 1], probs) if ok[0] else None)
    index, params, seen = [], [], []
    for b, (row, kept) in enumerate(zip(rows, cut)):
        if kept is None:
            continue
        for j in range(len(kept.tokens) + 1):
            index.append(b * mixed.shape[1] + j)
            params.append(row.sampling)
            seen.append(row.token_ids + kept.tokens[:j])
    if not index:
        return [[] for _ in rows]
    flat = mixed.reshape(-1, mixed.shape[-1])[torch.tensor(index, device=mixed.device)]  # [N, V]
    probs = target_probs(flat, params, seen)  # [N, V]
    out: list[list[int]] = []
    start = 0
    for row, kept in zip(rows, cut):
        if kept is None:
            out.append([])
            continue
        n = len(kept.tokens) + 1
        out.append(
            accept_drafts(probs[start : start + n], kept, row.sampling.greedy, row.generator)
        )
        start += n
    return out


@dataclass
class AdaptiveGamma:
    """How many tokens a request drafts next, from its running acceptance rate.

    The rate is an exponential average of accepted / drafted per step. With a rate
    ``a`` the expected run of kept drafts is ``a / (1 - a)``; the next draft is that long,
    within ``[1, max_draft]``. Below ``min_rate`` the request stops drafting (gamma 0),
    and probes with one token every ``probe_every`` steps so that it can come back.
    """

    max_draft: int
    rate: float = 0.6
    min_rate: float = 0.15
    smoothing: float = 0.3  # weight of the newest step in the average
    probe_every: int = 8
    _idle: int = 0

    @property
    def gamma(self) -> int:
        if self.max_draft <= 0:
            return 0
        if self.rate < self.min_rate:
            return 1 if self._idle >= self.probe_every else 0
        run = self.rate / max(1e-6, 1.0 - self.rate)
        return max(1, min(self.max_draft, round(run)))

    def update(self, drafted: int, accepted: int) -> None:
        """One step's outcome (``drafted`` 0: nothing was proposed, the rate stays)."""
        if drafted == 0:
            self._idle += 1
            return
        self._idle = 0
        self.rate += self.smoothing * (accepted / drafted - self.rate)
