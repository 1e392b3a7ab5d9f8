"""The runner seam: rows in, per-model next-token log-probs out.

The engine knows rows (one per running request), each with its tokens so far and its
coefficients ``[K + 1]`` (``s * w_k`` per policy, then ``1 - s`` for the reference). Each
step it hands a runner the rows already decoding and the newcomers, and gets back every
row's next-token log-probs under every model whose coefficient for that row is not zero.
How the models are run (K separate models with a KV cache each; one base with K LoRA
adapters in one batched forward; eager or CUDA graphs) is the runner's business: mixing,
sampling, stops, streaming and scoring do not change with it. docs/architecture.md lists
what a backend must provide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..models.policies import LoadedModel, PolicySet
from .scoring import ScoreResult, score_sequences


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
    # [M, B, V] float32 (``verify``: [M, B, G, V]); M = K (+1 with a reference), rows in
    # call order
    logprobs: torch.Tensor
    forward_seconds: dict[str, float]  # per model that ran: wall time of its forwards


class DecodeBatch(Protocol):
    """One model's running rows and their KV cache: ``kvcache.GrowingBatch`` (a cache that
    grows by columns) or ``static_cache.StaticBatch`` (preallocated, CUDA-graphable)."""

    loaded: LoadedModel
    row_ids: list[int]  # the rows' ids, in cache row order

    @property
    def max_len(self) -> int | None: ...  # a row's most columns (static cache); None: grows

    def __len__(self) -> int: ...

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run each row's newest token ([B] each, in row order); log-probs [B, V]."""
        ...

    def prefill(self, row_ids: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Add rows and run their prompts; the last position's log-probs [n, V]."""
        ...

    def keep(self, keep_ids: set[int]) -> None:
        """Drop every row whose id is not in ``keep_ids``."""
        ...

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run ``G`` tokens per row ([B, G] each, in row order) in one forward; log-probs
        [B, G, V]. Each row's columns stay until ``rollback`` settles them."""
        ...

    def rollback(self, kept: list[int]) -> None:
        """After ``verify``: row r (row order) keeps the first ``kept[r]`` of its ``G``
        columns (values past ``G``: all of them, e.g. a row that joined since)."""
        ...


class PolicyRunner(Protocol):
    """The contract every backend meets (the engine calls it from its own thread only)."""

    # The longest prompt + reply the runner can hold (a static cache's columns); None: no
    # limit of its own. The engine caps requests at it (``context_limit``).
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


class SpeculativeRunner(PolicyRunner, Protocol):
    """A backend that can also verify drafted tokens (speculative decoding,
    docs/speculative.md); the engine speculates only on such a runner."""

    def verify(
        self,
        running: Sequence[Row],
        drafts: Mapping[int, Sequence[int]],
        newcomers: Sequence[Row],
    ) -> StepOutput:
        """``step`` with drafted tokens: each running row runs its newest token and the
        drafts after it (``drafts[sid]``, maybe none) in one forward per model, and the
        log-probs are [M, B, G, V] with G = 1 + the longest draft: position j is the
        distribution after the newest token and j drafts. A newcomer has position 0 only.
        ``rollback`` must follow before the next step."""
        ...

    def rollback(self, kept: Mapping[int, int]) -> None:
        """After ``verify``: row sid keeps ``kept[sid]`` of its ``1 + len(draft)``
        columns (1 + the drafts accepted); the rest are dropped."""
        ...


class ScoresWithPolicySet:
    """``score`` for a runner over ``self.policy_set``: one teacher-forced forward per
    model in chunks (an adapter family scores through views that each run one adapter on
    every row), the same chunks and masks for every backend."""

    policy_set: PolicySet

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> ScoreResult:
        return score_sequences(self.policy_set, prompts, completions, chunk_tokens)


class StepRows:
    """One step's rows: the running ones, then the newcomers, in the order of the output's
    row axis. Every backend's ``step`` and ``verify`` start from it."""

    def __init__(self, running: Sequence[Row], newcomers: Sequence[Row]) -> None:
        self.running = running
        self.newcomers = newcomers
        self.count = len(running) + len(newcomers)
        self.row_of = {row.sid: i for i, row in enumerate((*running, *newcomers))}
        self.by_sid = {row.sid: row for row in running}

    def width(self, drafts: Mapping[int, Sequence[int]]) -> int:
        """Columns a verify runs per row: the newest token and the longest draft."""
        return 1 + max((len(drafts.get(row.sid, ())) for row in self.running), default=0)

    def joining(self, models: int) -> list[tuple[Row, int]]:
        """(newcomer, model) for every model of ``models`` a newcomer's mixture needs."""
        return [(s, m) for s in self.newcomers for m in range(models) if s.coefs[m] != 0]


def verify_inputs(
    seqs: Sequence[Row], drafts: Mapping[int, Sequence[int]], width: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Per row: its newest token and its drafts, padded to ``width`` with the last of
    them (columns that ``rollback`` drops), and their positions (padding repeats the
    last position, which keeps it inside the model's position table)."""
    tokens, positions = [], []
    for seq in seqs:
        row = [seq.token_ids[-1], *drafts.get(seq.sid, ())]
        first = len(seq.token_ids) - 1
        pad = width - len(row)
        tokens.append(row + [row[-1]] * pad)
        positions.append([first + j for j in range(len(row))] + [first + len(row) - 1] * pad)
    return tokens, positions


def context_limit(runner: PolicyRunner, max_context: int) -> int:
    """The longest prompt + reply an engine admits: its own limit, capped by the runner's."""
    if runner.max_context is None:
        return max_context
    return min(max_context, runner.max_context)


def all_models(policy_set: PolicySet) -> list[LoadedModel]:
    """The policies, then the reference if there is one (the order of ``logprobs``)."""
    models = [*policy_set.policies]
    if policy_set.reference is not None:
        models.append(policy_set.reference)
    return models
