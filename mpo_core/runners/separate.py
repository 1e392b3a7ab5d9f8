"""K full models (+ the reference), each with its own batch of rows and KV cache, each on
its own device."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from ..config import PolicySetConfig
from ..models.chunked_prefill import PartialPrefills
from ..models.kvcache import KVStorage
from ..models.policies import PolicySet, device_of, load_full_models
from ..models.soup import soup_state_dict
from .base import (
    BatchFactory,
    Capabilities,
    DecodeBatch,
    Row,
    RunnerBase,
    ScoreResult,
    StepOutput,
    StepRows,
    all_models,
    growing_batches,
    verify_inputs,
)
from .moments import score_with_moments


class SeparateModelsRunner(RunnerBase):
    """K full models (+ the reference), each with its own batch of rows and KV cache.

    A model runs only the rows whose coefficient for it is not zero, so a one-hot request
    costs one forward and s = 1 never runs the reference. Each model runs where it was
    loaded (its ``device:``); every model's forward is queued before any output is read,
    so members on different GPUs run at once, and their log-probs meet on the mixing
    device (``PolicySet.device``).
    """

    kind: ClassVar[str] = "separate"

    def __init__(
        self,
        policy_set: PolicySet,
        max_rows: int = 16,
        batch_factory: BatchFactory | None = None,
    ) -> None:
        self.policy_set = policy_set
        self.capabilities = self.capabilities_of(policy_set)
        make = batch_factory or growing_batches(policy_set)
        storage = KVStorage(policy_set.kv_dtype)  # shared: the models run one at a time
        self.batches: list[DecodeBatch] = [
            make(m, storage, max_rows) for m in all_models(policy_set)
        ]
        self.devices = [device_of(m) for m in all_models(policy_set)]
        # Rows whose prompts are partly prefilled (``prefill_chunk``), per model.
        self.parts = [
            PartialPrefills(m, policy_set.vocab_size, device_of(m), storage)
            for m in all_models(policy_set)
        ]
        limits = [b.max_len for b in self.batches if b.max_len is not None]
        self.max_context: int | None = min(limits) if limits else None
        self._width = 1  # columns the last verify ran per row

    # -- the class-level half (``base.Backend``) -------------------------------------
    @staticmethod
    def claims(config: PolicySetConfig) -> bool:
        return config.base is None and config.persona_host is None

    @staticmethod
    def load(config: PolicySetConfig) -> PolicySet:
        return load_full_models(config)

    @staticmethod
    def capabilities_of(policy_set: PolicySet) -> Capabilities:
        return Capabilities(shared_forward=False, reference_alone=True, token_moments=True)

    @staticmethod
    def soup(policy_set: PolicySet, weights: Sequence[float]) -> PreTrainedModel:
        template = next(p for p, w in zip(policy_set.policies, weights) if w != 0)
        soup = copy.deepcopy(template.model)  # same architecture, device and dtype
        soup.load_state_dict(soup_state_dict(policy_set.models, weights))
        return soup.eval().requires_grad_(False)

    # -- decoding ----------------------------------------------------------------------
    def verify(
        self,
        running: Sequence[Row],
        drafts: Mapping[int, Sequence[int]],
        newcomers: Sequence[Row],
    ) -> StepOutput:
        ps, rows = self.policy_set, StepRows(running, newcomers)
        width = self._width = rows.width(drafts)
        shape = (len(self.batches), rows.count, width, ps.vocab_size)
        logprobs = torch.zeros(shape, device=ps.device)  # [M, B, G, V]
        # Each device's inputs go to it in one copy, before any forward is queued: a copy
        # from host memory waits for the stream, which would otherwise stall each model's
        # launch behind the previous model's (graph) replay.
        seqs = [rows.by_sid[sid] for batch in self.batches for sid in batch.row_ids]
        tokens, positions = verify_inputs(seqs, drafts, width)
        host = torch.tensor([tokens, positions], dtype=torch.long)  # [2, ΣB_m, G]
        inputs = {d: host.to(d) for d in set(self.devices)}
        where = torch.tensor([rows.row_of[s.sid] for s in seqs], device=ps.device)  # [ΣB_m]
        outputs: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (model, rows, [n, G, V])
        forward_seconds: dict[str, float] = {}
        start = 0
        for m, batch in enumerate(self.batches):
            started = time.perf_counter()
            if len(batch):
                part = slice(start, start + len(batch))
                start += len(batch)
                x = inputs[self.devices[m]]
                if width == 1:  # a plain step: the batch's decode path (CUDA graphs)
                    out = batch.decode(x[0, part, 0], x[1, part, 0]).unsqueeze(1)  # [B_m, 1, V]
                else:
                    out = batch.verify(x[0, part], x[1, part])  # [B_m, G, V]
                outputs.append((m, where[part], out))
            joining = [s for s in newcomers if s.coefs[m] != 0]
            if joining:
                index = torch.tensor([rows.row_of[s.sid] for s in joining], device=ps.device)
                sids, prompts = [s.sid for s in joining], [s.token_ids for s in joining]
                prefilled = batch.prefill(sids, prompts, self.parts[m])  # [n, V]
                outputs.append((m, index, prefilled.unsqueeze(1)))  # [n, 1, V]
            if len(batch):  # on a GPU: the time to queue its forwards
                forward_seconds[batch.loaded.name] = time.perf_counter() - started
        # Only now are the outputs read: every member's forward was queued first.
        for m, index, out in outputs:
            logprobs[m, index, : out.shape[1]] = out.to(ps.device, non_blocking=True)
        return StepOutput(logprobs, forward_seconds)

    def prefill_chunk(self, rows: Sequence[Row], ends: Sequence[int]) -> None:
        for row, end in zip(rows, ends):
            for m, parts in enumerate(self.parts):
                if row.coefs[m] != 0:
                    parts.extend(row.sid, list(row.token_ids[:end]))

    def rollback(self, kept: Mapping[int, int]) -> None:
        if self._width == 1:
            return  # a plain step added one column per row: nothing to drop
        for batch in self.batches:
            batch.rollback([kept.get(sid, sys.maxsize) for sid in batch.row_ids])

    def keep(self, sids: set[int]) -> None:
        for batch, parts in zip(self.batches, self.parts):
            batch.keep(sids)
            parts.keep(sids)

    def score_with_moments(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        coefficients: Sequence[Sequence[float]],
    ) -> tuple[ScoreResult, torch.Tensor]:
        return score_with_moments(self.policy_set, prompts, completions, coefficients)
