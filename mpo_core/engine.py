"""The decoding engine: one thread owns the models and runs continuous batching.

Each step (``_step``):
1. admit waiting requests up to ``max_running`` and drop cancelled ones;
2. every model runs once: a decode over its running rows' newest tokens, and a prefill
   of the newcomers' prompts (a model runs only the rows where its coefficient is
   non-zero, so a one-hot request costs one forward and s = 1 never runs the reference);
3. mix the log-probs per row with that row's weights and strength (``mixing``);
4. sample per row with that row's parameters and generator (``sampling``);
5. emit a ``TokenEvent`` per row and retire finished rows from every model's batch.

Scoring (teacher-forced log-probs for fitting) runs on the same thread in chunks between
decode steps, so a fit never holds up serving for more than one chunk.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .detokenize import ReplyText
from .errors import EngineNotRunning, GenerationFailed, InvalidParameter, Overloaded
from .kvcache import KVStorage, ModelBatch
from .mixing import WeightsInput, check_strength, mix_logprobs, normalize_weights
from .policies import PolicySet
from .sampling import SamplingParams, sample_tokens
from .scoring import ScoreResult, chunk_indices, score_sequences
from .streams import GenerationResult, RequestStream, TokenEvent

logger = logging.getLogger(__name__)


@dataclass
class EngineLimits:
    max_running: int = 16  # sequences decoded together
    max_queued: int = 64  # requests waiting for a slot; beyond that submit raises Overloaded
    max_context: int | None = None  # prompt + new tokens; None = the models' own limit
    max_top_logprobs: int = 20
    score_chunk_tokens: int = 4096  # tokens per scoring chunk between decode steps


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    weights: WeightsInput = None  # {name: w} or [w, ...]; None = uniform
    strength: float = 1.0
    request_id: str | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    steps: int
    generated_tokens: int


class EngineObserver(Protocol):
    def on_step(self, batch_size: int, forward_seconds: dict[str, float]) -> None: ...


@dataclass
class _Sequence:
    """Engine-side state of one request."""

    sid: int
    request: GenerationRequest
    stream: RequestStream
    coefs: list[float]  # per model (policies, then reference): its weight in log p
    generator: torch.Generator
    token_ids: list[int]  # prompt + generated
    reply: ReplyText  # the reply's text so far, stop strings applied
    generated: list[int] = field(default_factory=list)


class Engine:
    """Holds a PolicySet and decodes mixtures for many concurrent requests."""

    def __init__(
        self,
        policy_set: PolicySet,
        limits: EngineLimits | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.policy_set = policy_set
        self.limits = limits or EngineLimits()
        self.observer = observer
        self.max_context = min(
            self.limits.max_context or policy_set.max_context, policy_set.max_context
        )
        models = [*policy_set.policies]
        if policy_set.reference is not None:
            models.append(policy_set.reference)
        storage = KVStorage(policy_set.kv_dtype)  # shared: the models run one at a time
        self._batches = [
            ModelBatch(m, policy_set.vocab_size, policy_set.device, storage) for m in models
        ]
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}
        self._jobs: deque[Callable[[], bool]] = deque()  # return True when finished
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self._failure: BaseException | None = None
        self._steps = 0
        self._generated_tokens = 0
        self._special_ids = set(policy_set.tokenizer.all_special_ids)
        self._token_texts: dict[int, str] = {}  # token id -> the token decoded alone

    # -- properties ------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.policy_set.tokenizer

    @property
    def policy_names(self) -> list[str]:
        return self.policy_set.names

    @property
    def has_reference(self) -> bool:
        return self.policy_set.reference is not None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failure is None

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                len(self._running), len(self._waiting), self._steps, self._generated_tokens
            )

    def normalize_weights(self, weights: WeightsInput) -> dict[str, float]:
        return dict(zip(self.policy_names, normalize_weights(weights, self.policy_names)))

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._accepting = True
            self._thread = threading.Thread(target=self._loop, name="mpo-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop admitting, let running requests finish for up to ``timeout`` s, cancel the rest."""
        with self._lock:
            self._accepting = False
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.is_alive:
            with self._lock:
                if not self._running and not self._waiting and not self._jobs:
                    break
            time.sleep(0.01)
        with self._lock:
            for seq in [*self._waiting, *self._running.values()]:
                seq.stream.cancelled = True
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests --------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its events arrive on the returned stream."""
        seq = self._prepare(request)
        with self._lock:
            if not self._accepting or self._failure is not None:
                raise EngineNotRunning(
                    "the engine is not running (not started, stopping or failed)"
                )
            free_slots = max(0, self.limits.max_running - len(self._running))
            if len(self._waiting) >= self.limits.max_queued + free_slots:
                raise Overloaded(
                    f"{len(self._running)} sequences are running and {len(self._waiting)} are "
                    f"queued (limit {self.limits.max_queued}); retry later",
                    retry_after=1.0,
                )
            self._waiting.append(seq)
            self._lock.notify_all()
        return seq.stream

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Blocking convenience: submit and collect every event."""
        stream = self.submit(request)
        events = list(stream)
        token_ids = [e.token_id for e in events]
        return GenerationResult(
            token_ids=token_ids,
            text="".join(e.text for e in events),
            finish_reason=events[-1].finish_reason or "length",
            seed=stream.seed,
            weights=stream.weights,
            prompt_tokens=stream.prompt_tokens,
            events=events,
        )

    def _prepare(self, request: GenerationRequest) -> _Sequence:
        ps = self.policy_set
        params = request.sampling
        params.validate(ps.vocab_size, self.limits.max_top_logprobs)
        prompt = list(request.prompt_ids)
        if not prompt:
            raise InvalidParameter("prompt", "the prompt is empty: at least one token is needed")
        bad = next(
            (t for t in prompt if not isinstance(t, int) or not 0 <= t < ps.vocab_size), None
        )
        if bad is not None:
            raise InvalidParameter(
                "prompt", f"prompt token id {bad!r} is outside [0, {ps.vocab_size})"
            )
        total = len(prompt) + params.max_new_tokens
        if total > self.max_context:
            raise InvalidParameter(
                "max_new_tokens",
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                f"= {total} "
                f"exceeds the context limit of {self.max_context} tokens",
            )
        weights = normalize_weights(request.weights, ps.names)
        strength = check_strength(request.strength, self.has_reference)
        coefs = [strength * w for w in weights]
        if self.has_reference:
            coefs.append(1.0 - strength)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=ps.device)
        generator.manual_seed(seed)
        sid = next(self._ids)
        stream = RequestStream(
            request_id=request.request_id or uuid.uuid4().hex,
            weights=dict(zip(ps.names, weights)),
            strength=strength,
            prompt_tokens=len(prompt),
            seed=seed,
            on_cancel=self._wake,
        )
        reply = ReplyText(ps.tokenizer, list(params.stop))
        return _Sequence(sid, request, stream, coefs, generator, prompt, reply)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # -- scoring ---------------------------------------------------------------------
    def score(
        self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
    ) -> ScoreResult:
        """Total log-prob of each completion given its prompt, under every model.

        Runs on the engine thread, one chunk per loop turn, interleaved with decoding.
        """
        if len(prompts) != len(completions):
            raise InvalidParameter(
                "completions", "prompts and completions must have the same length"
            )
        for name, seqs in (("prompts", prompts), ("completions", completions)):
            for s in seqs:
                if any(not 0 <= t < self.policy_set.vocab_size for t in s):
                    raise InvalidParameter(name, f"a token id in {name} is outside the vocabulary")
        if self._thread is None or threading.current_thread() is self._thread:
            return score_sequences(
                self.policy_set, prompts, completions, self.limits.score_chunk_tokens
            )
        future: concurrent.futures.Future[ScoreResult] = concurrent.futures.Future()
        parts: list[ScoreResult] = []
        chunks = chunk_indices(
            [len(p) + len(c) for p, c in zip(prompts, completions)], self.limits.score_chunk_tokens
        )
        pending = deque(chunks)

        def run_one_chunk() -> bool:
            if future.cancelled():
                return True
            try:
                idx = pending.popleft()
                parts.append(
                    score_sequences(
                        self.policy_set,
                        [prompts[i] for i in idx],
                        [completions[i] for i in idx],
                        self.limits.score_chunk_tokens,
                    )
                )
                if not pending:
                    future.set_result(ScoreResult.concat(parts))
                    return True
            except BaseException as exc:  # delivered to the caller, not the loop
                future.set_exception(exc)
                return True
            return False

        with self._lock:
            if not self._accepting:
                raise EngineNotRunning("the engine is not running")
            self._jobs.append(run_one_chunk)
            self._lock.notify_all()
        return future.result()

    # -- the loop --------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._waiting or self._running or self._jobs or self._stopping):
                        self._lock.wait()
                    if self._stopping:
                        break
                    newcomers = self._admit()
                if self._running or newcomers:
                    try:
                        self._step(newcomers)
                    except Exception as exc:  # fail this step's requests; keep serving
                        logger.exception("decoding step failed; failing its requests")
                        self._abort_running(newcomers, exc)
                self._run_one_job()
        except BaseException as exc:  # report to every caller instead of hanging them
            logger.exception("engine loop failed")
            self._failure = exc
        finally:
            self._fail_all(self._failure)

    def _abort_running(self, newcomers: list[_Sequence], exc: Exception) -> None:
        """After a failed step the caches may be inconsistent: drop every running row."""
        with self._lock:
            failed = {s.sid: s for s in [*self._running.values(), *newcomers]}
            self._running.clear()
        for batch in self._batches:
            batch.keep(set())
        for seq in failed.values():
            seq.stream.push(GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"))

    def _admit(self) -> list[_Sequence]:
        """Move waiting requests into free slots (lock held)."""
        for seq in [s for s in self._waiting if s.stream.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        newcomers: list[_Sequence] = []
        while self._waiting and len(self._running) + len(newcomers) < self.limits.max_running:
            newcomers.append(self._waiting.popleft())
        return newcomers

    def _run_one_job(self) -> None:
        if not self._jobs:
            return
        job = self._jobs[0]
        if job():
            with self._lock:
                self._jobs.popleft()

    def _fail_all(self, failure: BaseException | None) -> None:
        with self._lock:
            self._accepting = False
            pending = [*self._waiting, *self._running.values()]
            self._waiting.clear()
            self._running.clear()
        for seq in pending:
            if failure is None:
                self._finish(seq, "cancelled")
            else:
                seq.stream.push(EngineNotRunning(f"the engine failed: {failure!r}"))

    def _step(self, newcomers: list[_Sequence]) -> None:
        running = [s for s in self._running.values() if not s.stream.cancelled]
        cancelled = [s for s in self._running.values() if s.stream.cancelled]
        self._retire(cancelled)
        for seq in cancelled:
            self._finish(seq, "cancelled")
        if not running and not newcomers:
            return
        active = running + newcomers
        row_of = {seq.sid: row for row, seq in enumerate(active)}
        ps = self.policy_set
        num_models = len(self._batches)
        logprobs = torch.zeros(
            num_models, len(active), ps.vocab_size, device=ps.device
        )  # [M, B, V]
        forward_seconds: dict[str, float] = {}
        for m, batch in enumerate(self._batches):
            started = time.perf_counter()
            if len(batch):
                seqs = [self._running[sid] for sid in batch.row_ids]
                tokens = torch.tensor([s.token_ids[-1] for s in seqs], device=ps.device)  # [Bm]
                positions = torch.tensor([len(s.token_ids) - 1 for s in seqs], device=ps.device)
                rows = torch.tensor([row_of[s.sid] for s in seqs], device=ps.device)
                logprobs[m, rows] = batch.decode(tokens, positions)  # [Bm, V]
            joining = [s for s in newcomers if s.coefs[m] != 0]
            if joining:
                rows = torch.tensor([row_of[s.sid] for s in joining], device=ps.device)
                logprobs[m, rows] = batch.prefill(
                    [s.sid for s in joining], [s.token_ids for s in joining]
                )
            if len(batch):
                forward_seconds[batch.loaded.name] = time.perf_counter() - started
        with self._lock:
            self._running.update((seq.sid, seq) for seq in newcomers)
        coefs = torch.tensor([s.coefs for s in active], device=ps.device)  # [B, M]
        k = len(ps.policies)
        mixed = mix_logprobs(
            logprobs[:k],
            coefs[:, :k],
            logprobs[k] if self.has_reference else None,
            coefs[:, k] if self.has_reference else None,
        )  # [B, V]
        broken = ~torch.isfinite(mixed.logsumexp(dim=-1))  # [B] NaN, or no token possible
        if bool(broken.any()):
            active, mixed, logprobs = self._drop_broken(active, mixed, logprobs, broken)
            if not active:
                return
        tokens = sample_tokens(
            mixed,
            [s.request.sampling for s in active],
            [s.generator for s in active],
            [s.token_ids for s in active],
        )  # [B]
        self._emit(active, mixed, logprobs, tokens)
        self._steps += 1
        if self.observer is not None:
            self.observer.on_step(len(active), forward_seconds)

    def _drop_broken(
        self,
        active: list[_Sequence],
        mixed: torch.Tensor,  # [B, V]
        logprobs: torch.Tensor,  # [M, B, V]
        broken: torch.Tensor,  # [B] bool
    ) -> tuple[list[_Sequence], torch.Tensor, torch.Tensor]:
        """Fail the rows whose mixed distribution is not finite; return the others."""
        flags = broken.tolist()
        failed = [seq for seq, bad in zip(active, flags) if bad]
        self._retire(failed)
        for seq in failed:
            seq.stream.push(
                GenerationFailed(
                    "the mixture's log-probabilities are not finite (weights "
                    f"{seq.stream.weights}, strength {seq.stream.strength})"
                )
            )
        keep = (~broken).nonzero().squeeze(-1)  # [B']
        survivors = [seq for seq, bad in zip(active, flags) if not bad]
        return survivors, mixed[keep], logprobs[:, keep]

    def _emit(
        self,
        active: list[_Sequence],
        mixed: torch.Tensor,
        logprobs: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        """Build each row's event, detect finishes, retire finished rows."""
        ps = self.policy_set
        rows = torch.arange(len(active), device=mixed.device)
        chosen = mixed[rows, tokens].tolist()  # [B]
        per_model = logprobs[:, rows, tokens].t().tolist()  # [B, M]
        top_n = max(s.request.sampling.top_logprobs for s in active)
        top = mixed.topk(top_n, dim=-1) if top_n else None
        top_values = top.values.tolist() if top else []
        top_ids = top.indices.tolist() if top else []
        finished = []
        for row, (seq, token) in enumerate(zip(active, tokens.tolist())):
            params = seq.request.sampling
            seq.token_ids.append(token)
            seq.generated.append(token)
            self._generated_tokens += 1
            finish = self._finish_reason(seq, token)
            seq.reply.update(seq.generated)
            if seq.reply.find_stop():
                finish = "stop_sequence"
            text = seq.reply.take(final=finish is not None)
            n = params.top_logprobs
            event = TokenEvent(
                index=len(seq.generated) - 1,
                token_id=token,
                token_text=self.token_text(token),
                text=text,
                logprob=chosen[row],
                top_logprobs=list(zip(top_ids[row][:n], top_values[row][:n])) if n else [],
                policy_logprobs={
                    name: per_model[row][m] if seq.coefs[m] != 0 else None
                    for m, name in enumerate(ps.names)
                },
                special=self.is_special(token),
                finish_reason=finish,
            )
            seq.stream.push(event)
            if finish is not None:
                finished.append(seq)
        self._retire(finished)

    def is_special(self, token: int) -> bool:
        return token in self._special_ids

    def token_text(self, token: int) -> str:
        """The token decoded alone, cached (also used for reported alternatives)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.policy_set.tokenizer.decode([token])
        return text

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        params = seq.request.sampling
        if token in params.stop_token_ids:
            return "stop_sequence"
        if not params.ignore_eos and token in self.policy_set.eos_token_ids:
            return "eos_token"
        if len(seq.generated) >= params.max_new_tokens or len(seq.token_ids) >= self.max_context:
            return "length"
        return None

    def _retire(self, seqs: list[_Sequence]) -> None:
        """Free the slots of ``seqs`` in every model's batch (one index select per model)."""
        if not seqs:
            return
        with self._lock:
            for seq in seqs:
                self._running.pop(seq.sid, None)
            keep = set(self._running)
        for batch in self._batches:
            batch.keep(keep)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.stream.push(
            TokenEvent(
                index=len(seq.generated),
                token_id=-1,
                token_text="",
                text="",
                logprob=0.0,
                top_logprobs=[],
                policy_logprobs={},
                special=True,
                finish_reason=reason,
            )
        )
