"""Scoring jobs that share the engine thread with decoding, one chunk per loop turn.

A fit scores thousands of replies; run at once it would hold every streaming request up
for seconds. Split into chunks of about ``chunk_tokens`` tokens, it delays a decode step
by one chunk at most.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ..decoding.mixing import Mixture
from ..decoding.prompt_logprobs import prompt_logprobs
from ..errors import InvalidParameter
from ..models.personas import RequestPersona
from ..models.policies import PolicySet
from ..rules import check_token_ids
from ..runners import PolicyRunner
from ..runners.scoring import ScoreResult, chunk_indices

Scorer = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], ScoreResult]


class ScoreJob:
    """One ``score`` call cut into chunks; ``run_one`` does the next chunk."""

    def __init__(
        self,
        scorer: Scorer,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> None:
        self.scorer = scorer
        self.prompts = prompts
        self.completions = completions
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        self.pending = deque(chunk_indices(lengths, chunk_tokens))
        self.parts: list[ScoreResult] = []
        self.future: concurrent.futures.Future[ScoreResult] = concurrent.futures.Future()
        if not self.pending:  # nothing to score
            self.future.set_result(scorer([], []))

    def run_one(self) -> bool:
        """Score the next chunk; True once the job is over (result, error or abandoned)."""
        if self.future.done():
            return True
        try:
            idx = self.pending.popleft()
            self.parts.append(
                self.scorer([self.prompts[i] for i in idx], [self.completions[i] for i in idx])
            )
            if not self.pending:
                self.future.set_result(ScoreResult.concat(self.parts))
                return True
        except BaseException as exc:  # delivered to the caller, not the loop
            self.future.set_exception(exc)
            return True
        return False

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class CallJob:
    """A single call run on the engine thread between decode steps (prompt log-probs)."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run_one(self) -> bool:
        if not self.future.done():
            try:
                self.future.set_result(self.call())
            except BaseException as exc:  # delivered to the caller, not the loop
                self.future.set_exception(exc)
        return True

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def score_job(
    runner: PolicyRunner,
    policy_set: PolicySet,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    chunk_tokens: int,
) -> ScoreJob:
    """``Engine.score``'s job, its inputs checked (InvalidParameter names the bad one)."""
    if len(prompts) != len(completions):
        raise InvalidParameter("completions", "prompts and completions must have the same length")
    for name, seqs in (("prompts", prompts), ("completions", completions)):
        for s in seqs:
            check_token_ids(s, policy_set.vocab_size, name)

    def scorer(p: Sequence[Sequence[int]], c: Sequence[Sequence[int]]) -> ScoreResult:
        return runner.score(p, c, chunk_tokens)

    return ScoreJob(scorer, prompts, completions, chunk_tokens)


def prompt_logprobs_job(
    runner: PolicyRunner,
    policy_set: PolicySet,
    prompt_ids: Sequence[int],
    mixture: Mixture,
    top_n: int,
    personas: Sequence[RequestPersona] = (),
) -> CallJob:
    """``Engine.prompt_logprobs``'s job, its prompt checked (``personas``: the ids of the
    mixture's own personas)."""
    vocab = policy_set.vocab_size
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise InvalidParameter("prompt", "a prompt token id is outside the vocabulary")
    return CallJob(
        lambda: prompt_logprobs(runner, policy_set, prompt_ids, mixture, top_n, personas)
    )
