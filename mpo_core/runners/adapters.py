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

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import torch
from transformers import PreTrainedModel

from ..config import PolicySetConfig
from ..models.chunked_prefill import PartialPrefills
from ..models.kvcache import KVStorage
from ..models.lora import BASE
from ..models.policies import (
    Kernels,
    LoadedModel,
    PolicySet,
    check_output_rows,
    device_of,
    load_model,
    load_tokenizer,
    member_placement,
)
from ..models.soup import adapter_soup
from .base import (
    BatchFactory,
    Capabilities,
    Row,
    RunnerBase,
    StepOutput,
    StepRows,
    growing_batches,
    verify_inputs,
)


class AdapterRunner(RunnerBase):
    """One batch over the shared base; a slot per (request, model it needs)."""

    kind: ClassVar[str] = "adapters"

    def __init__(
        self, policy_set: PolicySet, max_rows: int = 16, batch_factory: BatchFactory | None = None
    ) -> None:
        family, reference = policy_set.adapters, policy_set.reference
        assert family is not None and reference is not None, "not an adapter family"
        self.policy_set = policy_set
        self.capabilities = self.capabilities_of(policy_set)
        self.index = family.index
        self.models = len(policy_set.policies) + 1  # K adapters, then the base
        self.shared = LoadedModel(
            reference.name, family.model, reference.cache_kwarg, reference.accepts_logits_to_keep
        )
        storage = KVStorage(policy_set.kv_dtype)
        slots = max_rows * self.models  # a slot per request and model
        self.index.fill(slots, 0)  # every buffer a graph reads, at full size
        make = batch_factory or growing_batches(policy_set)
        self.batch = make(self.shared, storage, slots)
        # Slots whose prompts are partly prefilled (``prefill_chunk``); each of their
        # forwards first writes its slots' adapters into the index.
        self.parts = PartialPrefills(
            self.shared, policy_set.vocab_size, device_of(self.shared), storage, self._set_index
        )
        self.max_context = self.batch.max_len
        self._width = 1

    # -- the class-level half (``base.Backend``) -------------------------------------
    @staticmethod
    def claims(config: PolicySetConfig) -> bool:
        return config.is_adapter_family

    @staticmethod
    def load(config: PolicySetConfig) -> PolicySet:
        """One base model with K LoRA adapters; the base with the adapters off is the
        reference."""
        from ..models.adapters import load_adapters, read_adapter_configs  # peft: only here

        base_spec = config.base
        assert base_spec is not None
        device, dtype = member_placement(config, base_spec, "base")
        # The adapters' configs first: they are cheap, and a bad adapter should fail at once.
        adapter_configs = read_adapter_configs(base_spec, config.adapter_policies)
        tokenizer = load_tokenizer(base_spec, "base")
        vocab_size = len(tokenizer)
        base = load_model(base_spec, "base", device, dtype)
        check_output_rows(base, "base", vocab_size)
        family = load_adapters(base.model, config.adapter_policies, adapter_configs, dtype, device)

        def member(name: str, adapter: int) -> LoadedModel:
            view = cast(PreTrainedModel, family.view(adapter))  # runs like a model of its own
            return LoadedModel(name, view, base.cache_kwarg, base.accepts_logits_to_keep)

        policies = [member(spec.name, 1 + k) for k, spec in enumerate(config.adapter_policies)]
        # A step of one request (strength 1: no base row) runs a row per adapter.
        kernels = Kernels([family.model], rows=len(policies))
        return PolicySet.build(
            config, policies, member(base_spec.name, 0), tokenizer, device, dtype,
            adapters=family, backend="adapters", kernels=kernels,
        )  # fmt: skip

    @staticmethod
    def capabilities_of(policy_set: PolicySet) -> Capabilities:
        return Capabilities(shared_forward=True, reference_alone=False, token_moments=False)

    @staticmethod
    def soup(policy_set: PolicySet, weights: Sequence[float]) -> PreTrainedModel:
        assert policy_set.adapters is not None
        return adapter_soup(policy_set.adapters, weights)

    # -- decoding ----------------------------------------------------------------------
    def _slot(self, sid: int, model: int) -> int:
        return sid * self.models + model

    def _set_index(self, slots: Sequence[int]) -> torch.Tensor:
        """Write the slots' adapters into the shared index; return their models [S].

        Model m < K is adapter 1 + m; model K, the base, runs no adapter."""
        models = torch.tensor([slot % self.models for slot in slots])  # [S]
        adapters = torch.where(models == self.models - 1, BASE, models + 1)  # [S]
        self.index.set(adapters.to(self.policy_set.device))
        return models.to(self.policy_set.device)

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
        prompts = [s.token_ids for s, _ in joining]
        prefilled = self.batch.prefill(slots, prompts, self.parts)  # [S', V]
        logprobs[models, index] = prefilled

    def verify(
        self,
        running: Sequence[Row],
        drafts: Mapping[int, Sequence[int]],
        newcomers: Sequence[Row],
    ) -> StepOutput:
        ps, rows = self.policy_set, StepRows(running, newcomers)
        width = self._width = rows.width(drafts)
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
            if width == 1:  # a plain step: the batch's decode path (CUDA graphs)
                logprobs[models, index, 0] = self.batch.decode(inputs[0, :, 0], inputs[1, :, 0])
            else:
                logprobs[models, index] = self.batch.verify(inputs[0], inputs[1])  # [S, G, V]
        self._join(rows, logprobs[:, :, 0])
        seconds = {self.shared.name: time.perf_counter() - started} if len(self.batch) else {}
        return StepOutput(logprobs, seconds)

    def prefill_chunk(self, rows: Sequence[Row], ends: Sequence[int]) -> None:
        for row, end in zip(rows, ends):
            for m in range(self.models):
                if row.coefs[m] != 0:
                    self.parts.extend(self._slot(row.sid, m), list(row.token_ids[:end]))

    def rollback(self, kept: Mapping[int, int]) -> None:
        if self._width == 1:
            return
        slots = self.batch.row_ids
        self.batch.rollback([kept.get(slot // self.models, sys.maxsize) for slot in slots])

    def describe(self) -> dict[str, Any]:
        family = self.policy_set.adapters
        assert family is not None
        # each policy's LoRA adapter: rank, alpha, layers
        return {**super().describe(), "adapters": [dataclasses.asdict(a) for a in family.adapters]}

    def keep(self, sids: set[int]) -> None:
        slots = {self._slot(sid, m) for sid in sids for m in range(self.models)}
        self.batch.keep(slots)
        self.parts.keep(slots)
