"""Teacher-forced scores of replies plus the per-token moments a reward fit needs.

The engine decodes the mixture normalised per token,

    log q_theta(y_t | ctx) = log pi_ref(y_t) + theta . D(y_t) - log Z_t(theta),
    D_k(v) = log pi_k(v | ctx) - log pi_ref(v | ctx), Z_t(theta) = sum_v pi_ref(v) e^{theta . D(v)},

so, summed over a reply, ``log q_theta(y) = log pi_ref(y) + theta . R(y) - sum_t log Z_t(theta)``.
``d log Z_t / d theta = E_{v ~ q_theta(.|ctx)} D(v)``, so around the ``theta_r`` that drew a reply

    log q_theta(y) - log q_theta_r(y) ~= (theta - theta_r) . (R(y) - M(y)),
    M(y) = sum_t E_{v ~ q_theta_r(.|ctx_t)} D(v),

exact to first order in ``theta - theta_r``. ``score_with_moments`` returns ``R``'s parts and
``M`` in one pass over every model's full next-token distributions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.kvcache import to_logprobs
from ..models.policies import LoadedModel, PolicySet, device_of
from .scoring import ScoreResult, chunk_indices

_LOGPROB_BYTES = 1 << 28  # the chunk's [models, rows, positions, V] float32 log-probs: 256 MiB


@torch.inference_mode()
def score_with_moments(
    policy_set: PolicySet,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    coefficients: Sequence[Sequence[float]],  # [N][K] theta_r = s * lam of each reply's mixture
) -> tuple[ScoreResult, torch.Tensor]:
    """Each reply's log-prob under every policy and the reference, and ``M`` (``[N, K]``).

    Needs a reference and one model per policy (``PolicySet.policies``); runs the models on
    the caller's thread (teacher forcing keeps no cache, so it can run beside the engine).
    """
    assert policy_set.reference is not None  # callers check there is a reference
    models = [*policy_set.policies, policy_set.reference]
    vocab = policy_set.vocab_size
    budget = max(64, _LOGPROB_BYTES // (4 * vocab * len(models)))  # tokens per chunk
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    k = len(policy_set.policies)
    policy_scores = torch.zeros(len(prompts), k, dtype=torch.float64)  # [N, K]
    ref_scores = torch.zeros(len(prompts), dtype=torch.float64)  # [N]
    moments = torch.zeros(len(prompts), k, dtype=torch.float64)  # [N, K]
    theta_all = torch.as_tensor(coefficients, dtype=torch.float32)  # [N, K]
    for rows in chunk_indices(lengths, budget):
        ids, mask, targets = _batch(prompts, completions, rows, policy_set.device)
        logprobs = torch.stack(
            [_member_logprobs(m, ids, mask, vocab).to(ids.device) for m in models]
        )  # [K+1, n, L-1, V] on the mixing device
        next_ids = ids[:, 1:].unsqueeze(0).unsqueeze(-1).expand(len(models), -1, -1, 1)
        picked = logprobs.gather(-1, next_ids).squeeze(-1)  # [K+1, n, L-1]
        totals = (picked * targets[:, 1:]).sum(dim=-1).double().cpu()  # [K+1, n]
        policy_scores[rows] = totals[:k].t()
        ref_scores[rows] = totals[k]
        diffs = logprobs[:k] - logprobs[k]  # [K, n, L-1, V]: D_k(v)
        theta = theta_all[rows].to(ids.device)  # [n, K]
        mixed = logprobs[k] + torch.einsum("nk,knlv->nlv", theta, diffs)  # [n, L-1, V]
        q = torch.softmax(mixed, dim=-1)  # [n, L-1, V]: the decoded mixture per position
        expected = torch.einsum("nlv,knlv->nlk", q, diffs)  # [n, L-1, K]: E_q D_k
        moments[rows] = (expected * targets[:, 1:].unsqueeze(-1)).sum(dim=1).double().cpu()
    return ScoreResult(policy_scores, ref_scores), moments


def _member_logprobs(
    loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, vocab: int
) -> torch.Tensor:
    """One member's log-probs [n, L-1, V], run on its own device."""
    device = device_of(loaded)
    logits = loaded.model(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
    ).logits  # [n, L, V']
    return to_logprobs(logits[:, :-1], vocab)


def _batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    rows: list[int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(len(prompts[i]) + len(completions[i]) for i in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)  # [n, L]
    mask = torch.zeros_like(ids)  # [n, L]
    targets = torch.zeros(len(rows), longest, device=device)  # [n, L] 1 on completion tokens
    for row, i in enumerate(rows):
        seq = [*prompts[i], *completions[i]]
        ids[row, : len(seq)] = torch.tensor(seq, device=device)
        mask[row, : len(seq)] = 1
        targets[row, len(prompts[i]) : len(seq)] = 1
    return ids, mask, targets
