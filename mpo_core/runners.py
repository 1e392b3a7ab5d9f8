"""How the policies are run, behind one seam: rows in, per-model next-token log-probs out.

The engine knows rows (one per running request), each with its tokens so far and its
coefficients ``[K + 1]`` (``s * w_k`` per policy, then ``1 - s`` for the reference). Each
step it hands a runner the rows already decoding and the newcomers, and gets back every
row's next-token log-probs under every model whose coefficient for that row is not zero.
How the models are run (K separate models with a KV cache each; one base with K LoRA
adapters in one batched forward; eager or CUDA graphs) is the runner's business: mixing,
sampling, stops, streaming and scoring do not change with it. docs/engine.md lists what
a backend must provide.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .kvcache import KVStorage, ModelBatch
from .policies import LoadedModel, PolicySet
from .scoring import ScoreResult, score_sequences
from .static_cache import StaticBatch


class Row(Protocol):
    """What a runner reads of a running request."""

    @property
    def sid(self) -> int: ...  # unique per request, stable while it runs

    @property
    def token_ids(self) -> list[int]: ...  # prompt + generated so far

    @property
    def coefs(self) -> Sequence[float]: ...  # [K + 1]; 0 = that model is not needed


@dataclass
class StepOutput:
    logprobs: torch.Tensor  # [M, B, V] float32; M = K (+1 with a reference), rows in call order
    forward_seconds: dict[str, float]  # per model that ran: wall time of its forwards


class PolicyRunner(Protocol):
    """The contract every backend meets (the engine calls it from its own thread only)."""

    # The longest prompt + reply the runner can hold (a static cache's columns); None: no
    # limit of its own. The engine caps requests at it.
    max_context: int | None

    def step(self, running: Sequence[Row], newcomers: Sequence[Row]) -> StepOutput:
        """Decode the running rows' newest token and prefill the newcomers' prompts.

        Rows of ``logprobs`` follow ``[*running, *newcomers]``; entries of a model a row does
        not need (coefficient 0) are unspecified. After the call the newcomers are running.
        """
        ...

    def keep(self, sids: set[int]) -> None:
        """Forget every row whose sid is not in ``sids`` (finished, cancelled, failed)."""
        ...

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> ScoreResult:
        """Teacher-forced log-prob of each completion under every policy and the reference."""
        ...


class SeparateModelsRunner:
    """K full models (+ the reference), each with its own batch of rows and KV cache.

    A model runs only the rows whose coefficient for it is not zero, so a one-hot request
    costs one forward and s = 1 never runs the reference.
    """

    def __init__(
        self, policy_set: PolicySet, batches: Sequence[ModelBatch | StaticBatch] | None = None
    ) -> None:
        self.policy_set = policy_set
        if batches is None:
            storage = KVStorage(policy_set.kv_dtype)  # shared: the models run one at a time
            batches = [
                ModelBatch(m, policy_set.vocab_size, policy_set.device, storage)
                for m in all_models(policy_set)
            ]
        self.batches = list(batches)
        static = [b.max_len for b in self.batches if isinstance(b, StaticBatch)]
        self.max_context: int | None = min(static) if static else None

    def step(self, running: Sequence[Row], newcomers: Sequence[Row]) -> StepOutput:
        ps = self.policy_set
        rows = [*running, *newcomers]
        by_sid = {row.sid: row for row in running}
        row_of = {row.sid: i for i, row in enumerate(rows)}
        logprobs = torch.zeros(len(self.batches), len(rows), ps.vocab_size, device=ps.device)
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

    def keep(self, sids: set[int]) -> None:
        for batch in self.batches:
            batch.keep(sids)

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> ScoreResult:
        return score_sequences(self.policy_set, prompts, completions, chunk_tokens)


def all_models(policy_set: PolicySet) -> list[LoadedModel]:
    """The policies, then the reference if there is one (the order of ``logprobs``)."""
    models = [*policy_set.policies]
    if policy_set.reference is not None:
        models.append(policy_set.reference)
    return models
