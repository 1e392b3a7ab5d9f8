"""Prompt log-probs under a request's mixture (TGI ``decoder_input_details``, OpenAI echo).

Each model that the mixture needs (a non-zero coefficient) runs the prompt once by
teacher forcing, through the runner (``PolicyRunner.prompt_positions``); the
per-position log-probs are mixed with the request's coefficients and normalised exactly
as a decoding step mixes the next token (``mixing.mix_logprobs``, the plausibility
constraint of a signed mixture included), so the log-prob of prompt token t + 1 is the
mixture's ``log p(x_{t+1} | x_{..t})`` (-inf for a token the constraint excludes). The
first token has no context and so no log-prob.

In a persona family each model m reads the prompt as its persona renders it
(``PersonaPrompts.render``: its own opening in place of the prompt's), as decoding and
scoring do; the persona runner returns only the positions of the request's own tokens.
The prompt's tokens after the longest opening any used model replaced are in every
model's rendering, at the end; those get the mixed log-prob, each model's taken at
its own shifted position. The tokens before them are the opening some persona swapped for
its own, which that persona never reads: like the first token, they get no log-prob.
A request's own personas (``Mixture.request_personas``) are models ``K + 1 + i``, rendered by
the runner from their ids (``personas``), and mixed as policy terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..models.personas import RequestPersona
from ..models.policies import PolicySet
from .mixing import Mixture, mix_logprobs


class PromptRunner(Protocol):
    def prompt_positions(
        self,
        tokens: Sequence[int],
        models: Sequence[int],
        personas: Sequence[RequestPersona] = (),
    ) -> dict[int, torch.Tensor]: ...  # ``runners.PolicyRunner.prompt_positions``


@dataclass
class PromptLogprobs:
    token_ids: list[int]
    logprobs: list[float | None]  # [L]; None for the first token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # [L], [] first


def prompt_logprobs(
    runner: PromptRunner,
    policy_set: PolicySet,
    prompt: Sequence[int],
    mixture: Mixture,
    top_n: int = 0,
    personas: Sequence[RequestPersona] = (),
) -> PromptLogprobs:
    """The mixture's log-prob of every prompt token given the tokens before it
    (``personas``: the ids of ``mixture.request_personas``, in order)."""
    tokens = list(prompt)
    if len(tokens) < 2:
        return PromptLogprobs(tokens, [None] * len(tokens), [[] for _ in tokens])
    device = policy_set.device
    coefs = mixture.coefficients  # [K + 1 (+ R)]
    k = len(policy_set.policies)
    has_model = [*([True] * k), policy_set.reference is not None, *([True] * len(personas))]
    used = [m for m in range(len(coefs)) if coefs[m] != 0 and has_model[m]]
    # Each used model's log-probs of the prompt tokens it sees with a token before it,
    # aligned to the prompt's end (a persona sees the prompt after its own opening).
    if personas:
        positions = runner.prompt_positions(tokens, used, personas)  # m -> [T_m, V]
    else:  # the runner's call without request personas, as before them
        positions = runner.prompt_positions(tokens, used)
    scored = min([len(tokens) - 1] + [len(rows) for rows in positions.values()])
    if scored == 0:  # the whole prompt is an opening some persona replaces
        return PromptLogprobs(tokens, [None] * len(tokens), [[] for _ in tokens])
    vocab = policy_set.vocab_size
    rows = {m: positions[m][len(positions[m]) - scored :] for m in used}  # m -> [T, V]
    if personas:  # the reference is one more term (mixing.mix_step does the same)
        every = torch.stack([rows[m] for m in used])  # [M', T, V]
        every_coef = torch.tensor([[coefs[m] for m in used]], device=device)  # [1, M']
        alpha = torch.full((scored,), mixture.alpha, device=device) if mixture.alpha else None
        mixed = mix_logprobs(every, every_coef.expand(scored, -1), alpha=alpha)  # [T, V]
        return _picked(tokens, scored, mixed, top_n, vocab)
    policies = [m for m in used if m < k]
    per_policy = torch.zeros(0, scored, vocab, device=device)  # [0, T, V]: s = 0
    if policies:
        per_policy = torch.stack([rows[m] for m in policies])  # [K', T, V]
    policy_coef = torch.tensor([[coefs[m] for m in policies]], device=device)  # [1, K']
    ref_logprobs = rows.get(k)  # [T, V] or None
    ref_coef = torch.full((scored,), coefs[k], device=device) if k in rows else None  # [T]
    alpha = torch.full((scored,), mixture.alpha, device=device) if mixture.alpha else None  # [T]
    mixed = mix_logprobs(
        per_policy, policy_coef.expand(scored, -1), ref_logprobs, ref_coef, alpha
    )  # [T, V]
    return _picked(tokens, scored, mixed, top_n, vocab)


def _picked(
    tokens: list[int], scored: int, mixed: torch.Tensor, top_n: int, vocab: int
) -> PromptLogprobs:
    """The last ``scored`` tokens' log-probs under ``mixed`` [T, V] and their top ``top_n``."""
    device = mixed.device
    targets = torch.tensor(tokens[-scored:], device=device)  # [T]
    picked = mixed.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()  # [T]
    unscored = len(tokens) - scored
    tops: list[list[tuple[int, float]]] = [[] for _ in range(unscored)]
    if top_n > 0:
        best = mixed.topk(min(top_n, vocab), dim=-1)  # [T, n]
        pairs = zip(best.indices.tolist(), best.values.tolist())
        tops += [[(t, lp) for t, lp in zip(i, v) if lp > float("-inf")] for i, v in pairs]
    else:
        tops += [[] for _ in range(scored)]
    return PromptLogprobs(tokens, [*([None] * unscored), *picked], tops)
