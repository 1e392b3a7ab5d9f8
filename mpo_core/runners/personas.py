"""The persona-family backend: one model, K personas, one batched forward per step.

As in ``AdapterRunner``, a request whose coefficient for model m (``s * w_k`` for
persona k, ``1 - s`` for the plain model) is not zero owns one *slot* of the one batch,
keyed ``sid * (K + 1) + m``, with its own KV-cache row. Here what differs between slots
is the prompt, not the weights: slot m is prefilled with model m's rendering of the
request's prompt (``personas.PersonaPrompts.render``), and decodes the request's tokens
at positions shifted by the length its persona added. Every slot of every request then
runs in one forward of the shared weights.

Each persona's opening (its system block; for the plain model the template's default
one) is run once and its KV reused by every later prefill that starts with it
(``prefix_cache``), on the growing cache. A static cache prefills whole prompts (the
slots' buffers are filled by the static batch itself), so there the openings are
recomputed per request; the results are the same.

Scoring teacher-forces each completion after each model's rendering of its prompt,
all models' rows in the same chunks of one model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..kvcache import GrowingBatch, KVStorage, release_free_memory
from ..policies import PolicySet
from ..prefix_cache import PrefixCache, prefill_after_prefixes
from ..scoring import ScoreResult, score_model
from .adapters import BatchFactory, growing
from .base import Row, StepOutput


class PersonaRunner:
    """One batch over the shared model; a slot per (request, persona it needs)."""

    def __init__(
        self, policy_set: PolicySet, max_rows: int = 16, batch_factory: BatchFactory = growing
    ) -> None:
        prompts, reference = policy_set.personas, policy_set.reference
        assert prompts is not None and reference is not None, "not a persona family"
        self.policy_set = policy_set
        self.prompts = prompts
        self.models = prompts.models  # K personas, then the plain model
        self.shared = reference
        storage = KVStorage(policy_set.kv_dtype)
        self.batch = batch_factory(
            reference, policy_set.vocab_size, policy_set.device, storage, max_rows * self.models
        )
        self.prefixes: PrefixCache | None = None
        if isinstance(self.batch, GrowingBatch):
            self.prefixes = PrefixCache(
                reference, policy_set.vocab_size, policy_set.device, storage
            )
        # A slot's prompt is longer than its request's by up to ``longest_extra`` tokens.
        limit = self.batch.max_len
        self.max_context = None if limit is None else limit - prompts.longest_extra
        self._shift: dict[int, int] = {}  # slot -> its prompt's length - the request's

    def _slot(self, sid: int, model: int) -> int:
        return sid * self.models + model

    def step(self, running: Sequence[Row], newcomers: Sequence[Row]) -> StepOutput:
        ps = self.policy_set
        rows = [*running, *newcomers]
        row_of = {row.sid: i for i, row in enumerate(rows)}
        by_sid = {row.sid: row for row in running}
        logprobs = torch.zeros(self.models, len(rows), ps.vocab_size, device=ps.device)
        started = time.perf_counter()
        if len(self.batch):
            slots = self.batch.row_ids
            seqs = [by_sid[slot // self.models] for slot in slots]
            columns = [
                [s.token_ids[-1] for s in seqs],
                [len(s.token_ids) - 1 + self._shift[slot] for s, slot in zip(seqs, slots)],
                [slot % self.models for slot in slots],
                [row_of[s.sid] for s in seqs],
            ]
            tokens, positions, models, index = torch.tensor(columns).to(ps.device)  # [S] each
            logprobs[models, index] = self.batch.decode(tokens, positions)  # [S, V]
        joining = [(s, m) for s in newcomers for m in range(self.models) if s.coefs[m] != 0]
        if joining:
            slots = [self._slot(s.sid, m) for s, m in joining]
            prompts = [self.prompts.render(m, s.token_ids) for s, m in joining]
            for slot, prompt, (s, _) in zip(slots, prompts, joining):
                self._shift[slot] = len(prompt) - len(s.token_ids)
            models = torch.tensor([m for _, m in joining], device=ps.device)  # [S']
            index = torch.tensor([row_of[s.sid] for s, _ in joining], device=ps.device)
            logprobs[models, index] = self._prefill(slots, [m for _, m in joining], prompts)
        seconds = {self.shared.name: time.perf_counter() - started} if len(self.batch) else {}
        return StepOutput(logprobs, seconds)

    def _prefill(
        self, slots: list[int], models: list[int], prompts: list[list[int]]
    ) -> torch.Tensor:
        """Add the slots to the batch; their last position's log-probs [S', V]."""
        if self.prefixes is None or not isinstance(self.batch, GrowingBatch):
            return self.batch.prefill(slots, prompts)
        openings = []
        for model, prompt in zip(models, prompts):
            opening = self.prompts.cached[model]
            usable = 0 < len(opening) < len(prompt) and prompt[: len(opening)] == opening
            openings.append(opening if usable else [])
        if not any(openings):
            return self.batch.prefill(slots, prompts)
        rests = [p[len(o) :] for o, p in zip(openings, prompts)]
        result, cache, mask = prefill_after_prefixes(self.prefixes, openings, rests)
        self.batch.append(slots, cache, mask)
        del cache
        if self.policy_set.device.type == "cpu":  # the prefill's buffers, back to the OS
            release_free_memory()
        return result

    def keep(self, sids: set[int]) -> None:
        kept = {self._slot(sid, m) for sid in sids for m in range(self.models)}
        self.batch.keep(kept)
        self._shift = {slot: n for slot, n in self._shift.items() if slot in kept}

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> ScoreResult:
        """``log pi(y | persona_m(x))`` for every model m: rows of every model together."""
        ps = self.policy_set
        n = len(prompts)
        rendered = [self.prompts.render(m, p) for m in range(self.models) for p in prompts]
        totals = score_model(
            self.shared,
            ps.vocab_size,
            ps.device,
            rendered,
            list(completions) * self.models,
            chunk_tokens,
        )  # [M * N]
        per_model = totals.view(self.models, n)  # [M, N]
        return ScoreResult(per_model[:-1].t().contiguous(), per_model[-1].clone())
