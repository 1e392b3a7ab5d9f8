"""Sampling parameters and the per-row logits processors applied after mixing.

Processors act on the mixed log-probabilities of a batch whose rows may each have their
own temperature, top-k, top-p, min-p and repetition penalty, so every parameter is a
per-row tensor (the heterogeneous-batch pattern of TGI's processors). Each row samples
with its own ``torch.Generator``, which makes a seeded request reproducible whatever
else shares its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import InvalidParameter
from ..rules import check_token_ids

MAX_SEED = 2**63 - 1
# Below this temperature a row decodes greedily. Dividing log-probs by a temperature near
# float32's smallest normal overflows them all to -inf, and long before that the tempered
# distribution is the argmax anyway (vLLM draws the line at the same place).
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How one request picks its tokens; ``validate`` names the first bad field."""

    max_new_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables; drops tokens below min_p * p(best)
    repetition_penalty: float = 1.0  # 1 disables; > 1 discourages tokens already seen
    seed: int | None = None  # None draws a fresh seed (reported back)
    stop: list[str] = field(default_factory=list)  # stop strings, excluded from the text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    top_logprobs: int = 0  # alternatives to report per token
    speculative: bool = True  # False: this request never drafts (speculative decoding off)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self, vocab_size: int | None = None, max_top_logprobs: int = 20) -> None:
        _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        _float_in("temperature", self.temperature, 0.0, math.inf)
        _int_at_least("top_k", self.top_k, 0)
        _float_in("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _float_in("min_p", self.min_p, 0.0, 1.0)
        _float_in("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        if self.seed is not None:
            _int_at_least("seed", self.seed, 0)
            if self.seed > MAX_SEED:
                raise InvalidParameter("seed", f"seed must be at most {MAX_SEED}, got {self.seed}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParameter(
                "stop", f"stop must be a list of non-empty strings, got {self.stop!r}"
            )
        for token_id in self.stop_token_ids:
            _int_at_least("stop_token_ids", token_id, 0)
        if vocab_size is not None:
            check_token_ids(self.stop_token_ids, vocab_size, "stop_token_ids")
        _int_at_least("top_logprobs", self.top_logprobs, 0)
        if self.top_logprobs > max_top_logprobs:
            raise InvalidParameter(
                "top_logprobs",
                f"top_logprobs must be at most {max_top_logprobs}, got {self.top_logprobs}",
            )


def _int_at_least(param: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameter(param, f"{param} must be an integer >= {low}, got {value!r}")


def _float_in(param: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    ok = False
    if not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value):
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        upper = "" if math.isinf(high) else f" and <= {high}"
        raise InvalidParameter(
            param, f"{param} must be a finite number {bound}{upper}, got {value!r}"
        )


def apply_repetition_penalty(
    logprobs: torch.Tensor,  # [B, V]
    seen: list[list[int]],  # per row: token ids of prompt + generated text
    penalties: list[float],
) -> torch.Tensor:
    """Scale seen tokens' log-probs by the penalty (log-probs are <= 0, so they drop)."""
    out = logprobs
    for row, (ids, penalty) in enumerate(zip(seen, penalties)):
        if penalty == 1.0 or not ids:
            continue
        if out is logprobs:
            out = logprobs.clone()
        index = torch.tensor(sorted(set(ids)), device=logprobs.device)  # [n]
        values = out[row, index]  # [n]
        out[row, index] = torch.where(values < 0, values * penalty, values / penalty)
    return out


def filter_scores(
    scores: torch.Tensor,  # [B, V] log-probs after temperature
    top_k: torch.Tensor,  # [B] long, 0 = off
    top_p: torch.Tensor,  # [B] float, 1 = off
    min_p: torch.Tensor,  # [B] float, 0 = off
) -> torch.Tensor:
    """Set to -inf every token that top-k, top-p or min-p rules out; keeps at least one.
    Rows with every filter off are returned as they are, unsorted (a sort of a 49k-token
    vocabulary per row was half the engine's step on a sampled real-model batch)."""
    vocab = scores.shape[-1]
    active = ((top_k > 0) & (top_k < vocab)) | (top_p < 1) | (min_p > 0)  # [B]
    if not bool(active.any()):
        return scores
    if not bool(active.all()):
        rows = active.nonzero().squeeze(-1)  # [n]
        out = scores.clone()
        out[rows] = filter_scores(scores[rows], top_k[rows], top_p[rows], min_p[rows])
        return out
    sorted_scores, order = scores.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=scores.device).unsqueeze(0)  # [1, V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).unsqueeze(-1)  # [B, 1]
    drop = ranks >= k  # [B, V]
    probs = sorted_scores.softmax(dim=-1)  # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V] mass of strictly better tokens
    drop |= mass_before >= top_p.unsqueeze(-1)
    drop |= probs < min_p.unsqueeze(-1) * probs[:, :1]
    drop[:, 0] = False  # the best token always survives
    sorted_scores = sorted_scores.masked_fill(drop, -math.inf)
    return torch.empty_like(scores).scatter_(-1, order, sorted_scores)


def processed(
    logprobs: torch.Tensor,  # [N, V] mixed log-probs
    params: Sequence[SamplingParams],
    seen: Sequence[list[int]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The request processors, row by row: the scores after the repetition penalty (whose
    argmax a greedy row takes) and, unless every row is greedy, the probabilities after
    temperature, top-k, top-p and min-p (what a sampled row draws from)."""
    device = logprobs.device
    scores = apply_repetition_penalty(logprobs, list(seen), [p.repetition_penalty for p in params])
    if all(p.greedy for p in params):
        return scores, None
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)  # [N]
    filtered = filter_scores(
        scores / temperature.unsqueeze(-1),
        torch.tensor([min(p.top_k, scores.shape[-1]) for p in params], device=device),
        torch.tensor([p.top_p for p in params], device=device, dtype=scores.dtype),
        torch.tensor([p.min_p for p in params], device=device, dtype=scores.dtype),
    )
    return scores, filtered.softmax(dim=-1)  # [N, V] each


def usable_rows(probs: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows that can be drawn from. One row's numerical trouble (NaN or inf from
    its model, nothing left after its filters) must not fail the others: such a row keeps
    its argmax instead of a draw."""
    return torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)


def sample_tokens(
    logprobs: torch.Tensor,  # [B, V] mixed log-probs
    params: list[SamplingParams],
    generators: list[torch.Generator],
    seen: list[list[int]],
) -> torch.Tensor:
    """Pick one token per row: greedy rows take the argmax, others sample with their generator."""
    scores, probs = processed(logprobs, params, seen)  # [B, V] each
    tokens = scores.argmax(dim=-1)  # [B]
    if probs is None:
        return tokens
    usable = usable_rows(probs).tolist()  # [B]
    rows = [row for row, p in enumerate(params) if not p.greedy and usable[row]]
    if not rows:
        return tokens
    drawn = [torch.multinomial(probs[row], 1, generator=generators[row]) for row in rows]
    tokens[torch.tensor(rows, device=logprobs.device)] = torch.cat(drawn)  # [n] sampled rows
    return tokens
