"""Decoding every row's replies through the engines, all rows at once, with shared seeds.

Reply j to prompt i is decoded with the seed ``sample_seed(seed, i, j)`` in every row, so
rows differ by their mixture only, never by their luck (common random numbers: the
comparison between two rows is paired). Requests are submitted interleaved, prompt by
prompt and sample by sample with every row inside, so the engine's batches mix rows and
no row waits for another to finish.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..decoding.mixing import Mixture
from ..decoding.sampling import SamplingParams
from ..engine.core import Engine, GenerationRequest
from ..engine.streams import RequestStream
from ..errors import GenerationFailed, Overloaded

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    """The sampling seed of reply ``sample`` to prompt ``prompt``: the same in every row."""
    digest = hashlib.blake2b(f"mpo-eval:{seed}:{prompt}:{sample}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1  # 63 bits: a valid engine seed


@dataclass
class DecodeJob:
    """One unique thing to decode: which engine, with which mixture."""

    key: object  # the rows that share it (``Row.key``)
    engine: Engine
    mixture: Mixture


@dataclass
class Samples:
    """A job's replies: ``[N][m]`` texts and token ids, and each reply's total log-prob."""

    texts: list[list[str]]  # [N][m]
    token_ids: list[list[list[int]]]  # [N][m] generated ids, a final EOS included
    logprobs: np.ndarray  # [N, m] sum over tokens of log p_row (temperature 1)

    @property
    def lengths(self) -> np.ndarray:  # [N, m] generated tokens
        return np.array([[len(t) for t in per_prompt] for per_prompt in self.token_ids], float)


def _collect(stream: RequestStream) -> tuple[str, list[int], float]:
    tokens: list[int] = []
    text: list[str] = []
    logprob = 0.0
    for event in stream:
        if event.finish_reason == "cancelled":
            raise GenerationFailed(f"request {stream.request_id} was cancelled by the engine")
        tokens.append(event.token_id)
        text.append(event.text)
        logprob += event.logprob
    return "".join(text).strip(), tokens, logprob


def decode_jobs(
    jobs: Sequence[DecodeJob],
    prompt_ids: Sequence[Sequence[int]],
    seeds: Sequence[Sequence[int]],  # [N][m]
    max_new_tokens: int,
    temperature: float,
    progress: Progress | None = None,
) -> dict[object, Samples]:
    """Decode every job's ``m`` replies to every prompt; returns the samples per job key."""
    num_samples = len(seeds[0])
    pending = deque(
        (job_index, i, j)
        for i in range(len(prompt_ids))
        for j in range(num_samples)
        for job_index in range(len(jobs))
    )
    total = len(pending)
    results: dict[tuple[int, int, int], tuple[str, list[int], float]] = {}
    in_flight: deque[tuple[tuple[int, int, int], RequestStream]] = deque()
    try:
        while pending or in_flight:
            while pending:  # submit until an engine's queue is full
                job_index, i, j = pending[0]
                job = jobs[job_index]
                request = GenerationRequest(
                    prompt_ids=list(prompt_ids[i]),
                    sampling=SamplingParams(
                        max_new_tokens=max_new_tokens, temperature=temperature, seed=seeds[i][j]
                    ),
                    mixture=job.mixture,
                    request_id=f"eval-{job_index}-{i}-{j}",
                )
                try:
                    stream = job.engine.submit(request)
                except Overloaded:
                    if not in_flight:
                        raise
                    break
                in_flight.append((pending.popleft(), stream))
            where, stream = in_flight.popleft()
            results[where] = _collect(stream)
            if progress is not None:
                progress("decoding", len(results) / total)
    except BaseException:
        for _, stream in in_flight:
            stream.cancel()
        raise
    samples: dict[object, Samples] = {}
    for job_index, job in enumerate(jobs):
        grid = [
            [results[(job_index, i, j)] for j in range(num_samples)] for i in range(len(prompt_ids))
        ]
        samples[job.key] = Samples(
            texts=[[text for text, _, _ in row] for row in grid],
            token_ids=[[ids for _, ids, _ in row] for row in grid],
            logprobs=np.array([[lp for _, _, lp in row] for row in grid], dtype=np.float64),
        )
    return samples


def reference_logprobs(
    engine: Engine, prompt_ids: Sequence[Sequence[int]], samples: Samples
) -> np.ndarray:
    """``log pi_ref(y | x)`` of every reply by teacher forcing: ``[N, m]``.

    Only the reference is needed, so where the backend can score it alone
    (``Capabilities.reference_alone``: K separate models, personas) it is (on the caller's
    thread, once decoding is over: scoring reads the weights and keeps no cache); other
    backends go through ``engine.score``, which scores every model.
    """
    num_prompts, num_samples = samples.logprobs.shape
    contexts = [list(prompt_ids[i]) for i in range(num_prompts) for _ in range(num_samples)]
    replies = [ids for per_prompt in samples.token_ids for ids in per_prompt]
    if engine.capabilities.reference_alone and engine.has_reference:
        chunk = engine.limits.score_chunk_tokens
        values = engine.runner.score_reference(contexts, replies, chunk)
    else:
        scores = engine.score(contexts, replies)
        assert scores.reference_logprobs is not None  # callers check engine.has_reference
        values = scores.reference_logprobs
    return values.double().numpy().reshape(num_prompts, num_samples)
