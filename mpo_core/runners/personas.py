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

A request may bring personas of its own (``Row.request_personas``, ids computed by the engine):
models ``K + 1 + i`` of that row, slots like any other, rendered from the persona's ids;
their openings' KV is kept in the same cache, for the most recently used few. A step
whose rows bring none returns the fixed [K + 1, B, G, V]. A static batch, preallocated
with a slot per (row, model of the family), runs none (``request_personas`` is off).

Scoring teacher-forces each completion after each model's rendering of its prompt,
all models' rows in the same chunks of one model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from ..config import PolicySetConfig
from ..errors import ConfigError
from ..models.chunked_prefill import PartialPrefills
from ..models.kvcache import KVStorage, release_free_memory
from ..models.personas import (
    MAX_REQUEST_PERSONAS,
    PersonaRules,
    RequestPersona,
    build_persona_prompts,
    common_suffix,
    render_prompt,
)
from ..models.policies import (
    Kernels,
    LoadedModel,
    PolicySet,
    context_limit_of,
    device_of,
    load_model,
    load_tokenizer,
    member_placement,
)
from ..models.prefix_cache import PrefixCache, prefill_after_prefixes
from .base import (
    AppendableBatch,
    BatchFactory,
    Capabilities,
    Row,
    RunnerBase,
    StepOutput,
    StepRows,
    growing_batches,
    position_logprobs,
    verify_inputs,
)
from .scoring import ScoreResult, score_model

# Padding a 3-slot decode to 4 rows with a filler slot whose output nobody reads paid on
# one CPU only: 1.26x on the AVX2 benchmark machine's MKL kernels, nothing clear on oneDNN,
# a loss on an AVX-512 machine's MKL (``python -m bench.personas`` times it as
# ``personas-padded``). So it is off: set ``PersonaRunner.pad_rows = PAD_ROWS`` to pad.
PAD_ROWS = {3: 4}
FILLER = -1  # the filler slot's id (a request's slots are >= 0)
# Request personas' openings whose KV is kept (the most recently used; the family's own
# are always kept).
REQUEST_OPENINGS = 16


def request_persona_rules(policy_set: PolicySet) -> PersonaRules:
    """The prompt rules of the personas requests bring to this persona family: its
    tokenizer, and the room its context limit leaves for an opening."""
    assert policy_set.personas is not None, "not a persona family"
    return PersonaRules(policy_set.tokenizer, room=policy_set.personas.longest_extra)


class PersonaRunner(RunnerBase):
    """One batch over the shared model; a slot per (request, persona it needs)."""

    kind: ClassVar[str] = "personas"

    def __init__(
        self, policy_set: PolicySet, max_rows: int = 16, batch_factory: BatchFactory | None = None
    ) -> None:
        prompts, reference = policy_set.personas, policy_set.reference
        assert prompts is not None and reference is not None, "not a persona family"
        self.policy_set = policy_set
        self.capabilities = self.capabilities_of(policy_set)
        self.prompts = prompts
        self.models = prompts.models  # K personas, then the plain model
        # A request's slots are sid * stride + m: its K + 1 models, then its own personas.
        self.stride = self.models + MAX_REQUEST_PERSONAS
        self.shared = reference
        storage = KVStorage(policy_set.kv_dtype)
        make = batch_factory or growing_batches(policy_set)
        self.batch = make(reference, storage, max_rows * self.models)
        # Slots whose prompts are partly prefilled (``prefill_chunk``).
        self.parts = PartialPrefills(
            reference, policy_set.vocab_size, device_of(reference), storage
        )
        self.prefixes: PrefixCache | None = None
        if isinstance(self.batch, AppendableBatch):
            self.prefixes = PrefixCache(
                reference, policy_set.vocab_size, device_of(reference), storage, REQUEST_OPENINGS
            )
        else:  # a static batch has a slot per (row, model of the family) and no more
            self.capabilities = replace(self.capabilities, request_personas=False)
        # A slot's prompt is longer than its request's by up to ``longest_extra`` tokens.
        limit = self.batch.max_len
        self.max_context = None if limit is None else limit - prompts.longest_extra
        self._shift: dict[int, int] = {}  # slot -> its prompt's length - the request's
        self.pad_rows: dict[int, int] = {}  # real rows -> rows run (growing caches only)
        self._filler_length = 0  # tokens the filler slot holds
        self._width = 1

    # -- the class-level half (``base.Backend``) -------------------------------------
    @staticmethod
    def claims(config: PolicySetConfig) -> bool:
        return config.persona_host is not None

    @staticmethod
    def load(config: PolicySetConfig) -> PolicySet:
        """One model and K personas of it: every member is the same weights (no copy), the
        plain model is the reference, and ``personas`` says how each member sees a prompt."""
        host = config.persona_host
        assert host is not None
        device, dtype = member_placement(config, host, "reference")
        tokenizer = load_tokenizer(host, "reference")
        # The prompt rule first: it is cheap, and a template without system messages fails.
        prompts = build_persona_prompts(tokenizer, config.persona_policies, host.name)
        shared = load_model(host, "reference", device, dtype)

        def member(name: str) -> LoadedModel:
            return LoadedModel(
                name, shared.model, shared.cache_kwarg, shared.accepts_logits_to_keep
            )

        limit = context_limit_of(shared.model)
        if limit - prompts.longest_extra < 2:
            raise ConfigError(
                f"the personas' prompts ({prompts.longest_extra} tokens) leave no room in the "
                f"context of {host.name!r} ({limit} tokens)"
            )
        policies = [member(spec.name) for spec in config.persona_policies]
        # A step of one request (strength 1: no plain row) runs a row per persona, on
        # packed weights where oneDNN wins (cpu_linear).
        kernels = Kernels([shared.model], rows=len(policies), pack=True)
        return PolicySet.build(
            config, policies, member(host.name), tokenizer, device, dtype,
            max_context=limit - prompts.longest_extra, personas=prompts, backend="personas",
            kernels=kernels,
        )  # fmt: skip

    @staticmethod
    def capabilities_of(policy_set: PolicySet) -> Capabilities:
        return Capabilities(
            shared_forward=True, reference_alone=True, token_moments=False, request_personas=True
        )

    @staticmethod
    def soup(policy_set: PolicySet, weights: Sequence[float]) -> PreTrainedModel:
        assert policy_set.reference is not None
        return policy_set.reference.model  # the average of K copies of one model

    def _pad(self) -> None:
        """Add the filler slot when the real slots are a row count worth padding; drop
        it otherwise."""
        real = [slot for slot in self.batch.row_ids if slot != FILLER]
        wanted = self.pad_rows.get(len(real), len(real)) > len(real)
        present = len(real) < len(self.batch)
        if present and not wanted:
            self.batch.keep(set(real))
        elif wanted and not present:
            self.batch.prefill([FILLER], [[0]])
            self._filler_length = 1

    def _slot(self, sid: int, model: int) -> int:
        return sid * self.stride + model

    def _rule(self, row: Row, model: int) -> tuple[list[int], list[int], bool]:
        """Model ``model``'s (prefix, strip) for ``row`` and whether it is the family's own
        (a configured member) rather than the row's request persona."""
        if model < self.models:
            return self.prompts.prefix[model], self.prompts.strip[model], True
        persona: RequestPersona = row.request_personas[model - self.models]
        return list(persona.prefix), list(persona.strip), False

    def _render(self, row: Row, model: int, tokens: Sequence[int]) -> list[int]:
        if model < self.models:
            return self.prompts.render(model, tokens)
        prefix, strip, _ = self._rule(row, model)
        return render_prompt(prefix, strip, self.prompts.bos_token_id, tokens)

    def _inputs(
        self, rows: StepRows, drafts: Mapping[int, Sequence[int]], width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's tokens and positions [2, S, G] in cache-row order: a request's slot
        runs its newest token and drafts at its persona's shifted positions, the filler
        token 0 at its next positions. Then which cache rows are requests' slots [S'],
        their models [S'] and their rows of the output [S']."""
        slots = self.batch.row_ids
        real = [i for i, slot in enumerate(slots) if slot != FILLER]
        seqs = [rows.by_sid[slots[i] // self.stride] for i in real]
        tokens, positions = verify_inputs(seqs, drafts, width)
        positions = [[p + self._shift[slots[i]] for p in row] for i, row in zip(real, positions)]
        if len(real) < len(slots):
            at = slots.index(FILLER)
            tokens.insert(at, [0] * width)
            positions.insert(at, list(range(self._filler_length, self._filler_length + width)))
        device = self.policy_set.device
        return (
            torch.tensor([tokens, positions], device=device),
            torch.tensor(real, device=device),
            torch.tensor([slots[i] % self.stride for i in real], device=device),
            torch.tensor([rows.row_of[s.sid] for s in seqs], device=device),
        )

    def verify(
        self,
        running: Sequence[Row],
        drafts: Mapping[int, Sequence[int]],
        newcomers: Sequence[Row],
    ) -> StepOutput:
        """Each slot runs its request's newest token and drafts at its persona's shifted
        positions, all slots (and the filler, if present) in one forward."""
        ps, rows = self.policy_set, StepRows(running, newcomers)
        width = self._width = rows.width(drafts)
        shape = (rows.models(self.models), rows.count, width, ps.vocab_size)
        logprobs = torch.zeros(shape, device=ps.device)  # [M, B, G, V]; M = K + 1 (+ R)
        started = time.perf_counter()
        if self.pad_rows and width == 1 and isinstance(self.batch, AppendableBatch):
            self._pad()
        if len(self.batch):
            inputs, real, models, index = self._inputs(rows, drafts, width)
            if width == 1:  # a plain step: the batch's decode path (CUDA graphs)
                decoded = self.batch.decode(inputs[0, :, 0], inputs[1, :, 0])  # [S, V]
                if FILLER in self.batch.row_ids:
                    self._filler_length += 1
                logprobs[models, index, 0] = decoded[real]
            else:
                verified = self.batch.verify(inputs[0], inputs[1])  # [S, G, V]
                logprobs[models, index] = verified[real]
        self._join(rows, logprobs[:, :, 0])
        seconds = {self.shared.name: time.perf_counter() - started} if len(self.batch) else {}
        return StepOutput(logprobs, seconds)

    def rollback(self, kept: Mapping[int, int]) -> None:
        if self._width == 1:
            return
        slots = self.batch.row_ids
        per_slot = [kept.get(slot // self.stride, sys.maxsize) for slot in slots]
        if FILLER in slots:  # as many columns as the longest run kept: the rest crop
            longest = max(kept.values(), default=1)
            per_slot[slots.index(FILLER)] = longest
            self._filler_length += longest
        self.batch.rollback(per_slot)

    def _join(self, rows: StepRows, logprobs: torch.Tensor) -> None:
        """Prefill the newcomers' slots, each with its persona's rendering of the prompt;
        their log-probs into ``logprobs`` [M, B, V] (a verify passes its column 0, a view)."""
        joining = rows.joining(logprobs.shape[0])
        if not joining:
            return
        device = self.policy_set.device
        slots = [self._slot(s.sid, m) for s, m in joining]
        prompts = [self._render(s, m, s.token_ids) for s, m in joining]
        for slot, prompt, (s, _) in zip(slots, prompts, joining):
            self._shift[slot] = len(prompt) - len(s.token_ids)
        models = torch.tensor([m for _, m in joining], device=device)  # [S']
        index = torch.tensor([rows.row_of[s.sid] for s, _ in joining], device=device)
        prefilled = self._prefill(slots, joining, prompts)  # [S', V]
        logprobs[models, index] = prefilled

    def _prefill(
        self, slots: list[int], joining: list[tuple[Row, int]], prompts: list[list[int]]
    ) -> torch.Tensor:
        """Add the slots to the batch; their last position's log-probs [S', V]."""
        started = any(slot in self.parts for slot in slots)  # by ``prefill_chunk``
        if self.prefixes is None or not isinstance(self.batch, AppendableBatch) or started:
            return self.batch.prefill(slots, prompts, self.parts)
        openings = [self._opening(row, m, prompt) for (row, m), prompt in zip(joining, prompts)]
        pinned = [m < self.models for _, m in joining]  # the family's own: kept for good
        if not any(openings):
            return self.batch.prefill(slots, prompts)
        rests = [p[len(o) :] for o, p in zip(openings, prompts)]
        result, cache, mask = prefill_after_prefixes(self.prefixes, openings, rests, pinned)
        self.batch.append(slots, cache, mask)
        del cache
        if self.policy_set.device.type == "cpu":  # the prefill's buffers, back to the OS
            release_free_memory()
        return result

    def _opening(self, row: Row, model: int, prompt: list[int]) -> list[int]:
        """Model's cached opening (a request persona's: its prefix) if ``prompt`` starts
        with it (and has more), else []."""
        opening = self.prompts.cached[model] if model < self.models else self._rule(row, model)[0]
        usable = 0 < len(opening) < len(prompt) and prompt[: len(opening)] == opening
        return opening if usable else []

    def prefill_chunk(self, rows: Sequence[Row], ends: Sequence[int]) -> None:
        """Each slot runs its rendering of the prompt up to the end's place there (its
        persona's tokens shift it), starting from its cached opening where it can."""
        for row, end in zip(rows, ends):
            for m in range(len(row.coefs)):  # the family's models, then the row's own
                if row.coefs[m] == 0:
                    continue
                prompt = self._render(row, m, row.token_ids)
                stop = min(end + len(prompt) - len(row.token_ids), len(prompt) - 1)
                opening = self._opening(row, m, prompt) if self.prefixes is not None else []
                cached = None
                if self.prefixes is not None and opening:
                    cached = self.prefixes.get(opening, m < self.models)
                self.parts.extend(self._slot(row.sid, m), prompt[: max(stop, 0)], cached)

    def keep(self, sids: set[int]) -> None:
        kept = {self._slot(sid, m) for sid in sids for m in range(self.stride)}
        self.parts.keep(kept)
        self.batch.keep(kept | {FILLER} if kept else kept)  # the next step re-pads
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
            self.shared, ps.vocab_size, rendered, list(completions) * self.models, chunk_tokens
        )  # [M * N]
        per_model = totals.view(self.models, n)  # [M, N]
        return ScoreResult(per_model[:-1].t().contiguous(), per_model[-1].clone())

    def score_reference(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> torch.Tensor:
        """The plain model on the prompts as given: [N]."""
        ps = self.policy_set
        return score_model(self.shared, ps.vocab_size, prompts, completions, chunk_tokens)

    def prompt_positions(
        self,
        tokens: Sequence[int],
        models: Sequence[int],
        personas: Sequence[RequestPersona] = (),
    ) -> dict[int, torch.Tensor]:
        """Model m runs its persona's rendering of the prompt; the positions it returns are
        those predicting the request's own tokens at the end of that rendering. Model
        ``K + 1 + i`` is the request's persona ``personas[i]``."""
        out = {}
        for m in models:
            if m < self.models:
                rendered = self.prompts.render(m, list(tokens))
            else:
                own = personas[m - self.models]
                bos = self.prompts.bos_token_id
                rendered = render_prompt(own.prefix, own.strip, bos, tokens)
            seen = min(common_suffix(rendered, list(tokens)), len(rendered) - 1)
            logprobs = position_logprobs(self.policy_set, self.shared, rendered)  # [L_m - 1, V]
            out[m] = logprobs[len(logprobs) - seen :]  # [T_m, V]
        return out

    def describe(self) -> dict[str, Any]:
        """The backend, and the cache of request personas' openings (plain numbers)."""
        out: dict[str, Any] = {"backend": self.policy_set.backend}
        if self.prefixes is not None:
            out["request_persona_openings"] = self.prefixes.stats()
        return out
