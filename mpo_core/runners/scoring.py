"""Teacher-forced scoring: the total log-probability of completions under every model.

Fitting (docs/fitting.md) needs ``log pi_k(y | x)`` and ``log pi_ref(y | x)`` for sampled
replies ``y``; prompt and padding tokens are masked out of the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.kvcache import to_logprobs
from ..models.policies import LoadedModel, PolicySet, device_of


@dataclass
class ScoreResult:
    policy_logprobs: torch.Tensor  # [N, K] sum of completion-token log-probs
    reference_logprobs: torch.Tensor | None  # [N]

    @staticmethod
    def concat(parts: list[ScoreResult]) -> ScoreResult:
        refs = [p.reference_logprobs for p in parts if p.reference_logprobs is not None]
        return ScoreResult(
            torch.cat([p.policy_logprobs for p in parts]),
            torch.cat(refs) if len(refs) == len(parts) else None,
        )


@torch.inference_mode()
def _completion_logprobs(
    loaded: LoadedModel,
    vocab_size: int,
    ids: torch.Tensor,  # [N, L] right-padded prompt + completion
    mask: torch.Tensor,  # [N, L] 1 on real tokens
    targets: torch.Tensor,  # [N, L] 1 on completion tokens
) -> torch.Tensor:
    logits = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [N, L, V']
    logprobs = to_logprobs(logits[:, :-1], vocab_size)  # [N, L-1, V]: predicts token t+1
    picked = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [N, L-1]
    return (picked * targets[:, 1:]).sum(dim=-1)  # [N]


def score_model(
    loaded: LoadedModel,
    vocab_size: int,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Total log-prob of ``completions[i]`` after ``prompts[i]`` under one model, run on
    its own device: [N] on the CPU."""
    device = device_of(loaded)
    n = len(prompts)
    scores = torch.zeros(n)  # [N]
    start = 0
    while start < n:
        longest = 0
        end = start
        while end < n:  # grow the chunk while (rows x longest row) fits the token budget
            longest_next = max(longest, len(prompts[end]) + len(completions[end]))
            if end > start and longest_next * (end - start + 1) > chunk_tokens:
                break
            longest, end = longest_next, end + 1
        ids = torch.zeros(end - start, longest, dtype=torch.long, device=device)  # [n, L]
        mask = torch.zeros_like(ids)
        targets = torch.zeros(end - start, longest, device=device)  # [n, L]
        for row, i in enumerate(range(start, end)):
            seq = [*prompts[i], *completions[i]]
            ids[row, : len(seq)] = torch.tensor(seq, device=device)
            mask[row, : len(seq)] = 1
            targets[row, len(prompts[i]) : len(seq)] = 1
        scores[start:end] = _completion_logprobs(loaded, vocab_size, ids, mask, targets).cpu()
        start = end
    return scores


def score_sequences(
    policy_set: PolicySet,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    chunk_tokens: int = 4096,
) -> ScoreResult:
    """Score ``completions[i]`` after ``prompts[i]`` under every policy and the reference,
    each model on the prompt as given (a backend whose members see other inputs, such as
    personas, scores its own way)."""
    vocab = policy_set.vocab_size
    columns = [
        score_model(loaded, vocab, prompts, completions, chunk_tokens)
        for loaded in policy_set.policies
    ]
    policy_scores = torch.stack(columns, dim=1) if columns else torch.zeros(len(prompts), 0)
    ref_scores = None  # [N]
    if policy_set.reference is not None:
        ref_scores = score_model(policy_set.reference, vocab, prompts, completions, chunk_tokens)
    return ScoreResult(policy_scores, ref_scores)  # [N, K], [N]


def chunk_indices(lengths: list[int], budget: int) -> list[list[int]]:
    """Group sequence indices into chunks of at most ``budget`` tokens (one may exceed it)."""
    chunks: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if chunks[-1] and used + n > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += n
    return [c for c in chunks if c]
