"""The decoding engine: one thread owns the models and runs continuous batching.

Each step (``_step``):
1. admit waiting requests up to ``max_running`` and drop cancelled ones;
2. the policy runner (``runners``) decodes the running rows' newest tokens and prefills
   the newcomers, returning each row's log-probs under each model it needs;
3. mix the log-probs per row with that row's ``Mixture`` (``mixing``);
4. sample per row with that row's parameters and generator (``sampling``);
5. emit a ``TokenEvent`` per row (``events``) and retire finished rows. The reply's text
   and stop strings are not made here: each stream's reader does that as it is read.

Scoring (teacher-forced log-probs for fitting) runs on the same thread in chunks between
decode steps (``score_jobs``), so a fit never holds up serving for more than one chunk.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch

from ..config import SpeculativeConfig
from ..decoding import acceptance
from ..decoding.acceptance import Draft
from ..decoding.grammar import Grammar, GrammarCompiler, GrammarSpec, advance, constrain
from ..decoding.mixing import Mixture, WeightsInput, mix_logprobs
from ..decoding.prompt_logprobs import PromptLogprobs, prompt_logprobs
from ..decoding.sampling import sample_tokens
from ..decoding.speculator import Speculator, make_speculator
from ..errors import EngineNotRunning, GenerationFailed, InvalidParameter, Overloaded
from ..models.kv_budget import kv_budget_for
from ..models.policies import PolicySet
from ..rules import check_token_ids
from ..runners import PolicyRunner, SpeculativeRunner, context_limit, make_runner
from ..runners.scoring import ScoreResult
from .events import EventBuilder, final_event
from .jobs import CallJob, ScoreJob
from .requests import EngineLimits, GenerationRequest, SequenceState, prepare
from .streams import GenerationResult, RequestStream

__all__ = ["Engine", "EngineLimits", "EngineStats", "GenerationRequest"]

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    running: int
    waiting: int
    steps: int
    generated_tokens: int


class EngineObserver(Protocol):
    def on_step(self, batch_size: int, forward_seconds: dict[str, float]) -> None: ...


class Engine:
    """Holds a PolicySet and decodes mixtures for many concurrent requests."""

    def __init__(
        self,
        policy_set: PolicySet,
        limits: EngineLimits | None = None,
        observer: EngineObserver | None = None,
        runner: PolicyRunner | None = None,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        self.policy_set = policy_set
        self.limits = limits or EngineLimits()
        self.observer = observer
        self._watchers: tuple[EngineObserver, ...] = ()  # added by watch(); a tuple: swapped whole
        max_context = min(self.limits.max_context or policy_set.max_context, policy_set.max_context)
        self.runner: PolicyRunner
        self.kv_budget = kv_budget_for(
            policy_set, self.limits.kv_cache_bytes, self.limits.kv_cache_fraction, growing=True
        )
        if runner is None:
            self.runner, self.max_context = make_runner(
                policy_set, self.limits.max_running, max_context, self.kv_budget
            )
        else:
            self.runner, self.max_context = runner, context_limit(runner, max_context)
        # Static caches are preallocated within the budget: nothing to admit by memory.
        self.kv_budget.growing = getattr(self.runner, "max_context", None) is None
        logger.info(
            "%s; a request holds at most %d tokens", self.kv_budget.describe(), self.max_context
        )
        self.events = EventBuilder(policy_set, self.max_context)
        self.grammars = GrammarCompiler(
            policy_set.tokenizer, policy_set.vocab_size, policy_set.eos_token_ids
        )
        # Speculative decoding (None: off): the policy set's settings unless overridden;
        # a runner without ``verify`` does not speculate.
        self.speculator: Speculator | None = None
        self._verifier: SpeculativeRunner | None = None
        if hasattr(self.runner, "verify"):
            self._verifier = cast(SpeculativeRunner, self.runner)
            self.speculator = make_speculator(policy_set, speculative)
        self._lock = threading.Condition()
        self._waiting: deque[SequenceState] = deque()
        self._running: dict[int, SequenceState] = {}
        # Admitted by ``_admit`` and being prefilled: neither waiting nor running yet, but
        # holding slots (counted by ``submit``, cancelled by ``cancel_all``).
        self._admitted: list[SequenceState] = []
        self._jobs: deque[ScoreJob | CallJob] = deque()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self._failure: BaseException | None = None
        self._steps = 0
        self._generated_tokens = 0

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
                len(self._running) + len(self._admitted),
                len(self._waiting),
                self._steps,
                self._generated_tokens,
            )

    def mixture(self, weights: WeightsInput = None, strength: object = 1.0) -> Mixture:
        """A mixture of this engine's policies (InvalidParameter names what is wrong)."""
        return Mixture.build(self.policy_names, weights, strength, has_reference=self.has_reference)

    def watch(self, observer: EngineObserver) -> Callable[[], None]:
        """Also report every step to ``observer`` (an app's metrics), until the call returned.

        Several apps may serve one engine in turn (tests do); each watches while it runs.
        """
        self._watchers = (*self._watchers, observer)

        def unwatch() -> None:
            self._watchers = tuple(w for w in self._watchers if w is not observer)

        return unwatch

    def is_special(self, token: int) -> bool:
        return self.events.is_special(token)

    def token_text(self, token: int) -> str:
        return self.events.token_text(token)

    def token_bytes(self, token: int) -> bytes:
        """The token's exact bytes from the tokenizer's byte mapping (``token_bytes``)."""
        return self.events.bytes_of(token)

    def compile_grammar(self, spec: GrammarSpec) -> Grammar:
        """Check a grammar against the tokenizer (any thread; InvalidParameter names
        ``spec.param``); pass it in ``GenerationRequest.grammar``."""
        return self.grammars.compile(spec)

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
            self._lock.wait_for(
                lambda: not (self._running or self._waiting or self._jobs) or not self.is_alive,
                timeout=timeout,
            )
            for seq in [*self._waiting, *self._admitted, *self._running.values()]:
                seq.stream.cancelled = True
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def cancel_all(self) -> int:
        """Cancel every waiting and running sequence (each stream's last event is then
        ``cancelled``) and keep running; the number cancelled. A drain's last step."""
        with self._lock:
            pending = [*self._waiting, *self._admitted, *self._running.values()]
            for seq in pending:
                seq.stream.cancelled = True
            self._lock.notify_all()
        return len(pending)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests --------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its events arrive on the returned stream."""
        seq = prepare(
            request,
            self.policy_set,
            self.limits,
            self.max_context,
            next(self._ids),
            self._wake,
            self.events.token_texts,
            self.kv_budget,
        )
        with self._lock:
            if not self._accepting or self._failure is not None:
                raise EngineNotRunning(
                    "the engine is not running (not started, stopping or failed)"
                )
            # Every sequence held counts once, wherever it is (waiting, being admitted or
            # running), so exactly max_running + max_queued are ever held.
            running = len(self._running) + len(self._admitted)
            if running + len(self._waiting) >= self.limits.max_running + self.limits.max_queued:
                raise Overloaded(
                    f"{running} sequences are running and {len(self._waiting)} are "
                    f"queued (limits {self.limits.max_running} + {self.limits.max_queued}); "
                    "retry later",
                    retry_after=self.limits.retry_after_s,
                )
            self._waiting.append(seq)
            self._lock.notify_all()
        return seq.stream

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Blocking convenience: submit and collect every event."""
        stream = self.submit(request)
        events = list(stream)
        return GenerationResult(
            token_ids=[e.token_id for e in events],
            text="".join(e.text for e in events),
            finish_reason=events[-1].finish_reason or "length",
            seed=stream.seed,
            weights=stream.weights,
            prompt_tokens=stream.prompt_tokens,
            events=events,
        )

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
                check_token_ids(s, self.policy_set.vocab_size, name)
        chunk = self.limits.score_chunk_tokens

        def scorer(p: Sequence[Sequence[int]], c: Sequence[Sequence[int]]) -> ScoreResult:
            return self.runner.score(p, c, chunk)

        if self._thread is None or threading.current_thread() is self._thread:
            return scorer(prompts, completions)
        job = ScoreJob(scorer, prompts, completions, chunk)
        with self._lock:
            if not self._accepting:
                raise EngineNotRunning("the engine is not running")
            self._jobs.append(job)
            self._lock.notify_all()
        return job.future.result()

    def prompt_logprobs(
        self, prompt_ids: Sequence[int], mixture: Mixture, top_n: int = 0
    ) -> concurrent.futures.Future[PromptLogprobs]:
        """Each prompt token's log-prob under ``mixture`` (the first: None), computed on the
        engine thread between decode steps; the future holds the result."""
        vocab = self.policy_set.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InvalidParameter("prompt", "a prompt token id is outside the vocabulary")
        job = CallJob(lambda: prompt_logprobs(self.policy_set, prompt_ids, mixture, top_n))
        if self._thread is None or threading.current_thread() is self._thread:
            job.run_one()
            return job.future
        with self._lock:
            if not self._accepting:
                raise EngineNotRunning("the engine is not running")
            self._jobs.append(job)
            self._lock.notify_all()
        return job.future

    # -- the loop --------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._waiting or self._running or self._jobs or self._stopping):
                        self._lock.notify_all()  # idle: a stop() waiting for the drain sees it
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

    def _abort_running(self, newcomers: list[SequenceState], exc: Exception) -> None:
        """After a failed step the caches may be inconsistent: drop every running row."""
        with self._lock:
            failed = {s.sid: s for s in [*self._running.values(), *newcomers]}
            self._running.clear()
            self._admitted = []
        self.runner.keep(set())
        if self.speculator is not None:
            self.speculator.keep(set())
        for seq in failed.values():
            seq.stream.push(GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"))

    def _admit(self) -> list[SequenceState]:
        """Move waiting requests into free slots (lock held)."""
        for seq in [s for s in self._waiting if s.stream.cancelled]:
            self._waiting.remove(seq)
            seq.stream.push(final_event(seq, "cancelled"))
        newcomers: list[SequenceState] = []
        while self._waiting and len(self._running) + len(newcomers) < self.limits.max_running:
            # In arrival order: the head waits until its worst-case KV cache fits (kv_budget).
            rows = [*self._running.values(), *newcomers, self._waiting[0]]
            if not self.kv_budget.fits([(s.coefs, s.worst_case_tokens) for s in rows]):
                break
            newcomers.append(self._waiting.popleft())
        self._admitted = newcomers
        return newcomers

    def _run_one_job(self) -> None:
        if self._jobs and self._jobs[0].run_one():
            with self._lock:
                self._jobs.popleft()
                self._lock.notify_all()

    def _fail_all(self, failure: BaseException | None) -> None:
        with self._lock:
            self._accepting = False
            pending = [*self._waiting, *self._admitted, *self._running.values()]
            jobs = list(self._jobs)
            self._waiting.clear()
            self._running.clear()
            self._admitted = []
            self._jobs.clear()
            self._lock.notify_all()
        for seq in pending:
            if failure is None:
                seq.stream.push(final_event(seq, "cancelled"))
            else:
                seq.stream.push(EngineNotRunning(f"the engine failed: {failure!r}"))
        for job in jobs:
            job.fail(EngineNotRunning("the engine stopped before the scoring finished"))

    def _mix(self, logprobs: torch.Tensor, active: Sequence[SequenceState]) -> torch.Tensor:
        """Each row's mixture of its models' log-probs: [M, B, V] -> [B, V]."""
        coefs = torch.tensor([s.coefs for s in active], device=logprobs.device)  # [B, K + 1]
        k = len(self.policy_names)
        return mix_logprobs(
            logprobs[:k],
            coefs[:, :k],
            logprobs[k] if self.has_reference else None,
            coefs[:, k] if self.has_reference else None,
        )  # [B, V]

    def _step(self, newcomers: list[SequenceState]) -> None:
        cancelled = [s for s in self._running.values() if s.stream.cancelled]
        self._retire(cancelled)
        for seq in cancelled:
            seq.stream.push(final_event(seq, "cancelled"))
        running = list(self._running.values())
        if not running and not newcomers:
            return
        # A grammar's mask is formed for one position per step: a step with a grammar row
        # in it decodes plainly (docs/speculative.md).
        if self.speculator is not None and not any(
            s.grammar is not None for s in (*running, *newcomers)
        ):
            drafts = self.speculator.drafts(running, self.max_context)
            if drafts:
                self._speculative_step(running, newcomers, drafts)
                return
        output = self.runner.step(running, newcomers)
        with self._lock:
            self._running.update((seq.sid, seq) for seq in newcomers)
            self._admitted = []
        active = running + newcomers
        logprobs = output.logprobs  # [M, B, V]
        mixed = self._mix(logprobs, active)  # [B, V]
        allowed = constrain(mixed, [s.grammar for s in active])  # [B, V] grammar rows masked
        broken = ~torch.isfinite(allowed.logsumexp(dim=-1))  # [B] NaN, or no token possible
        if bool(broken.any()):
            active, (mixed, allowed), logprobs = self._drop_broken(
                active, (mixed, allowed), logprobs, broken
            )
            if not active:
                return
        tokens = sample_tokens(
            allowed,
            [s.sampling for s in active],
            [s.generator for s in active],
            [s.token_ids for s in active],
        )  # [B]
        advance([s.grammar for s in active], tokens)
        finished = self._emit(active, mixed, logprobs, tokens)
        self._retire(finished)
        self._steps += 1
        for observer in (self.observer, *self._watchers):
            if observer is not None:
                observer.on_step(len(active), output.forward_seconds)

    def _emit(
        self,
        active: list[SequenceState],
        mixed: torch.Tensor,  # [B, V]
        logprobs: torch.Tensor,  # [M, B, V]
        tokens: torch.Tensor,  # [B]
    ) -> list[SequenceState]:
        """Push one token's event per row; return the rows it finished."""
        events = self.events.step_events(active, mixed, logprobs, tokens)
        self._generated_tokens += len(events)
        finished = []
        for seq, event in zip(active, events):
            seq.stream.push(event)
            if event.finish_reason is not None:
                finished.append(seq)
        return finished

    def _speculative_step(
        self,
        running: list[SequenceState],
        newcomers: list[SequenceState],
        drafts: dict[int, Draft],
    ) -> None:
        """Verify the running rows' drafts in one forward per model, keep what the
        mixture accepts (``speculative``), roll the rest back, emit a token event per
        kept token. Newcomers are prefilled in the same step and sample one token."""
        assert self.speculator is not None and self._verifier is not None
        output = self._verifier.verify(
            running, {sid: d.tokens for sid, d in drafts.items()}, newcomers
        )
        with self._lock:
            self._running.update((seq.sid, seq) for seq in newcomers)
            self._admitted = []
        active = running + newcomers
        logprobs = output.logprobs  # [M, B, G, V]
        models, rows, width, vocab = logprobs.shape
        mixed = self._mix(
            logprobs.reshape(models, rows * width, vocab),
            [seq for seq in active for _ in range(width)],
        ).view(rows, width, vocab)  # [B, G, V]
        finite = torch.isfinite(mixed.logsumexp(dim=-1)).tolist()  # [B][G]
        emitted = acceptance.verify_rows(
            mixed, active, [drafts.get(s.sid, Draft([])) for s in active], finite
        )  # per row: the kept drafts, then one sampled token
        self._verifier.rollback({seq.sid: len(emitted[b]) for b, seq in enumerate(running)})
        for b, seq in enumerate(active):
            if seq.sid in drafts and finite[b][0]:
                self.speculator.record(seq, len(drafts[seq.sid].tokens), len(emitted[b]) - 1)
        broken = [not row[0] for row in finite]
        if any(broken):
            first = mixed[:, 0]  # [B, V]
            self._drop_broken(active, (first, first), logprobs[:, :, 0], torch.tensor(broken))
            emitted = [[] if bad else tokens for tokens, bad in zip(emitted, broken)]
        self._retire(self._emit_runs(active, emitted, mixed, logprobs))
        self._steps += 1
        for observer in (self.observer, *self._watchers):
            if observer is not None:
                observer.on_step(len(active), output.forward_seconds)

    def _emit_runs(
        self,
        active: list[SequenceState],
        emitted: list[list[int]],  # per row: its tokens of this step, in order
        mixed: torch.Tensor,  # [B, G, V]
        logprobs: torch.Tensor,  # [M, B, G, V]
    ) -> list[SequenceState]:
        """Position by position, one event per emitted token; a row that a token finishes
        (stop, EOS, limit) emits nothing after it. Returns the finished rows."""
        finished: list[SequenceState] = []
        done: set[int] = set()
        for j in range(mixed.shape[1]):
            live = [
                b for b, seq in enumerate(active) if len(emitted[b]) > j and seq.sid not in done
            ]
            if not live:
                break
            index = torch.tensor(live, device=mixed.device)
            tokens = torch.tensor([emitted[b][j] for b in live], device=mixed.device)
            ended = self._emit(
                [active[b] for b in live], mixed[index, j], logprobs[:, index, j], tokens
            )
            finished += ended
            done.update(seq.sid for seq in ended)
        return finished

    def _drop_broken(
        self,
        active: list[SequenceState],
        rows: tuple[torch.Tensor, torch.Tensor],  # [B, V] each: mixed, grammar-masked
        logprobs: torch.Tensor,  # [M, B, V]
        broken: torch.Tensor,  # [B] bool
    ) -> tuple[list[SequenceState], tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Fail the rows with no finite token to sample; return the others."""
        flags = broken.tolist()
        failed = [seq for seq, bad in zip(active, flags) if bad]
        self._retire(failed)
        for seq in failed:
            seq.stream.push(GenerationFailed(_broken_reason(seq)))
        keep = (~broken).nonzero().squeeze(-1)  # [B']
        survivors = [seq for seq, bad in zip(active, flags) if not bad]
        return survivors, (rows[0][keep], rows[1][keep]), logprobs[:, keep]

    def _retire(self, seqs: list[SequenceState]) -> None:
        """Free the rows of ``seqs`` in the runner."""
        if not seqs:
            return
        with self._lock:
            for seq in seqs:
                self._running.pop(seq.sid, None)
            keep = set(self._running)
        self.runner.keep(keep)
        if self.speculator is not None:
            self.speculator.keep(keep)


def _broken_reason(seq: SequenceState) -> str:
    if seq.grammar is not None and seq.grammar.error:
        return f"the grammar refused the reply: {seq.grammar.error}"
    if seq.grammar is not None:
        return "the grammar allows no token the mixture gives a finite log-probability"
    return (
        "the mixture's log-probabilities are not finite (weights "
        f"{seq.stream.weights}, strength {seq.stream.strength})"
    )
