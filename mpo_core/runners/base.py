"""The runner seam: rows in, per-model next-token log-probs out.

The engine knows rows (one per running request), each with its tokens so far and its
coefficients ``[K + 1]`` (``s * w_k`` per policy, then ``1 - s`` for the reference; on a
backend with ``request_personas``, ``[K + 1 + R]`` for a row that brings R personas of its
own, ``Row.request_personas``, models ``K + 1 + i``). Each
step it hands a runner the rows already decoding (each with the tokens drafted for it, if
any) and the newcomers, and gets back every row's next-token log-probs under every model
whose coefficient for that row is not zero, on the mixing device. How and where the models
run (K separate models, each on its own device; one base with K LoRA adapters in one
batched forward; one model under K system prompts; eager or CUDA graphs) is the runner's
business, and so is everything else that runs a model: teacher-forced scoring, prompt
log-probs, soups. What a backend can do it declares in ``Capabilities``; the rest of the
code reads those, never the backend's class. docs/architecture.md, "Adding a backend".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from ..config import PolicySetConfig
from ..models.kvcache import GrowingBatch, KVStorage, Prefiller, to_logprobs
from ..models.personas import RequestPersona
from ..models.policies import LoadedModel, PolicySet, device_of
from .scoring import ScoreResult, score_model, score_sequences


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, read by the engine, the KV budget, speculation, fits and
    evaluation instead of the backend's class or the family's kind."""

    # One forward runs every member's rows (adapters, personas): a draft forward of the
    # shared model costs about a whole step, and the KV cache is one batch of slots.
    shared_forward: bool
    # The reference can be scored alone, without the other members (``score_reference``).
    reference_alone: bool
    # Every member's full distribution at every position of a reply, for the reward fit's
    # decoded target (``score_with_moments``).
    token_moments: bool
    # Soups (parameter averages of the policies) can be built (``soup``).
    soups: bool = True
    # A request may bring personas of its own (``Row.request_personas``): a persona family.
    request_personas: bool = False


class Row(Protocol):
    """What a runner reads of a running request."""

    @property
    def sid(self) -> int: ...  # unique per request, stable while it runs

    @property
    def token_ids(self) -> list[int]: ...  # prompt + generated so far

    @property
    def coefs(self) -> Sequence[float]: ...  # [K + 1 (+ R)]; 0 = that model is not needed

    @property
    def request_personas(self) -> Sequence[RequestPersona]: ...  # [R] model K + 1 + i: [i]


@dataclass
class StepOutput:
    # [M, B, V] float32 (``verify``: [M, B, G, V]); M = K (+1 with a reference, + the most
    # request personas a row of the step brings), rows in call order
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

    def prefill(
        self, row_ids: list[int], prompts: list[list[int]], parts: Prefiller | None = None
    ) -> torch.Tensor:
        """Add rows and run their prompts (the rest of them, for rows ``parts`` started:
        ``chunked_prefill.PartialPrefills``); the last position's log-probs [n, V]."""
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


@runtime_checkable
class AppendableBatch(DecodeBatch, Protocol):
    """A growing batch that also takes rows whose cache was computed elsewhere (a prefill
    after shared prefixes, ``models.prefix_cache``): ``GrowingBatch``, not a static one."""

    def append(self, row_ids: list[int], cache: Any, mask: torch.Tensor) -> None: ...


# (shared or member model, KV storage, slots) -> that model's batch of rows.
BatchFactory = Callable[[LoadedModel, KVStorage, int], DecodeBatch]


class PolicyRunner(Protocol):
    """The contract every backend meets (the engine calls it from its own thread only).

    A backend is a class with this instance interface and the class-level part of
    ``Backend`` (how it loads a family, what it can do); ``factory.BACKENDS`` registers it.
    """

    capabilities: Capabilities
    # The longest prompt + reply the runner can hold (a static cache's columns); None: no
    # limit of its own. The engine caps requests at it (``context_limit``).
    max_context: int | None
    # The most rows it can run at once, when fewer than it was asked for (llama.cpp's
    # sequences per context); None: as many as it was given. The engine caps
    # ``max_running`` at it.
    max_rows: int | None

    def verify(
        self,
        running: Sequence[Row],
        drafts: Mapping[int, Sequence[int]],
        newcomers: Sequence[Row],
    ) -> StepOutput:
        """One decode step: each running row runs its newest token and the drafts after it
        (``drafts[sid]``, maybe none) in one forward per model, and each newcomer's prompt
        is prefilled. Log-probs [M, B, G, V] with G = 1 + the longest draft: position j is
        the distribution after the newest token and j drafts (a newcomer has position 0
        only). Rows follow ``[*running, *newcomers]``; entries of a model a row does not
        need (coefficient 0) are unspecified. A plain step is a verify with no drafts
        (G = 1); after drafts, ``rollback`` must follow before the next step."""
        ...

    def step(self, running: Sequence[Row], newcomers: Sequence[Row]) -> StepOutput:
        """``verify`` with no drafts, log-probs [M, B, V] (``RunnerBase`` provides it)."""
        ...

    def prefill_chunk(self, rows: Sequence[Row], ends: Sequence[int]) -> None:
        """Chunked prefill: run the tokens of each row's prompt (``token_ids``) before
        position ``ends[i]`` into that row's caches (of every model its coefficients need),
        after what earlier calls for the row ran; nothing comes back. Each end is below the
        prompt's length and above the last call's. The row is not running yet: it later
        joins as a newcomer of ``verify``, whose prefill then runs only the rest of its
        prompt, with the same results as a whole prefill. ``keep`` forgets a partly
        prefilled row like a running one. ``RunnerBase`` runs nothing here (the newcomer's
        prefill then runs the whole prompt): right for any backend, just not chunked."""
        ...

    def rollback(self, kept: Mapping[int, int]) -> None:
        """After a ``verify`` with drafts: row sid keeps ``kept[sid]`` of its
        ``1 + len(draft)`` columns (1 + the drafts accepted); the rest are dropped."""
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

    def prompt_positions(
        self,
        tokens: Sequence[int],
        models: Sequence[int],
        personas: Sequence[RequestPersona] = (),
    ) -> dict[int, torch.Tensor]:
        """For each model m of ``models``: its log-probs [T_m, V] (on the mixing device)
        predicting the last T_m tokens of ``tokens``, every prompt token that model sees
        with a token before it (a persona sees the prompt after its own opening). Model
        ``K + 1 + i`` is the request's persona ``personas[i]`` (``request_personas``)."""
        ...

    def score_reference(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> torch.Tensor:
        """The reference alone: [N] (``Capabilities.reference_alone``; else NotImplemented)."""
        ...

    def score_with_moments(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        coefficients: Sequence[Sequence[float]],
    ) -> tuple[ScoreResult, torch.Tensor]:
        """Scores and the reward fit's per-reply moments [N, K] (``runners.moments``;
        ``Capabilities.token_moments``)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What ``GET /info`` reports of the backend: its kind, and what it adds."""
        ...

    def failure(self) -> str | None:
        """Why the backend can no longer run the family (a worker rank lost), else None:
        the engine then reports itself dead (``/health``)."""
        ...

    def close(self) -> None:
        """Release what the backend holds beyond this process (worker ranks) at the end."""
        ...


class Backend(Protocol):
    """The class-level half of a backend: which families it runs and how it loads them."""

    kind: ClassVar[str]  # the PolicySet.backend it runs

    @staticmethod
    def claims(config: PolicySetConfig) -> bool: ...  # does this config describe its family?

    @staticmethod
    def load(config: PolicySetConfig) -> PolicySet: ...

    @staticmethod
    def capabilities_of(policy_set: PolicySet) -> Capabilities: ...

    @staticmethod
    def soup(policy_set: PolicySet, weights: Sequence[float]) -> PreTrainedModel: ...


class RunnerBase:
    """What every backend shares: ``step`` as a verify without drafts, and scoring that runs
    each model of ``self.policy_set`` in teacher-forced chunks (an adapter family's members
    are views that each run one adapter on every row), the same chunks and masks for all."""

    policy_set: PolicySet
    capabilities: Capabilities
    max_rows: int | None = None  # as many rows as it was given

    def verify(
        self,
        running: Sequence[Row],
        drafts: Mapping[int, Sequence[int]],
        newcomers: Sequence[Row],
    ) -> StepOutput:
        raise NotImplementedError

    def step(self, running: Sequence[Row], newcomers: Sequence[Row]) -> StepOutput:
        output = self.verify(running, {}, newcomers)
        return StepOutput(output.logprobs[:, :, 0], output.forward_seconds)  # [M, B, V]

    def prefill_chunk(self, rows: Sequence[Row], ends: Sequence[int]) -> None:
        return None  # not chunked: the newcomer's prefill runs the whole prompt

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> ScoreResult:
        return score_sequences(self.policy_set, prompts, completions, chunk_tokens)

    def prompt_positions(
        self,
        tokens: Sequence[int],
        models: Sequence[int],
        personas: Sequence[RequestPersona] = (),
    ) -> dict[int, torch.Tensor]:
        assert not personas, "this backend runs no request personas"
        members = all_models(self.policy_set)
        return {m: position_logprobs(self.policy_set, members[m], tokens) for m in models}

    def score_reference(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> torch.Tensor:
        ps = self.policy_set
        if not self.capabilities.reference_alone or ps.reference is None:
            raise NotImplementedError("this backend scores the reference with every member")
        return score_model(ps.reference, ps.vocab_size, prompts, completions, chunk_tokens)

    def score_with_moments(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        coefficients: Sequence[Sequence[float]],
    ) -> tuple[ScoreResult, torch.Tensor]:
        raise NotImplementedError("this backend has no per-token moments")

    def describe(self) -> dict[str, Any]:
        """What ``GET /info`` reports of the backend: its kind, and what it adds."""
        return {"backend": self.policy_set.backend}

    def failure(self) -> str | None:
        return None  # a one-process backend is lost only with its process

    def close(self) -> None:
        return None


@torch.inference_mode()
def position_logprobs(
    policy_set: PolicySet, loaded: LoadedModel, tokens: Sequence[int]
) -> torch.Tensor:
    """One model's log-probs [L - 1, V] on the mixing device, predicting tokens 1..L-1."""
    ids = torch.tensor([list(tokens)], device=device_of(loaded))  # [1, L]
    logits = loaded.model(input_ids=ids, use_cache=False).logits  # [1, L, V']
    return to_logprobs(logits[0, :-1], policy_set.vocab_size).to(policy_set.device)


def growing_batches(policy_set: PolicySet) -> BatchFactory:
    """Batches whose caches grow by columns, each on its model's device."""

    def make(loaded: LoadedModel, storage: KVStorage, _slots: int) -> DecodeBatch:
        return GrowingBatch(loaded, policy_set.vocab_size, device_of(loaded), storage)

    return make


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
        """(newcomer, model) for every model of the first ``models`` a newcomer's mixture
        needs (a row's own personas included when ``models`` reaches them)."""
        return [
            (s, m)
            for s in self.newcomers
            for m in range(min(models, len(s.coefs)))
            if s.coefs[m] != 0
        ]

    def models(self, fixed: int) -> int:
        """The step's M: ``fixed`` (K + 1), plus the most personas a row of it brings (its
        coefficients are that much longer)."""
        return max([fixed, *(len(row.coefs) for row in (*self.running, *self.newcomers))])


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
