"""The llama.cpp backend: GGUF families on llama.cpp's own kernels (llama-cpp-python).

A *slot* is a (request, model it needs) pair, and each slot is one sequence of a
``llama_context`` (``llama_context.LlamaContext``):

- a persona family (one GGUF, K personas) has one context; every slot of every request
  is a sequence of it, so a step is one ``llama_decode`` for all rows. Each persona's
  opening is run once, on a sequence of its own, and a newcomer's slot starts as a copy of
  it (``seq_cp``: the cells are shared, not copied) before its prompt's rest is run;
- a family of full GGUF models (and a GGUF reference) has a context per model, whose
  sequences are the slots of the requests that need it: a llama_decode per model a step.

A request may bring personas of its own (``Row.request_personas``, a persona family's
models ``K + 1 + i``): more sequences of the one context, each starting as a copy of its
opening, which runs once on a sequence of its own and is kept for the most recently used
``REQUEST_OPENINGS`` openings.

A verify runs each slot's newest token and its drafts (G positions) in the same decode,
with logits at each; ``rollback`` removes the rejected tail (``seq_rm``); ``keep`` removes
the finished requests' sequences and frees their ids. Scoring and prompt log-probs run
the prompt on a spare sequence with logits at every position. The tokenizer stays the
policy set's (the GGUF's own vocabulary, read by transformers); member log-probs are the
float32 log-softmax of llama.cpp's logits over the tokenizer's vocabulary.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, cast

import torch
from transformers import PreTrainedModel

from ..config import PolicySetConfig
from ..models.kv_budget import KVBudget, token_bytes
from ..models.personas import RequestPersona, common_suffix, render_prompt
from ..models.policies import PolicySet
from .base import Capabilities, Row, RunnerBase, StepOutput, StepRows, all_models
from .llama_context import GGUFModel, LlamaContext, single_torch_thread
from .llama_loading import (
    KIND,
    gguf_file,
    load_gguf_family,
    members_of,
    runs_on_llama_cpp,
)
from .scoring import ScoreResult

logger = logging.getLogger(__name__)

DEFAULT_CELLS = 4096  # KV cells of a context when neither the config nor a budget says
# Request personas' openings kept on sequences of their own (the most recently used).
REQUEST_OPENINGS = 8
LLAMA_MAX_SEQ = 256  # llama.cpp's limit on the sequences of one context (LLAMA_MAX_SEQ)


@dataclass
class Slot:
    context: int  # which context holds it
    seq: int  # its sequence id there
    length: int  # positions its sequence holds
    before: int = 0  # ``length`` before the last verify (what rollback counts from)
    ran: int = 0  # positions the last verify ran


LLAMA_MAX_SEQ = 256  # llama.cpp's limit on the sequences of one context (LLAMA_MAX_SEQ)


class LlamaCppRunner(RunnerBase):
    """GGUF families on llama.cpp: a sequence per (request, model it needs)."""

    kind: ClassVar[str] = KIND

    def __init__(
        self,
        policy_set: PolicySet,
        max_rows: int = 16,
        batch_factory: Any = None,  # the factory's batches are torch caches: unused here
        budget: KVBudget | None = None,
        request_personas: int = 0,  # the most personas a request may bring (persona family)
    ) -> None:
        single_torch_thread()
        self.policy_set = policy_set
        self.capabilities = self.capabilities_of(policy_set)
        self.max_context: int | None = None  # each context's cells are the KV budget's
        members = all_models(policy_set)
        self.members = len(members)
        settings = policy_set.config.llama_cpp
        personas = policy_set.personas
        # A persona family's members share one context; full models have one each.
        groups = [list(range(self.members))] if personas is not None else [
            [m] for m in range(self.members)
        ]  # fmt: skip
        self.context_of = [0] * self.members
        for c, group in enumerate(groups):
            for m in group:
                self.context_of[m] = c
        openings = personas.cached if personas is not None else [[]] * self.members
        # llama.cpp holds at most LLAMA_MAX_SEQ sequences a context: a slot per (row,
        # member of the group), one per opening and a spare; fewer rows when that is short.
        widest = max(len(group) for group in groups)
        fits = (LLAMA_MAX_SEQ - widest - 1) // widest
        self.max_rows: int | None = min(max_rows, fits) if fits < max_rows else None
        max_rows = min(max_rows, fits)
        self.contexts: list[LlamaContext] = []
        self.names: list[str] = []
        self._free: list[list[int]] = []
        cells = []
        for group in groups:
            gguf = cast(GGUFModel, members[group[0]].model)
            share = budget.budget_bytes // len(groups) if budget is not None else None
            per_token = token_bytes(members[group[0]], policy_set.kv_dtype)
            n_ctx = settings.context_tokens or min(
                DEFAULT_CELLS, DEFAULT_CELLS if share is None else max(256, share // per_token)
            )
            # a sequence per slot, one per opening, and a spare for scoring; a persona
            # family's requests may add slots and openings of their own, where they fit
            n_seq = max_rows * len(group) + len(group) + 1
            extra = max_rows * request_personas + REQUEST_OPENINGS if personas else 0
            if extra and n_seq + extra > LLAMA_MAX_SEQ:
                logger.warning(
                    "llama.cpp: requests bring no personas of their own here: %d rows with "
                    "up to %d each need %d sequences, more than a context holds (%d); lower "
                    "max_running or max_request_personas",
                    max_rows, request_personas, n_seq + extra, LLAMA_MAX_SEQ,
                )  # fmt: skip
                extra = 0
                self.capabilities = replace(self.capabilities, request_personas=False)
            n_seq += extra
            context = LlamaContext(gguf, n_ctx, n_seq, settings, policy_set.kv_dtype)
            self.contexts.append(context)
            self._free.append(list(range(n_seq - 1, -1, -1)))
            self.names.append(members[group[-1]].name)  # a persona family's: its model
            reserved = sum(len(openings[m]) for m in group)
            cells.append((self.contexts[-1].n_ctx - reserved) * per_token)
        if budget is not None:  # admit only what the contexts' cells hold
            budget.budget_bytes = min(budget.budget_bytes, *cells)
        self._openings = self._run_openings(openings)
        self._slots: dict[tuple[int, int], Slot] = {}
        self._width = 1
        # A request persona's opening (its prefix) -> (sequence, length), most recent last.
        self._request_openings: OrderedDict[tuple[int, ...], tuple[int, int]] = OrderedDict()
        self.opening_hits = 0
        self.opening_misses = 0

    # -- the class-level half (``base.Backend``) -------------------------------------
    @staticmethod
    def claims(config: PolicySetConfig) -> bool:
        runs, why = runs_on_llama_cpp(config)
        if config.backend == "auto" and not runs and gguf_file(members_of(config)[0]) is not None:
            logger.info("backend auto: transformers runs this GGUF family (%s)", why)
        return runs

    @staticmethod
    def load(config: PolicySetConfig) -> PolicySet:
        return load_gguf_family(config)

    @staticmethod
    def capabilities_of(policy_set: PolicySet) -> Capabilities:
        return Capabilities(
            shared_forward=policy_set.personas is not None,
            request_personas=policy_set.personas is not None,
            reference_alone=True,
            token_moments=False,  # every member's full distributions: transformers only
            soups=False,  # no parameter averages of quantised GGUF weights
        )

    @staticmethod
    def soup(policy_set: PolicySet, weights: Sequence[float]) -> PreTrainedModel:
        raise NotImplementedError("the llama.cpp backend builds no soups")

    # -- helpers -----------------------------------------------------------------------
    def _render(
        self, model: int, tokens: Sequence[int], own: Sequence[RequestPersona] = ()
    ) -> list[int]:
        """Model ``model``'s prompt for ``tokens``; past the family's models, the request's
        own persona ``own[model - members]``."""
        personas = self.policy_set.personas
        if personas is None:
            return list(tokens)
        if model < self.members:
            return personas.render(model, tokens)
        persona = own[model - self.members]
        return render_prompt(persona.prefix, persona.strip, personas.bos_token_id, tokens)

    def _context(self, model: int) -> int:
        """The context of a model (a request's own persona: the persona family's one)."""
        return self.context_of[model] if model < self.members else 0

    def _request_opening(self, prefix: tuple[int, ...]) -> tuple[int, int]:
        """The sequence holding a request persona's opening, run on first use: (seq,
        length). The least recently used beyond REQUEST_OPENINGS is dropped (its cells stay
        for the slots that share them)."""
        found = self._request_openings.get(prefix)
        if found is not None:
            self.opening_hits += 1
            self._request_openings.move_to_end(prefix)
            return found
        self.opening_misses += 1
        full = len(self._request_openings) >= REQUEST_OPENINGS or not self._free[0]
        if self._request_openings and full:
            _, (old, _) = self._request_openings.popitem(last=False)
            self._release(0, old)
        if not self._free[0]:
            raise RuntimeError("llama.cpp context 0 has no free sequence")
        seq = self._free[0].pop()
        self.contexts[0].decode([(seq, list(prefix), 0, len(prefix))])  # no logits
        found = self._request_openings[prefix] = (seq, len(prefix))
        return found

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, n_vocab] logits -> [N, V] float32 log-probs over the tokenizer's vocabulary."""
        return torch.log_softmax(logits[:, : self.policy_set.vocab_size].float(), dim=-1)

    def _run_openings(self, openings: Sequence[list[int]]) -> list[tuple[int, int] | None]:
        """Run each model's opening once on a sequence of its own: (sequence, length)."""
        found: list[tuple[int, int] | None] = [None] * self.members
        pieces: dict[int, list[tuple[int, list[int], int, int]]] = {}
        for m, opening in enumerate(openings):
            if opening:
                c = self.context_of[m]
                seq = self._free[c].pop()
                pieces.setdefault(c, []).append((seq, list(opening), 0, len(opening)))
                found[m] = (seq, len(opening))
        for c, part in pieces.items():
            self.contexts[c].decode(part)  # no logits: the KV is what is kept
        return found

    def _start(
        self, model: int, prompt: list[int], own: Sequence[RequestPersona] = ()
    ) -> tuple[int, int]:
        """A fresh sequence for ``prompt`` on model's context, sharing its opening's cells
        when the prompt starts with it; (sequence, tokens already there)."""
        c = self._context(model)
        cached: list[int] = []
        opening = None
        if model >= self.members:  # a request's own persona
            prefix = own[model - self.members].prefix
            if 0 < len(prefix) < len(prompt) and tuple(prompt[: len(prefix)]) == prefix:
                opening, cached = self._request_opening(prefix), list(prefix)
        elif self._openings[model] is not None:
            opening = self._openings[model]
            cached = self.policy_set.personas.cached[model]  # type: ignore[union-attr]
        if not self._free[c]:
            raise RuntimeError(f"llama.cpp context {c} has no free sequence")
        seq = self._free[c].pop()
        if opening is not None:
            source, length = opening
            if length < len(prompt) and prompt[:length] == cached:
                self.contexts[c].copy(source, seq, length)
                return seq, length
        return seq, 0

    def _release(self, context: int, seq: int) -> None:
        self.contexts[context].remove(seq)
        self._free[context].append(seq)

    # -- decoding ----------------------------------------------------------------------
    def verify(
        self,
        running: Sequence[Row],
        drafts: Mapping[int, Sequence[int]],
        newcomers: Sequence[Row],
    ) -> StepOutput:
        """Every slot's newest token and drafts, and every newcomer slot's prompt (after
        its shared opening), in one llama_decode per context."""
        ps, rows = self.policy_set, StepRows(running, newcomers)
        width = self._width = rows.width(drafts)
        models = rows.models(self.members)  # K + 1, + the most personas a row brings
        logprobs = torch.zeros(models, rows.count, width, ps.vocab_size)  # [M, B, G, V]
        pieces: list[list[tuple[int, list[int], int, int]]] = [[] for _ in self.contexts]
        wanted: list[list[tuple[int, int, int]]] = [[] for _ in self.contexts]  # (m, row, n)
        for row in running:
            tokens = [row.token_ids[-1], *drafts.get(row.sid, ())]
            for m in range(models):
                slot = self._slots.get((row.sid, m))
                if slot is None:
                    continue
                pieces[slot.context].append((slot.seq, tokens, slot.length, 0))
                wanted[slot.context].append((m, rows.row_of[row.sid], len(tokens)))
                slot.before, slot.ran = slot.length, len(tokens)
                slot.length += len(tokens)
        for row, m in rows.joining(models):
            own = row.request_personas if m >= self.members else ()
            prompt = self._render(m, row.token_ids, own)
            c = self._context(m)
            partial = self._slots.get((row.sid, m))  # started by ``prefill_chunk``
            if partial is not None:
                seq, there = partial.seq, partial.length
            else:
                seq, there = self._start(m, prompt, own)
            self._slots[(row.sid, m)] = Slot(c, seq, len(prompt))
            pieces[c].append((seq, prompt[there:], there, len(prompt) - there - 1))
            wanted[c].append((m, rows.row_of[row.sid], 1))
        seconds: dict[str, float] = {}
        for c, context in enumerate(self.contexts):
            if not pieces[c]:
                continue
            started = time.perf_counter()
            out = self._logprobs(context.decode(pieces[c]))  # [ΣG, V]
            seconds[self.names[c]] = time.perf_counter() - started
            at = 0
            for m, row_index, n in wanted[c]:
                logprobs[m, row_index, :n] = out[at : at + n]
                logprobs[m, row_index, n:] = out[at + n - 1]  # padding: as a padded column
                at += n
        return StepOutput(logprobs, seconds)

    def prefill_chunk(self, rows: Sequence[Row], ends: Sequence[int]) -> None:
        """Each slot's rendering of the prompt up to the end's place there, on its
        sequence (started from the shared opening), without logits: one llama_decode per
        context. The slot then waits in ``_slots`` for its last chunk (``verify``)."""
        pieces: list[list[tuple[int, list[int], int, int]]] = [[] for _ in self.contexts]
        for row, end in zip(rows, ends):
            for m in range(len(row.coefs)):  # the family's models, then the row's own
                if row.coefs[m] == 0:
                    continue
                own = row.request_personas if m >= self.members else ()
                prompt = self._render(m, row.token_ids, own)
                stop = min(end + len(prompt) - len(row.token_ids), len(prompt) - 1)
                slot = self._slots.get((row.sid, m))
                if slot is None:
                    seq, there = self._start(m, prompt, own)
                    slot = self._slots[(row.sid, m)] = Slot(self._context(m), seq, there)
                if stop > slot.length:
                    tokens = prompt[slot.length : stop]
                    pieces[slot.context].append((slot.seq, tokens, slot.length, len(tokens)))
                    slot.length = stop
        for c, context in enumerate(self.contexts):
            if pieces[c]:
                context.decode(pieces[c])  # no logits: the KV is what is kept

    def rollback(self, kept: Mapping[int, int]) -> None:
        if self._width == 1:
            return
        for (sid, _m), slot in self._slots.items():
            if slot.ran > 1 and sid in kept and kept[sid] < slot.ran:
                slot.length = slot.before + kept[sid]
                self.contexts[slot.context].remove(slot.seq, slot.length)
            slot.ran = 0

    def keep(self, sids: set[int]) -> None:
        for key in [k for k in self._slots if k[0] not in sids]:
            slot = self._slots.pop(key)
            self._release(slot.context, slot.seq)

    # -- scoring -------------------------------------------------------------------------
    def _positions(
        self,
        model: int,
        tokens: list[int],
        outputs_from: int,
        own: Sequence[RequestPersona] = (),
    ) -> torch.Tensor:
        """Run ``tokens`` on a spare sequence of model's context (after its shared opening
        when it starts with it); log-probs [len(tokens) - outputs_from, V] of the positions
        ``outputs_from...``."""
        c = self._context(model)
        seq, there = self._start(model, tokens, own)
        there = min(there, outputs_from)
        if there:  # the copied opening must not cover a position whose logits we need
            self.contexts[c].remove(seq, there)
        try:
            logits = self.contexts[c].decode([(seq, tokens[there:], there, outputs_from - there)])
        finally:
            self._release(c, seq)
        return self._logprobs(logits)

    def _score_model(
        self,
        model: int,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        render: bool = True,
    ) -> torch.Tensor:
        """Teacher-forced log-prob of each completion under one model: [N]."""
        totals = torch.zeros(len(prompts))
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            if not completion:
                continue
            seen = self._render(model, prompt) if render else list(prompt)
            ids = [*seen, *completion]
            logprobs = self._positions(model, ids, len(seen) - 1)[: len(completion)]  # [C, V]
            picked = logprobs.gather(1, torch.tensor(list(completion)).unsqueeze(1))
            totals[i] = picked.sum()
        return totals

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> ScoreResult:
        k = len(self.policy_set.policies)
        per_model = [self._score_model(m, prompts, completions) for m in range(self.members)]
        policies = torch.stack(per_model[:k], dim=1)  # [N, K]
        reference = per_model[k] if self.members > k else None
        return ScoreResult(policies, reference)

    def score_reference(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> torch.Tensor:
        """The reference alone: [N] (a persona family's plain model on its own rendering)."""
        if self.policy_set.reference is None:
            raise NotImplementedError("this family has no reference")
        return self._score_model(self.members - 1, prompts, completions)

    def prompt_positions(
        self,
        tokens: Sequence[int],
        models: Sequence[int],
        personas: Sequence[RequestPersona] = (),
    ) -> dict[int, torch.Tensor]:
        """Each model's log-probs [T_m, V] of the prompt tokens it sees with a token before
        them (a persona: the request's tokens at the end of its rendering; model
        ``K + 1 + i``: the request's ``personas[i]``)."""
        out = {}
        for m in models:
            rendered = self._render(m, tokens, personas)
            seen = min(common_suffix(rendered, list(tokens)), len(rendered) - 1)
            start = len(rendered) - 1 - seen
            out[m] = self._positions(m, rendered, start, personas)[:seen]  # [T_m, V]
        return out

    def describe(self) -> dict[str, Any]:
        settings = self.policy_set.config.llama_cpp
        return {
            "backend": KIND,
            "contexts": [
                {"model": name, "gguf": str(ctx.model.path), "cells": ctx.n_ctx}
                for name, ctx in zip(self.names, self.contexts)
            ],
            "threads": settings.threads,
            "batch_size": settings.batch_size,
            "gpu_layers": settings.gpu_layers,
            "request_persona_openings": {
                "hits": self.opening_hits, "misses": self.opening_misses,
                "entries": len(self._request_openings), "capacity": REQUEST_OPENINGS,
            },
        }  # fmt: skip
