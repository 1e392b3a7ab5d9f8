"""The adapter-family backend: every row of every request, under every policy it needs,
in one forward of the shared base per step (grouped LoRA, ``lora``).

A request whose coefficient for model m (``s * w_k`` for adapter k, ``1 - s`` for the
base) is not zero owns one *slot* of the batch for m: its own KV-cache row, keyed
``sid * (K + 1) + m``, running adapter ``1 + m`` (or 0, no adapter, for the base). Before
each decode and prefill the runner writes every slot's adapter into the shared index in
the batch's row order. So a request with weights on 2 of 3 adapters and s = 0.6 holds 3
slots; a one-hot request at s = 1 holds one, and costs what one base row costs plus its
LoRA deltas.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from ..models.kvcache import GrowingBatch, KVStorage
from ..models.lora import BASE
from ..models.policies import LoadedModel, PolicySet
from .base import DecodeBatch, Row, ScoresWithPolicySet, StepOutput, StepRows, verify_inputs

# (shared model, vocab size, device, storage, slots) -> the batch the adapters share.
BatchFactory = Callable[[LoadedModel, int, torch.device, KVStorage, int], DecodeBatch]


def growing(
    loaded: LoadedModel, vocab_size: int, device: torch.device, storage: KVStorage, _slots: int
) -> DecodeBatch:
    return GrowingBatch(loaded, vocab_size, device, storage)


class AdapterRunner(ScoresWithPolicySet):
    """One batch over the shared base; a slot per (request, model it needs)."""

    def __init__(
        self, policy_set: PolicySet, max_rows: int = 16, batch_factory: BatchFactory = growing
    ) -> None:
        family, reference = policy_set.adapters, policy_set.reference
        assert family is not None and reference is not None, "not an adapter family"
        self.policy_set = policy_set
        self.index = family.index
        self.models = len(policy_set.policies) + 1  # K adapters, then the base
        self.shared = LoadedModel(
            reference.name, family.model, reference.cache_kwarg, reference.accepts_logits_to_keep
        )
        storage = KVStorage(policy_set.kv_dtype)
        slots = max_rows * self.models  # a slot per request and model
        self.index.fill(slots, 0)  # every buffer a graph reads, at full size
        self.batch = batch_factory(
            self.shared, policy_set.vocab_size, policy_set.device, storage, slots
        )
        self.max_context = self.batch.max_len

    def _slot(self, sid: int, model: int) -> int:
        return sid * self.models + model

    def _set_index(self, slots: Sequence[int]) -> torch.Tensor:
        """Write the slots' adapters into the shared index; return their models [S].

        Model m < K is adapter 1 + m; model K, the base, runs no adapter."""
        models = torch.tensor([slot % self.models for slot in slots])  # [S]
        adapters = torch.where(models == self.models - 1, BASE, models + 1)  # [S]
        self.index.set(adapters.to(self.policy_set.device))
        return models.to(self.policy_set.device)

    def step(self, running: Sequence[Row], newcomers: Sequence[Row]) -> StepOutput:
        ps, rows = self.policy_set, StepRows(running, newcomers)
        logprobs = torch.zeros(self.models, rows.count, ps.vocab_size, device=ps.device)
        started = time.perf_counter()
        if len(self.batch):
            slots = self.batch.row_ids
            seqs = [rows.by_sid[slot // self.models] for slot in slots]
            tokens = torch.tensor([s.token_ids[-1] for s in seqs], device=ps.device)  # [S]
            positions = torch.tensor([len(s.token_ids) - 1 for s in seqs], device=ps.device)
            models = self._set_index(slots)  # [S]
            index = torch.tensor([rows.row_of[s.sid] for s in seqs], device=ps.device)  # [S]
            logprobs[models, index] = self.batch.decode(tokens, positions)  # [S, V]
        self._join(rows, logprobs)
        seconds = {self.shared.name: time.perf_counter() - started} if len(self.batch) else {}
        return StepOutput(logprobs, seconds)

    def _join(self, rows: StepRows, logprobs: torch.Tensor) -> None:
        """Prefill the newcomers' slots; their log-probs into ``logprobs`` [M, B, V] (a
        verify passes its column 0, a view)."""
        joining = rows.joining(self.models)
        if not joining:
            return
        slots = [self._slot(s.sid, m) for s, m in joining]
        models = self._set_index(slots)  # [S']
        index = torch.tensor(
            [rows.row_of[s.sid] for s, _ in joining], device=self.policy_set.device
        )
        prefilled = self.batch.prefill(slots, [s.token_ids for s, _ in joining])  # [S', V]
        logprobs[models, index] = prefilled

    def verify(
        self,
        running: Sequence[Row],
        drafts: Mapping[int, Sequence[int]],
        newcomers: Sequence[Row],
    ) -> StepOutput:
        ps, rows = self.policy_set, StepRows(running, newcomers)
        width = rows.width(drafts)
        shape = (self.models, rows.count, width, ps.vocab_size)
        logprobs = torch.zeros(shape, device=ps.device)  # [M, B, G, V]
        started = time.perf_counter()
        if len(self.batch):
            slots = self.batch.row_ids
            seqs = [rows.by_sid[slot // self.models] for slot in slots]
            tokens, positions = verify_inputs(seqs, drafts, width)
            inputs = torch.tensor([tokens, positions], device=ps.device)  # [2, S, G]
            models = self._set_index(slots)  # [S]
            index = torch.tensor([rows.row_of[s.sid] for s in seqs], device=ps.device)  # [S]
            logprobs[models, index] = self.batch.verify(inputs[0], inputs[1])  # [S, G, V]
        self._join(rows, logprobs[:, :, 0])
        seconds = {self.shared.name: time.perf_counter() - started} if len(self.batch) else {}
        return StepOutput(logprobs, seconds)

    def rollback(self, kept: Mapping[int, int]) -> None:
        slots = self.batch.row_ids
        self.batch.rollback([kept.get(slot // self.models, sys.maxsize) for slot in slots])

    def keep(self, sids: set[int]) -> None:
        self.batch.keep({self._slot(sid, m) for sid in sids for m in range(self.models)})
