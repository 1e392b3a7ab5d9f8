"""The decoding engine: one thread owns the models and runs continuous batching.

Each step (``_step``, the only one):
1. admit waiting requests up to ``max_running`` and drop cancelled ones, and plan the
   step's prompt tokens (``scheduler``): long prompts run a chunk into their caches
   (``runner.prefill_chunk``), and the newcomers, whose prompts finish, join the batch;
2. the speculator may draft tokens for the running rows (``decoding.speculator``);
3. the policy runner (``runners``) runs the running rows' newest token and their drafts
   and prefills the newcomers, returning each row's log-probs under each model it needs
   at each position ([M, B, G, V]; G = 1 without drafts);
4. mix the log-probs per row with that row's ``Mixture`` (``decoding.mixing``);
5. choose the tokens: sample per row with its parameters, grammar and generator
   (``decoding.sampling``), or, with drafts, keep what the acceptance rule accepts and
   roll the rest back (``decoding.acceptance``);
6. emit a ``TokenEvent`` per token (``events``) and retire finished rows. The reply's text
   and stop strings are not made here: each stream's reader does that as it is read.

Scoring (teacher-forced log-probs for fitting) runs on the same thread in chunks between
decode steps (``jobs``), so a fit never holds up serving for more than one chunk.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..config import SpeculativeConfig
from ..decoding.acceptance import Draft
from ..decoding.choose import accept_rows, sample_rows
from ..decoding.grammar import Grammar, GrammarCompiler, GrammarSpec
from ..decoding.mixing import DEFAULT_PLAUSIBILITY, Mixture, WeightsInput, mix_step
from ..decoding.prompt_logprobs import PromptLogprobs
from ..decoding.speculator import Speculator, make_speculator
from ..errors import BackendLost, EngineNotRunning, GenerationFailed
from ..models.policies import PolicySet
from ..runners import PolicyRunner, open_runner
from ..runners.scoring import ScoreResult
from .events import EventBuilder, broken_reason, emit_runs, final_event
from .jobs import CallJob, ScoreJob, prompt_logprobs_job, score_job
from .personas import EnginePersonas, persona_slots
from .requests import EngineLimits, GenerationRequest, SequenceState, prepare
from .scheduler import EngineStats, PrefillPlan, Scheduler
from .streams import GenerationResult, RequestStream

__all__ = ["Engine", "EngineLimits", "EngineStats", "GenerationRequest"]

logger = logging.getLogger(__name__)


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
        slots = persona_slots(self.limits)  # a request's own personas
        opened = open_runner(policy_set, self.limits, max_context, runner, slots)
        self.runner: PolicyRunner = opened.runner
        self.max_context, self.kv_budget = opened.max_context, opened.kv_budget
        if opened.max_running != self.limits.max_running:  # fewer rows than asked for
            self.limits = dataclasses.replace(self.limits, max_running=opened.max_running)
        capabilities = self.runner.capabilities
        self.events = EventBuilder(policy_set, self.max_context)
        self.own_personas = EnginePersonas(policy_set, self.runner, self.limits)
        self.grammars = GrammarCompiler(
            policy_set.tokenizer, policy_set.vocab_size, policy_set.eos_token_ids
        )
        # Speculative decoding (None: off): the policy set's settings unless overridden.
        try:
            self.speculator: Speculator | None = make_speculator(
                policy_set, speculative, shared_forward=capabilities.shared_forward
            )
        except BaseException:
            self.runner.close()  # a backend's workers do not outlive an engine never made
            raise
        self._lock = threading.Condition()
        self._queue = Scheduler(self.limits, self.kv_budget)  # guarded by the lock
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
        alive = self._thread is not None and self._thread.is_alive() and self._failure is None
        return alive and self.runner.failure() is None  # a backend's workers may be lost

    @property
    def capabilities(self) -> Any:
        """What the backend can do (``runners.Capabilities``)."""
        return self.runner.capabilities

    def stats(self) -> EngineStats:
        with self._lock:
            return self._queue.stats(self._steps, self._generated_tokens)

    def mixture(
        self,
        weights: WeightsInput = None,
        strength: object = 1.0,
        plausibility: object = DEFAULT_PLAUSIBILITY,
        personas: object = None,
    ) -> Mixture:
        """A mixture of this engine's policies and, on a runner that has them, the
        request's own ``personas`` (InvalidParameter names what is wrong)."""
        names, reference, own = self.policy_names, self.has_reference, self.own_personas
        return Mixture.build(
            names, weights, strength, has_reference=reference, plausibility=plausibility,
            personas=personas, persona_limit=own.limit, reserved=own.reserved,
        )  # fmt: skip

    def watch(self, observer: EngineObserver) -> Callable[[], None]:
        """Also report every step to ``observer`` (an app's metrics), until the call returned.

        Several apps may serve one engine in turn (tests do); each watches while it runs.
        """
        self._watchers = (*self._watchers, observer)

        def unwatch() -> None:
            self._watchers = tuple(w for w in self._watchers if w is not observer)

        return unwatch

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
                lambda: not (self._queue.busy() or self._jobs) or not self.is_alive,
                timeout=timeout,
            )
            self._queue.cancel_held()
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.runner.close()  # a backend's workers, if it has any

    def wait_until_idle(self, timeout: float) -> bool:
        """Block until no request is held and no job queued (cancelled requests leave at
        the engine's next turn); False if ``timeout`` s passed first."""
        with self._lock:
            return self._lock.wait_for(
                lambda: not (self._queue.busy() or self._jobs),
                timeout=timeout,
            )

    def cancel_all(self) -> int:
        """Cancel every waiting and running sequence (each stream's last event is then
        ``cancelled``) and keep running; the number cancelled. A drain's last step."""
        with self._lock:
            cancelled = self._queue.cancel_held()
            self._lock.notify_all()
        return cancelled

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests --------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its events arrive on the returned stream."""
        texts, rules = self.events.token_texts, self.own_personas.rules
        seq = prepare(request, self.policy_set, self.limits, self.max_context, next(self._ids),
                      self._wake, texts, self.kv_budget, rules)  # fmt: skip
        with self._lock:
            if not self._accepting or self._failure is not None:
                raise EngineNotRunning(
                    "the engine is not running (not started, stopping or failed)"
                )
            self._queue.enqueue(seq)  # or Overloaded: max_running + max_queued are held
            self._lock.notify_all()
        return seq.stream

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Blocking convenience: submit and collect every event."""
        return GenerationResult.collect(self.submit(request))

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
        chunk = self.limits.score_chunk_tokens
        job = score_job(self.runner, self.policy_set, prompts, completions, chunk)
        self._run_job(job)
        return job.future.result()

    def prompt_logprobs(
        self, prompt_ids: Sequence[int], mixture: Mixture, top_n: int = 0
    ) -> concurrent.futures.Future[PromptLogprobs]:
        """Each prompt token's log-prob under ``mixture`` (the first: None), computed on the
        engine thread between decode steps; the future holds the result."""
        own = self.own_personas.of(mixture)
        job = prompt_logprobs_job(self.runner, self.policy_set, prompt_ids, mixture, top_n, own)
        self._run_job(job)
        return job.future

    def _run_job(self, job: ScoreJob | CallJob) -> None:
        """Run ``job`` now on the engine's thread (or before it starts), else queue it."""
        if self._thread is None or threading.current_thread() is self._thread:
            while not job.run_one():
                pass
            return
        with self._lock:
            if not self._accepting:
                raise EngineNotRunning("the engine is not running")
            self._jobs.append(job)
            self._lock.notify_all()

    # -- the loop --------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not (self._queue.busy() or self._jobs or self._stopping):
                        self._lock.notify_all()  # idle: a stop() waiting for the drain sees it
                        self._lock.wait()
                    if self._stopping:
                        break
                    dropped = self._queue.drop_cancelled_waiting()
                    plan = self._queue.admit()
                    holding = self._queue.holding()
                if dropped:  # some may have been partly prefilled: free their rows first
                    self.runner.keep(holding)
                    for seq in dropped:
                        seq.stream.push(final_event(seq, "cancelled"))
                if self._queue.running or plan:
                    try:
                        self._step(plan)
                    except BackendLost:  # the backend cannot go on: the engine stops
                        raise
                    except Exception as exc:  # fail this step's requests; keep serving
                        logger.exception("decoding step failed; failing its requests")
                        self._abort_running(exc)
                self._run_one_job()
        except BaseException as exc:  # report to every caller instead of hanging them
            logger.exception("engine loop failed")
            self._failure = exc
        finally:
            self._fail_all(self._failure)

    def _abort_running(self, exc: Exception) -> None:
        """After a failed step the caches may be inconsistent: drop every running row and
        every prefill under way."""
        with self._lock:
            failed = self._queue.take_running()
        self.runner.keep(set())
        if self.speculator is not None:
            self.speculator.keep(set())
        for seq in failed:
            seq.stream.push(GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"))

    def _run_one_job(self) -> None:
        if self._jobs and self._jobs[0].run_one():
            with self._lock:
                self._jobs.popleft()
                self._lock.notify_all()

    def _fail_all(self, failure: BaseException | None) -> None:
        with self._lock:
            self._accepting = False
            pending = self._queue.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
            self._lock.notify_all()
        for seq in pending:
            if failure is None:
                seq.stream.push(final_event(seq, "cancelled"))
            else:
                seq.stream.push(EngineNotRunning(f"the engine failed: {failure!r}"))
        for job in jobs:
            job.fail(EngineNotRunning("the engine stopped before the scoring finished"))

    def _step(self, prefill: PrefillPlan) -> None:
        """One step: the chunks of prompts still being prefilled, then, for every running
        row and the newcomers, a verify of the drafts (none for a plain step), mix, choose
        the tokens, emit them."""
        newcomers = prefill.newcomers
        running = list(self._queue.running.values())
        cancelled = [s for s in running if s.stream.cancelled]
        self._retire(cancelled)
        for seq in cancelled:
            seq.stream.push(final_event(seq, "cancelled"))
        if prefill.chunks:  # not sampled, nothing emitted: their caches grow
            chunks = prefill.chunks
            self.runner.prefill_chunk([seq for seq, _ in chunks], [end for _, end in chunks])
            for seq, end in chunks:
                seq.prefilled = end
        running = list(self._queue.running.values())
        if not running and not newcomers:
            return
        speculator = self.speculator  # sid -> Draft below; {} for a plain step
        drafts = speculator.drafts(running, self.max_context, newcomers) if speculator else {}
        output = self.runner.verify(
            running, {sid: d.tokens for sid, d in drafts.items()}, newcomers
        )
        with self._lock:
            self._queue.start(newcomers)
        active = running + newcomers
        logprobs = output.logprobs  # [M, B, G, V]
        mixed = mix_step(logprobs, [s.mixture for s in active], self.has_reference)  # [B, G, V]
        if drafts:
            plans = [drafts.get(s.sid, Draft([])) for s in active]
            emitted, usable = accept_rows(active, plans, mixed)
            self.runner.rollback({seq.sid: len(emitted[b]) for b, seq in enumerate(running)})
            assert self.speculator is not None
            for seq, tokens, plan, ok in zip(active, emitted, plans, usable):
                if seq.sid in drafts and ok:
                    self.speculator.record(seq, len(plan.tokens), len(tokens) - 1)
        else:
            emitted, usable = sample_rows(active, mixed[:, 0])
        self._fail([seq for seq, ok in zip(active, usable) if not ok])
        finished, pushed = emit_runs(self.events, active, emitted, mixed, logprobs)
        self._generated_tokens += pushed
        self._retire(finished)
        self._steps += 1
        for observer in (self.observer, *self._watchers):
            if observer is not None:
                observer.on_step(len(active), output.forward_seconds)

    def _fail(self, seqs: list[SequenceState]) -> None:
        """Fail the rows with no finite token to choose (a NaN mixture, a grammar that
        allows nothing the mixture gives a finite log-probability)."""
        self._retire(seqs)
        for seq in seqs:
            seq.stream.push(GenerationFailed(broken_reason(seq)))

    def _retire(self, seqs: list[SequenceState]) -> None:
        """Free the rows of ``seqs`` in the runner."""
        if not seqs:
            return
        with self._lock:
            keep = self._queue.retire(seqs)
        self.runner.keep(keep)
        if self.speculator is not None:
            self.speculator.keep(keep)
