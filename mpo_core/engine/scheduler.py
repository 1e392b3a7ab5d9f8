"""Who waits and who runs: the engine's queue and its admission rule.

A request is held from ``submit`` until it finishes, in exactly one place: waiting (in
arrival order), admitted (taken for this step's prefill) or running. At most
``max_running + max_queued`` are held; past that a submit is refused (``Overloaded``,
a 429 with Retry-After). Each step admits waiting requests in arrival order while a row
is free and the head's worst-case KV cache fits the budget (``models.kv_budget``): the
head waits rather than be overtaken, so a long request is not starved by short ones.

An admitted request's prompt is prefilled over one or more steps (chunked prefill): each
step's prompt tokens are capped by ``EngineLimits.prefill_chunk_tokens`` (``plan``), and
a request joins the running rows with its prompt's last chunk. Until then it emits
nothing, and the running rows keep decoding.

The engine holds its lock around every call; this class keeps no lock of its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..errors import Overloaded
from ..models.kv_budget import KVBudget
from .requests import EngineLimits, SequenceState


@dataclass
class EngineStats:
    running: int
    waiting: int
    steps: int
    generated_tokens: int


@dataclass
class PrefillPlan:
    """One step's prompt tokens: who joins the batch (their whole prompt, or its last
    chunk) and who runs a chunk before its last (``runner.prefill_chunk``)."""

    newcomers: list[SequenceState]
    chunks: list[tuple[SequenceState, int]]  # (request, its prompt's end after this chunk)

    def __bool__(self) -> bool:
        return bool(self.newcomers or self.chunks)


class Scheduler:
    """The waiting queue, the rows being admitted and the running rows, by sid."""

    def __init__(self, limits: EngineLimits, kv_budget: KVBudget) -> None:
        self.limits = limits
        self.kv_budget = kv_budget
        self.waiting: deque[SequenceState] = deque()
        self.running: dict[int, SequenceState] = {}
        # Admitted, their prompts being prefilled (over one step or several), in arrival
        # order: neither waiting nor running yet, but holding rows (counted by
        # ``enqueue`` and ``admit``, cancelled with the rest).
        self.admitted: list[SequenceState] = []

    def held(self) -> list[SequenceState]:
        """Every request held, wherever it is."""
        return [*self.waiting, *self.admitted, *self.running.values()]

    def busy(self) -> bool:
        return bool(self.waiting or self.admitted or self.running)

    def holding(self) -> set[int]:
        """The sids whose rows the runner keeps: running, or partly prefilled."""
        return {*self.running, *(s.sid for s in self.admitted)}

    def enqueue(self, seq: SequenceState) -> None:
        """Queue ``seq``, or raise ``Overloaded`` when max_running + max_queued are held."""
        running = len(self.running) + len(self.admitted)
        limits = self.limits
        if running + len(self.waiting) >= limits.max_running + limits.max_queued:
            raise Overloaded(
                f"{running} sequences are running and {len(self.waiting)} are "
                f"queued (limits {limits.max_running} + {limits.max_queued}); retry later",
                retry_after=limits.retry_after_s,
            )
        self.waiting.append(seq)

    def drop_cancelled_waiting(self) -> list[SequenceState]:
        """Take the cancelled requests out of the queue and out of the prefills; the
        caller ends their streams (and, for admitted ones, frees their rows)."""
        cancelled = [s for s in (*self.waiting, *self.admitted) if s.stream.cancelled]
        for seq in cancelled:
            if seq in self.admitted:
                self.admitted.remove(seq)
            else:
                self.waiting.remove(seq)
        return cancelled

    def admit(self) -> PrefillPlan:
        """Move waiting requests into free rows, in arrival order; this step's prefills."""
        while self.waiting and len(self.running) + len(self.admitted) < self.limits.max_running:
            rows = [*self.running.values(), *self.admitted, self.waiting[0]]
            if not self.kv_budget.fits([(s.coefs, s.worst_case_tokens) for s in rows]):
                break
            self.admitted.append(self.waiting.popleft())
        return self.plan()

    def plan(self) -> PrefillPlan:
        """Which admitted requests prefill how much this step: a prompt (or what is left
        of it) no longer than ``prefill_chunk_tokens`` joins whole, as before chunking,
        so a burst of short requests is not throttled; longer ones share that budget as
        chunks (0: no chunks, every prompt whole).

        The oldest long request takes the whole budget, or, while other long ones wait,
        a quarter of it, so it always advances; the rest then goes to the waiting one
        with the shortest rest, so a prompt a little over the budget joins within a
        step or two however long the prompts before it.
        """
        budget = self.limits.prefill_chunk_tokens
        rest = {s.sid: len(s.token_ids) - s.prefilled for s in self.admitted}
        if budget <= 0:
            return PrefillPlan(list(self.admitted), [])
        newcomers = [s for s in self.admitted if rest[s.sid] <= budget]
        long = [s for s in self.admitted if rest[s.sid] > budget]
        if not long:
            return PrefillPlan(newcomers, [])
        head, *others = long
        if not others:
            return PrefillPlan(newcomers, [(head, head.prefilled + budget)])
        quarter = max(1, budget // 4)
        nearest = min(others, key=lambda s: rest[s.sid])  # the first of equals: arrival order
        chunks = [(head, head.prefilled + quarter), (nearest, nearest.prefilled + budget - quarter)]
        return PrefillPlan(newcomers, chunks)

    def start(self, newcomers: list[SequenceState]) -> None:
        """The newcomers were prefilled: they are running."""
        self.running.update((seq.sid, seq) for seq in newcomers)
        joined = {seq.sid for seq in newcomers}
        self.admitted = [s for s in self.admitted if s.sid not in joined]

    def retire(self, seqs: list[SequenceState]) -> set[int]:
        """Forget ``seqs``; the sids whose rows the runner keeps (``holding``)."""
        for seq in seqs:
            self.running.pop(seq.sid, None)
        return self.holding()

    def cancel_held(self) -> int:
        """Mark every request held as cancelled (each leaves at the next step); how many."""
        held = self.held()
        for seq in held:
            seq.stream.cancelled = True
        return len(held)

    def take_running(self) -> list[SequenceState]:
        """Forget the running and admitted rows (a failed step): the ones taken."""
        taken = [*self.running.values(), *self.admitted]
        self.running.clear()
        self.admitted = []
        return taken

    def clear(self) -> list[SequenceState]:
        """Forget every request; the ones that were held."""
        pending = self.held()
        self.waiting.clear()
        self.running.clear()
        self.admitted = []
        return pending

    def stats(self, steps: int, generated_tokens: int) -> EngineStats:
        return EngineStats(
            len(self.running) + len(self.admitted), len(self.waiting), steps, generated_tokens
        )
