"""Who waits and who runs: the engine's queue and its admission rule.

A request is held from ``submit`` until it finishes, in exactly one place: waiting (in
arrival order), admitted (taken for this step's prefill) or running. At most
``max_running + max_queued`` are held; past that a submit is refused (``Overloaded``,
a 429 with Retry-After). Each step admits waiting requests in arrival order while a row
is free and the head's worst-case KV cache fits the budget (``models.kv_budget``): the
head waits rather than be overtaken, so a long request is not starved by short ones.

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


class Scheduler:
    """The waiting queue, the rows being admitted and the running rows, by sid."""

    def __init__(self, limits: EngineLimits, kv_budget: KVBudget) -> None:
        self.limits = limits
        self.kv_budget = kv_budget
        self.waiting: deque[SequenceState] = deque()
        self.running: dict[int, SequenceState] = {}
        # Admitted and being prefilled this step: neither waiting nor running yet, but
        # holding rows (counted by ``enqueue``, cancelled with the rest).
        self.admitted: list[SequenceState] = []

    def held(self) -> list[SequenceState]:
        """Every request held, wherever it is."""
        return [*self.waiting, *self.admitted, *self.running.values()]

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

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
        """Take the cancelled requests out of the queue; the caller ends their streams."""
        cancelled = [s for s in self.waiting if s.stream.cancelled]
        for seq in cancelled:
            self.waiting.remove(seq)
        return cancelled

    def admit(self) -> list[SequenceState]:
        """Move waiting requests into free rows, in arrival order: the newcomers."""
        newcomers: list[SequenceState] = []
        while self.waiting and len(self.running) + len(newcomers) < self.limits.max_running:
            rows = [*self.running.values(), *newcomers, self.waiting[0]]
            if not self.kv_budget.fits([(s.coefs, s.worst_case_tokens) for s in rows]):
                break
            newcomers.append(self.waiting.popleft())
        self.admitted = newcomers
        return newcomers

    def start(self, newcomers: list[SequenceState]) -> None:
        """The newcomers were prefilled: they are running."""
        self.running.update((seq.sid, seq) for seq in newcomers)
        self.admitted = []

    def retire(self, seqs: list[SequenceState]) -> set[int]:
        """Forget ``seqs``; the sids still running."""
        for seq in seqs:
            self.running.pop(seq.sid, None)
        return set(self.running)

    def cancel_held(self) -> int:
        """Mark every request held as cancelled (each leaves at the next step); how many."""
        held = self.held()
        for seq in held:
            seq.stream.cancelled = True
        return len(held)

    def take_running(self, newcomers: list[SequenceState]) -> list[SequenceState]:
        """Forget the running rows and ``newcomers`` (a failed step): the ones taken."""
        taken = list({s.sid: s for s in [*self.running.values(), *newcomers]}.values())
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
