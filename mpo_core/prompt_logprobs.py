"""Prompt log-probs under a request's mixture (TGI ``decoder_input_details``, OpenAI echo).

Each model that the mixture needs (a non-zero coefficient) runs the prompt once by
teacher forcing, as scoring does (``scoring``); the per-position log-probs are mixed with
the request's coefficients and normalised exactly as a decoding step mixes the next
token (``mixing.mix_logprobs``), so the log-prob of prompt token t + 1 is the mixture's
``log p(x_{t+1} | x_{..t})``. The first token has no context and so no log-prob.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .kvcache import to_logprobs
from .mixing import Mixture, mix_logprobs
from .policies import LoadedModel, PolicySet


@dataclass
class PromptLogprobs:
    token_ids: list[int]
    logprobs: list[float | None]  # [L]; None for the first token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # [L], [] first


@torch.inference_mode()
def _position_logprobs(loaded: LoadedModel, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    logits = loaded.model(input_ids=ids, use_cache=False).logits  # [1, L, V']
    return to_logprobs(logits[0, :-1], vocab)  # [L - 1, V]: predicts token t + 1


def prompt_logprobs(
    policy_set: PolicySet, prompt: Sequence[int], mixture: Mixture, top_n: int = 0
) -> PromptLogprobs:
    """The mixture's log-prob of every prompt token given the tokens before it."""
    tokens = list(prompt)
    if len(tokens) < 2:
        return PromptLogprobs(tokens, [None] * len(tokens), [[] for _ in tokens])
    device = policy_set.device
    ids = torch.tensor([tokens], device=device)  # [1, L]
    coefs = mixture.coefficients  # [K + 1]
    k = len(policy_set.policies)
    used = [m for m in range(k) if coefs[m] != 0]
    vocab = policy_set.vocab_size
    positions = len(tokens) - 1
    per_policy = torch.zeros(0, positions, vocab, device=device)  # [0, L - 1, V]: s = 0
    if used:
        per_policy = torch.stack(
            [_position_logprobs(policy_set.policies[m], ids, vocab) for m in used]
        )  # [K', L - 1, V]
    policy_coef = torch.tensor([[coefs[m] for m in used]], device=device)  # [1, K']
    ref_logprobs = ref_coef = None
    if policy_set.reference is not None and coefs[k] != 0:
        ref_logprobs = _position_logprobs(policy_set.reference, ids, vocab)  # [L - 1, V]
        ref_coef = torch.full((positions,), coefs[k], device=device)  # [L - 1]
    mixed = mix_logprobs(
        per_policy, policy_coef.expand(positions, -1), ref_logprobs, ref_coef
    )  # [L - 1, V]
    targets = ids[0, 1:]  # [L - 1]
    picked = mixed.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()  # [L - 1]
    tops: list[list[tuple[int, float]]] = [[]]
    if top_n > 0:
        best = mixed.topk(min(top_n, vocab), dim=-1)  # [L - 1, n]
        tops += [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    else:
        tops += [[] for _ in range(positions)]
    return PromptLogprobs(tokens, [None, *picked], tops)
