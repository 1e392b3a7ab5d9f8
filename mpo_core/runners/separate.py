"""K full models (+ the reference), each with its own batch of rows and KV cache."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence

import torch

from ..models.kvcache import GrowingBatch, KVStorage
from ..models.policies import PolicySet
from .base import (
    DecodeBatch,
    Row,
    ScoresWithPolicySet,
    StepOutput,
    StepRows,
    all_models,
    verify_inputs,
)


class SeparateModelsRunner(ScoresWithPolicySet):
    """K full models (+ the reference), each with its own batch of rows and KV cache.

    A model runs only the rows whose coefficient for it is not zero, so a one-hot request
    costs one forward and s = 1 never runs the reference.
    """

    def __init__(self, policy_set: PolicySet, batches: Sequence[DecodeBatch] | None = None) -> None:
        self.policy_set = policy_set
        if batches is None:
            storage = KVStorage(policy_set.kv_dtype)  # shared: the models run one at a time
            batches = [
                GrowingBatch(m, policy_set.vocab_size, policy_set.device, storage)
                for m in all_models(policy_set)
            ]
        self.batches: list[DecodeBatch] = list(batches)
        limits = [b.max_len for b in self.batches if b.max_len is not None]
        self.max_context: int | None = min(limits) if limits else None

    def step(self, running: Sequence[Row], newcomers: Sequence[Row]) -> StepOutput:
        ps, rows = self.policy_set, StepRows(running, newcomers)
        by_sid, row_of = rows.by_sid, rows.row_of
        logprobs = torch.zeros(len(self.batches), rows.count, ps.vocab_size, device=ps.device)
        # Every model's decode inputs go to the device in one copy, before any forward is
        # queued: a copy from host memory waits for the stream, which would otherwise
        # stall each model's launch behind the previous model's (graph) replay.
        columns: list[list[int]] = [[], [], []]  # tokens, positions, rows of logprobs
        for batch in self.batches:
            for sid in batch.row_ids:
                seq = by_sid[sid]
                columns[0].append(seq.token_ids[-1])
                columns[1].append(len(seq.token_ids) - 1)
                columns[2].append(row_of[sid])
        inputs = torch.tensor(columns, dtype=torch.long).to(ps.device)  # [3, sum of B_m]
        forward_seconds: dict[str, float] = {}
        start = 0
        for m, batch in enumerate(self.batches):
            started = time.perf_counter()
            if len(batch):
                tokens, positions, index = inputs[:, start : start + len(batch)]  # [B_m] each
                start += len(batch)
                logprobs[m, index] = batch.decode(tokens, positions)  # [B_m, V]
            joining = [s for s in newcomers if s.coefs[m] != 0]
            if joining:
                index = torch.tensor([row_of[s.sid] for s in joining], device=ps.device)
                logprobs[m, index] = batch.prefill(
                    [s.sid for s in joining], [s.token_ids for s in joining]
                )
            if len(batch):
                forward_seconds[batch.loaded.name] = time.perf_counter() - started
        return StepOutput(logprobs, forward_seconds)

    def verify(
        self,
        running: Sequence[Row],
        drafts: Mapping[int, Sequence[int]],
        newcomers: Sequence[Row],
    ) -> StepOutput:
        ps, rows = self.policy_set, StepRows(running, newcomers)
        by_sid, row_of = rows.by_sid, rows.row_of
        width = rows.width(drafts)
        shape = (len(self.batches), rows.count, width, ps.vocab_size)
        logprobs = torch.zeros(shape, device=ps.device)  # [M, B, G, V]
        # One copy to the device for every model's inputs, as in ``step``.
        seqs = [by_sid[sid] for batch in self.batches for sid in batch.row_ids]
        tokens, positions = verify_inputs(seqs, drafts, width)
        inputs = torch.tensor([tokens, positions], dtype=torch.long).to(ps.device)  # [2, ΣB_m, G]
        where = torch.tensor([row_of[s.sid] for s in seqs], device=ps.device)  # [ΣB_m]
        forward_seconds: dict[str, float] = {}
        start = 0
        for m, batch in enumerate(self.batches):
            started = time.perf_counter()
            if len(batch):
                part = slice(start, start + len(batch))
                start += len(batch)
                logprobs[m, where[part]] = batch.verify(inputs[0, part], inputs[1, part])
            joining = [s for s in newcomers if s.coefs[m] != 0]
            if joining:
                index = torch.tensor([row_of[s.sid] for s in joining], device=ps.device)
                logprobs[m, index, 0] = batch.prefill(
                    [s.sid for s in joining], [s.token_ids for s in joining]
                )
            if len(batch):
                forward_seconds[batch.loaded.name] = time.perf_counter() - started
        return StepOutput(logprobs, forward_seconds)

    def rollback(self, kept: Mapping[int, int]) -> None:
        for batch in self.batches:
            batch.rollback([kept.get(sid, sys.maxsize) for sid in batch.row_ids])

    def keep(self, sids: set[int]) -> None:
        for batch in self.batches:
            batch.keep(sids)
