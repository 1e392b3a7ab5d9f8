"""Prompt log-probs under a request's mixture (TGI ``decoder_input_details``, OpenAI echo).

Each model that the mixture needs (a non-zero coefficient) runs the prompt once by
teacher forcing, as scoring does (``scoring``); the per-position log-probs are mixed with
the request's coefficients and normalised exactly as a decoding step mixes the next
token (``mixing.mix_logprobs``), so the log-prob of prompt token t + 1 is the mixture's
``log p(x_{t+1} | x_{..t})``. The first token has no context and so no log-prob.

In a persona family each model m reads the prompt as its persona renders it
(``PersonaPrompts.render``: its own opening in place of the prompt's), as decoding and
scoring do. The prompt's tokens after the longest opening any used model replaced are in
every model's rendering, at the end; those get the mixed log-prob, each model's taken at
its own shifted position. The tokens before them are the opening some persona swapped for
its own, which that persona never reads: like the first token, they get no log-prob.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..models.kvcache import to_logprobs
from ..models.personas import common_suffix
from ..models.policies import LoadedModel, PolicySet
from .mixing import Mixture, mix_logprobs


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
    coefs = mixture.coefficients  # [K + 1]
    k = len(policy_set.policies)
    models = [*policy_set.policies, policy_set.reference]
    used = [m for m in range(k + 1) if coefs[m] != 0 and models[m] is not None]
    inputs = _inputs(policy_set, tokens, used)  # model -> its ids, L_m of them
    # The prompt tokens every used model sees, at the ends of their inputs, each with a
    # token before it: the ones that get a log-prob.
    scored = min(
        [len(tokens) - 1]
        + [min(common_suffix(ids, tokens), len(ids) - 1) for ids in inputs.values()]
    )
    if scored == 0:  # the whole prompt is an opening some persona replaces
        return PromptLogprobs(tokens, [None] * len(tokens), [[] for _ in tokens])
    vocab = policy_set.vocab_size
    rows = {
        m: _position_logprobs(
            models[m],  # type: ignore[arg-type]  # used holds only models that exist
            torch.tensor([inputs[m]], device=device),
            vocab,
        )[-scored:]
        for m in used
    }  # m -> [T, V]: predicts the last T prompt tokens
    policies = [m for m in used if m < k]
    per_policy = torch.zeros(0, scored, vocab, device=device)  # [0, T, V]: s = 0
    if policies:
        per_policy = torch.stack([rows[m] for m in policies])  # [K', T, V]
    policy_coef = torch.tensor([[coefs[m] for m in policies]], device=device)  # [1, K']
    ref_logprobs = rows.get(k)  # [T, V] or None
    ref_coef = torch.full((scored,), coefs[k], device=device) if k in rows else None  # [T]
    mixed = mix_logprobs(
        per_policy, policy_coef.expand(scored, -1), ref_logprobs, ref_coef
    )  # [T, V]
    targets = torch.tensor(tokens[-scored:], device=device)  # [T]
    picked = mixed.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()  # [T]
    unscored = len(tokens) - scored
    tops: list[list[tuple[int, float]]] = [[] for _ in range(unscored)]
    if top_n > 0:
        best = mixed.topk(min(top_n, vocab), dim=-1)  # [T, n]
        tops += [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    else:
        tops += [[] for _ in range(scored)]
    return PromptLogprobs(tokens, [*([None] * unscored), *picked], tops)


def _inputs(policy_set: PolicySet, tokens: list[int], used: list[int]) -> dict[int, list[int]]:
    """Each used model's input ids: the prompt itself, or its persona's rendering of it."""
    personas = policy_set.personas
    return {m: personas.render(m, tokens) if personas is not None else tokens for m in used}
