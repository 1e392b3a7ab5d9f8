"""Policy parallelism: a family's members on several processes, one exchange per step.

Members are independent until their log-probs meet, so a family spreads over ranks
(processes, each on its own GPU or host) with one round trip a step: rank 0 broadcasts the
step's plan (each running row's new tokens and drafts, the newcomers' prompts and
coefficients, the rows to roll back or drop), every rank runs its own members on the plan
with its local backend, and sends its members' log-probs ``[M_r, B, G, V]`` back to rank 0,
which mixes, samples, and emits as for a one-process family. Rank 0 runs the engine and
the HTTP server and may host members itself.

``DistributedRunner`` is rank 0's runner: it meets the ``PolicyRunner`` contract by
forwarding each call to the ranks (``worker_loop`` on each worker) and assembling their
answers in the family's model order, so the engine, speculation, prompt log-probs and
scoring run unchanged. Calls and small answers travel as pickled objects over a gloo
group; a step's log-probs as one float32 tensor per rank over the data group (NCCL on
GPUs, else the same gloo group). Rows' tokens are sent once: a running row's plan carries
only the tokens it gained since the last step.

A rank that does not answer within ``distributed.step_timeout_s``, or whose connection
breaks, ends the group: the call raises ``BackendLost``, the engine fails what is in
flight and stops, and ``/health`` turns unhealthy so that an orchestrator restarts the
group. While idle, rank 0 pings the ranks every ``distributed.heartbeat_s``.
docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from ..config import PolicySetConfig
from ..errors import BackendLost, ConfigError
from ..models.kv_budget import KVBudget, kv_budget_for
from ..models.personas import RequestPersona
from ..models.policies import LoadedModel, PolicySet, load_tokenizer, resolve_device
from .base import Capabilities, PolicyRunner, Row, RunnerBase, StepOutput, StepRows
from .distributed_world import (
    UNUSED,
    Shard,
    World,
    budget_part,
    score_columns,
    shard_of,
    start_world,
    stop_workers,
)
from .scoring import ScoreResult

logger = logging.getLogger(__name__)

KIND = "distributed"


@dataclass
class RemoteMember:
    """A member that runs on another rank, in its place in rank 0's ``PolicySet``."""

    rank: int
    parameter_count: int  # what speculation compares draft sizes with


@dataclass
class _View:
    """Rank 0's own shard's view of an engine row (its coefficients for the shard)."""

    row: Row
    coefs: tuple[float, ...]

    @property
    def sid(self) -> int:
        return self.row.sid

    @property
    def token_ids(self) -> list[int]:
        return cast(list[int], self.row.token_ids)

    @property
    def request_personas(self) -> tuple[RequestPersona, ...]:
        return ()  # this backend declares no request_personas


@dataclass(frozen=True)
class LocalBackends:
    """What a rank runs its shard with: the one-process backends' loader and capabilities.
    ``runners.factory`` hands them over when it registers this backend (it imports this
    module; this module does not import it)."""

    load: Callable[[PolicySetConfig], PolicySet]
    capabilities_of: Callable[[PolicySet], Capabilities]


def local_backends() -> LocalBackends:
    handed = DistributedRunner.local_backends
    if handed is None:
        raise ConfigError("the distributed backend is used before runners.factory registered it")
    return handed


@dataclass
class Traffic:
    """What the ranks exchanged: calls, and the step's log-prob tensors received."""

    steps: int = 0
    received_bytes: int = 0
    exchange_seconds: float = 0.0  # rank 0 waiting for the ranks' step answers
    last_step_bytes: int = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "received_bytes": self.received_bytes,
            "exchange_seconds": round(self.exchange_seconds, 6),
            "last_step_bytes": self.last_step_bytes,
        }


@dataclass
class Cluster:
    """Rank 0's side of the group: its world, its own shard, the lock every call holds."""

    world: World
    config: PolicySetConfig
    local: PolicySet | None  # rank 0's own shard, loaded
    lock: threading.Lock = field(default_factory=threading.Lock)
    failure: str | None = None
    traffic: Traffic = field(default_factory=Traffic)
    pending: list[tuple[str, Any]] = field(default_factory=list)  # rollbacks, keeps
    last_call: float = field(default_factory=time.monotonic)

    @property
    def workers(self) -> list[int]:
        return list(range(1, self.world.settings.world_size))

    def check(self) -> None:
        """Raise BackendLost if the group is gone (or a spawned worker has exited)."""
        if self.poll_workers() is not None:
            raise BackendLost(self.failure or "")

    def poll_workers(self) -> str | None:
        """Why the group is lost (a spawned worker that exited counts), else None."""
        if self.failure is None:
            for rank, process in enumerate(self.world.workers, start=1):
                if process.poll() is not None:
                    self.lose(f"rank {rank} exited with code {process.returncode}")
        return self.failure

    def lose(self, reason: str) -> None:
        """The group is broken: remember why, end the workers this rank spawned."""
        if self.failure is None:
            self.failure = reason
            logger.error("the distributed group is lost: %s", reason)
            for process in self.world.workers:
                if process.poll() is None:
                    process.kill()

    def broadcast(self, message: dict[str, Any]) -> None:
        """Send a call to every worker, with the rollbacks and drops queued since the last."""
        message["pending"], self.pending = self.pending, []
        self.last_call = time.monotonic()
        try:
            dist.broadcast_object_list([message], src=0, group=self.world.control)
        except Exception as exc:
            self.lose(f"sending {message['op']!r} to the workers failed: {exc}")
            raise BackendLost(self.failure or str(exc)) from exc

    def gather(self, op: str) -> dict[int, Any]:
        """Every worker's answer to the call just broadcast (a worker's error re-raised)."""
        answers: list[Any] = [None] * self.world.settings.world_size
        try:
            dist.gather_object(None, answers, dst=0, group=self.world.control)
        except Exception as exc:
            self.lose(f"a worker did not answer {op!r}: {exc}")
            raise BackendLost(self.failure or str(exc)) from exc
        out = {}
        for rank in self.workers:
            status, value = answers[rank]
            if status != "ok":
                raise RuntimeError(f"rank {rank}: {value}")
            out[rank] = value
        return out

    def call(self, op: str, local: Callable[[], Any] | None = None, **args: Any) -> dict[int, Any]:
        """Run ``op`` on every worker (and ``local`` here meanwhile): answers by rank (0:
        what ``local`` returned)."""
        with self.lock:
            self.check()
            self.broadcast({"op": op, **args})
            mine = local() if local is not None else None
            answers = self.gather(op)
        answers[0] = mine
        return answers

    def owners(self) -> dict[int, tuple[int, int]]:
        """Global model index -> (rank, index among that rank's models)."""
        owners = {}
        for rank, shard in self.world.shards.items():
            for j, g in enumerate(shard.members):
                if g != UNUSED:
                    owners[g] = (rank, j)
        return owners


class RankedBudget(KVBudget):
    """Each rank's KV budget over its own models, read as one: a set of rows fits when it
    fits every rank's budget (each rank's memory is its own)."""

    def __init__(self, parts: list[tuple[int, KVBudget, list[int]]], models: int) -> None:
        self.parts = parts  # (rank, its budget over its models, global index per model)
        token_bytes = [0] * models
        for _, budget, members in parts:
            for j, g in enumerate(members):
                if g != UNUSED:
                    token_bytes[g] = budget.model_token_bytes[j]
        smallest = min(budget.budget_bytes for _, budget, _ in parts)
        super().__init__(smallest, token_bytes, [[g] for g in range(models)], True)

    @property  # type: ignore[override]
    def growing(self) -> bool:
        return all(budget.growing for _, budget, _ in self.parts)

    @growing.setter
    def growing(self, value: bool) -> None:
        for _, budget, _ in getattr(self, "parts", []):
            budget.growing = value

    @staticmethod
    def _local(
        rows: Sequence[tuple[Sequence[float], int]], members: list[int]
    ) -> list[tuple[Sequence[float], int]]:
        return [([c[g] if g != UNUSED else 0.0 for g in members], n) for c, n in rows]

    def fits(self, rows: Sequence[tuple[Sequence[float], int]]) -> bool:
        return all(b.fits(self._local(rows, m)) for _, b, m in self.parts)

    def worst_case(self, rows: Sequence[tuple[Sequence[float], int]]) -> int:
        """The tightest rank's worst case, scaled to ``budget_bytes`` (the smallest rank's
        budget), so that ``worst_case > budget_bytes`` exactly when some rank is full."""
        ratio = max(
            b.worst_case(self._local(rows, m)) / max(1, b.budget_bytes) for _, b, m in self.parts
        )
        return int(ratio * self.budget_bytes)

    def static_len(self, slots: int, context: int) -> int:
        return min(b.static_len(slots, context) for _, b, _ in self.parts)

    def describe(self) -> str:
        return "; ".join(f"rank {rank}: {b.describe()}" for rank, b, _ in self.parts)


class DistributedRunner(RunnerBase):
    """Rank 0's runner for a family placed over ranks: every call goes to every rank."""

    kind: ClassVar[str] = KIND
    local_backends: ClassVar[LocalBackends | None] = None  # set by runners.factory

    def __init__(
        self,
        policy_set: PolicySet,
        max_rows: int,
        max_context: int,
        budget: KVBudget | None = None,
        make_local: Callable[..., tuple[PolicyRunner, int]] | None = None,
    ) -> None:
        self.policy_set = policy_set
        self.capabilities = self.capabilities_of(policy_set)
        self.cluster = cluster_of(policy_set)
        cluster, world = self.cluster, self.cluster.world
        parts = budget.parts if isinstance(budget, RankedBudget) else []
        own = next((b for rank, b, _ in parts if rank == 0), None)
        self.local: PolicyRunner | None = None
        if cluster.local is not None:
            assert make_local is not None
            self.local, _ = make_local(cluster.local, max_rows, max_context, own)
        answers = cluster.call("setup", max_rows=max_rows, max_context=max_context)
        if self.local is not None:
            answers[0] = (self.local.max_context, getattr(self.local, "max_rows", None))
        limits = [a[0] for a in answers.values() if a is not None and a[0] is not None]
        self.max_context: int | None = min(limits) if limits else None
        rows = [a[1] for a in answers.values() if a is not None and a[1] is not None]
        self.max_rows: int | None = min(rows) if rows else None  # a rank's own cap
        self.shard: Shard | None = world.shard
        self.owners = cluster.owners()
        self.names = [*policy_set.names, *([policy_set.reference_name or ""])]
        self.models = len(policy_set.policies) + (policy_set.reference is not None)
        self._sent: dict[int, int] = {}  # sid -> tokens the workers have of it
        self._heartbeat = threading.Thread(target=self._beat, name="mpo-heartbeat", daemon=True)
        self._closed = threading.Event()
        self._heartbeat.start()

    # -- the class-level half (``base.Backend``) -----------------------------------------
    @staticmethod
    def claims(config: PolicySetConfig) -> bool:
        return len(config.ranks) > 1

    @staticmethod
    def load(config: PolicySetConfig) -> PolicySet:
        return load_distributed(config)

    @staticmethod
    def capabilities_of(policy_set: PolicySet) -> Capabilities:
        # Each rank's answers are gathered per call; a soup needs every member's weights in
        # one process, and the reward fit's moments every member's whole distribution.
        return Capabilities(
            shared_forward=False, reference_alone=False, token_moments=False, soups=False
        )

    @staticmethod
    def soup(policy_set: PolicySet, weights: Sequence[float]) -> PreTrainedModel:
        raise ConfigError("soups need every member in one process; this family spans ranks")

    @staticmethod
    def kv_budget(
        policy_set: PolicySet, budget_bytes: int | None, fraction: float, shared: bool
    ) -> KVBudget:
        """Each rank's budget over its own models, from its own memory."""
        cluster = cluster_of(policy_set)
        local = cluster.local

        def mine() -> tuple[int, list[int], list[list[int]], bool] | None:
            if local is None:
                return None
            shared_here = local_backends().capabilities_of(local).shared_forward
            return budget_part(kv_budget_for(local, budget_bytes, fraction, True, shared_here))

        answers = cluster.call("budget", mine, budget_bytes=budget_bytes, fraction=fraction)
        parts = []
        for rank, part in sorted(answers.items()):
            if part is not None:
                total, per_model, groups, growing = part
                members = cluster.world.shards[rank].members
                parts.append((rank, KVBudget(total, per_model, groups, growing), members))
        models = len(policy_set.policies) + (policy_set.reference is not None)
        return RankedBudget(parts, models)

    # -- decoding --------------------------------------------------------------------------
    def _local_rows(self, rows: Sequence[Row]) -> list[_View]:
        assert self.shard is not None
        return [_View(row, self.shard.local_coefs(row.coefs)) for row in rows]

    def verify(
        self,
        running: Sequence[Row],
        drafts: Mapping[int, Sequence[int]],
        newcomers: Sequence[Row],
    ) -> StepOutput:
        cluster, ps = self.cluster, self.policy_set
        plan = {
            "op": "verify",
            "running": [(s.sid, list(s.token_ids[self._sent[s.sid] :])) for s in running],
            "drafts": {sid: list(d) for sid, d in drafts.items() if d},
            "newcomers": [(s.sid, list(s.token_ids), list(s.coefs)) for s in newcomers],
        }
        with cluster.lock:
            cluster.check()
            cluster.broadcast(plan)
            for s in (*running, *newcomers):
                self._sent[s.sid] = len(s.token_ids)
            forward_seconds: dict[str, float] = {}
            parts: list[tuple[list[int], torch.Tensor]] = []
            if self.local is not None and self.shard is not None:
                try:
                    out = self.local.verify(
                        self._local_rows(running), drafts, self._local_rows(newcomers)
                    )
                except Exception:  # the workers' answers are on their way: read them, so
                    self._receive_step()  # the next step does not read this one's
                    raise
                forward_seconds.update(out.forward_seconds)
                used = [j for j, g in enumerate(self.shard.members) if g != UNUSED]
                parts.append(([self.shard.members[j] for j in used], out.logprobs[used]))
            waited = time.perf_counter()
            received = self._receive_step()
            exchange = time.perf_counter() - waited
        rows = StepRows(running, newcomers)
        batch, width = rows.count, rows.width(drafts)
        logprobs = torch.zeros((self.models, batch, width, ps.vocab_size), device=ps.device)
        for rank, tensor in received.items():
            members = [g for g in self.cluster.world.shards[rank].members if g != UNUSED]
            parts.append((members, tensor))
            for g in members:
                forward_seconds[self.names[g]] = exchange
        for members, tensor in parts:
            if tensor.shape[1:] != logprobs.shape[1:]:
                raise RuntimeError(
                    f"a rank answered {tuple(tensor.shape)} for {tuple(logprobs.shape)}"
                )
            logprobs[members] = tensor.to(ps.device, non_blocking=True)
        traffic = cluster.traffic
        traffic.steps += 1
        traffic.last_step_bytes = sum(t.numel() * t.element_size() for t in received.values())
        traffic.received_bytes += traffic.last_step_bytes
        traffic.exchange_seconds += exchange
        return StepOutput(logprobs, forward_seconds)

    def _receive_step(self) -> dict[int, torch.Tensor]:
        """Each worker's step answer: a header [status, dims...] then its log-probs (or the
        text of its error)."""
        cluster, world = self.cluster, self.cluster.world
        headers = {
            r: torch.zeros(5, dtype=torch.long, device=world.comm_device) for r in cluster.workers
        }
        try:
            works = {r: dist.irecv(headers[r], src=r) for r in cluster.workers}
            out = {}
            for rank in cluster.workers:
                _wait(works[rank], world)
                status, a, b, c, d = (int(x) for x in headers[rank].tolist())
                if status != 0:
                    text = torch.empty(a, dtype=torch.uint8, device=world.comm_device)
                    _wait(dist.irecv(text, src=rank), world)
                    message = bytes(text.cpu().tolist()).decode(errors="replace")
                    raise _WorkerError(f"rank {rank}: {message}")
                tensor = torch.empty((a, b, c, d), dtype=torch.float32, device=world.comm_device)
                _wait(dist.irecv(tensor, src=rank), world)
                out[rank] = tensor
        except _WorkerError as exc:  # the group is consistent again only after a restart
            cluster.lose(str(exc))
            raise BackendLost(str(exc)) from None
        except Exception as exc:
            cluster.lose(f"a worker did not send its step: {exc}")
            raise BackendLost(cluster.failure or str(exc)) from exc
        return out

    def rollback(self, kept: Mapping[int, int]) -> None:
        with self.cluster.lock:
            if self.local is not None:
                self.local.rollback(kept)
            self.cluster.pending.append(("rollback", dict(kept)))

    def prefill_chunk(self, rows: Sequence[Row], ends: Sequence[int]) -> None:
        """Run on rank 0's models now; the workers run it with their next call, before it
        (the rows join a later step's ``verify`` as newcomers)."""
        with self.cluster.lock:
            if self.local is not None:
                self.local.prefill_chunk(self._local_rows(rows), ends)
            wire = [(s.sid, list(s.token_ids), list(s.coefs)) for s in rows]
            self.cluster.pending.append(("prefill_chunk", (wire, list(ends))))

    def keep(self, sids: set[int]) -> None:
        with self.cluster.lock:
            if self.local is not None:
                self.local.keep(sids)
            self.cluster.pending.append(("keep", set(sids)))
            self._sent = {sid: n for sid, n in self._sent.items() if sid in sids}

    # -- scoring -----------------------------------------------------------------------------
    def score(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        chunk_tokens: int,
    ) -> ScoreResult:
        prompts, completions = [list(p) for p in prompts], [list(c) for c in completions]

        def mine() -> dict[int, torch.Tensor]:
            if self.local is None or self.shard is None:
                return {}
            return score_columns(self.shard, self.local.score(prompts, completions, chunk_tokens))

        answers = self.cluster.call(
            "score", mine, prompts=prompts, completions=completions, chunk_tokens=chunk_tokens
        )
        columns: dict[int, torch.Tensor] = {}
        for part in answers.values():
            columns.update(part or {})
        k = len(self.policy_set.policies)
        policy = torch.stack([columns[g] for g in range(k)], dim=1) if k else torch.zeros(0)
        reference = columns.get(k) if self.policy_set.reference is not None else None
        return ScoreResult(policy, reference)

    def prompt_positions(
        self,
        tokens: Sequence[int],
        models: Sequence[int],
        personas: Sequence[RequestPersona] = (),
    ) -> dict[int, torch.Tensor]:
        assert not personas, "this backend runs no request personas"
        wanted: dict[int, list[int]] = {}
        for g in models:
            rank, j = self.owners[g]
            wanted.setdefault(rank, []).append(j)
        tokens = list(tokens)

        def mine() -> dict[int, torch.Tensor]:
            if self.local is None or 0 not in wanted:
                return {}
            return self.local.prompt_positions(tokens, wanted[0])

        answers = self.cluster.call("prompt_positions", mine, tokens=tokens, wanted=wanted)
        out = {}
        for rank, part in answers.items():
            members = self.cluster.world.shards[rank].members
            for j, tensor in (part or {}).items():
                out[members[j]] = tensor.to(self.policy_set.device)
        return out

    # -- health and the end ------------------------------------------------------------------
    def failure(self) -> str | None:
        return self.cluster.poll_workers()

    def _beat(self) -> None:
        """While idle, ping the workers (a lost or hung one is noticed within a step's
        timeout); a worker waits for calls no longer than that either."""
        interval = self.cluster.config.distributed.heartbeat_s
        while not self._closed.wait(interval):
            cluster = self.cluster
            if cluster.failure is not None:
                return
            if time.monotonic() - cluster.last_call < interval:
                continue
            if not cluster.lock.acquire(blocking=False):
                continue  # a call is under way: that is a heartbeat too
            try:
                cluster.check()
                cluster.broadcast({"op": "ping"})
                cluster.gather("ping")
            except Exception:  # noqa: BLE001 - cluster.lose recorded why
                return
            finally:
                cluster.lock.release()

    def close(self) -> None:
        """Stop the workers (a "stop" call, then wait for the spawned processes)."""
        self._closed.set()
        cluster = self.cluster
        with cluster.lock:
            if cluster.failure is None:
                with contextlib.suppress(BackendLost):
                    cluster.broadcast({"op": "stop"})
                cluster.failure = "the distributed group was stopped"
            stop_workers(cluster.world.workers)
            if dist.is_initialized():
                dist.destroy_process_group()
        if self.local is not None:
            self.local.close()

    def describe(self) -> dict[str, Any]:
        world = self.cluster.world
        names = [*self.policy_set.names, self.policy_set.reference_name]
        ranks = []
        for rank, shard in sorted(world.shards.items()):
            report = world.reports.get(rank, {})
            places = report.get("places", {})
            ranks.append(
                {
                    "rank": rank,
                    "host": report.get("host"),
                    "pid": report.get("pid"),
                    "members": {names[g]: places.get(g) for g in shard.members if g != UNUSED},
                }
            )
        return {
            "backend": KIND,
            "transport": world.settings.transport,
            "ranks": ranks,
            "traffic": self.cluster.traffic.as_dict(),
            **({"failure": self.cluster.failure} if self.cluster.failure else {}),
        }


class _WorkerError(Exception):
    pass


def _wait(work: Any, world: World) -> None:
    """Wait for a receive, at most a step's timeout (gloo; NCCL has its own watchdog)."""
    if world.settings.transport == "gloo":
        if work.wait(world.timeout) is False:
            raise TimeoutError(
                f"no answer within {world.settings.step_timeout_s:g} s (distributed.step_timeout_s)"
            )
    else:
        work.wait()


def cluster_of(policy_set: PolicySet) -> Cluster:
    cluster = policy_set.backend_state
    if not isinstance(cluster, Cluster):
        raise ConfigError("this policy set was not loaded by the distributed backend")
    return cluster


# -- loading (rank 0) ---------------------------------------------------------------------
def load_distributed(config: PolicySetConfig) -> PolicySet:
    """Rank 0: load its own shard, bring up the workers, and stand a ``PolicySet`` for the
    whole family (the workers' members as ``RemoteMember`` entries)."""
    shard = shard_of(config, 0)
    local = local_backends().load(shard.config) if shard is not None else None
    if local is not None:
        tokenizer = local.tokenizer
    else:
        first = config.persona_host or config.base or config.model_policies[0]
        tokenizer = load_tokenizer(first, "policy")
    world = start_world(config, local, shard, tokenizer)
    reports = world.reports
    cluster = Cluster(world, config, local)
    k = len(config.policies)
    host = config.reference or config.base

    def member(g: int, name: str) -> LoadedModel:
        if shard is not None and g in shard.members:
            assert local is not None
            models = [*local.policies, *([local.reference] if local.reference else [])]
            return models[shard.members.index(g)]
        rank = config.reference_rank if g == k else config.policies[g].rank
        count = reports[rank]["parameters"].get(g, 0)
        return LoadedModel(name, cast(PreTrainedModel, RemoteMember(rank, count)), "", False)

    policies = [member(g, spec.name) for g, spec in enumerate(config.policies)]
    reference = member(k, host.name) if host is not None else None
    if local is not None:
        device, dtype, kv_dtype = local.device, local.dtype, local.kv_dtype
        eos = local.eos_token_ids
    else:
        device = resolve_device(config.mixing_device or config.device, "mixing_device")
        dtype, kv_dtype = torch.float32, torch.float32
        eos = reports[1]["eos_token_ids"]
    contexts = [r["max_context"] for r in reports.values() if "max_context" in r]
    if local is not None:
        contexts.append(local.max_context)
    return PolicySet(
        config=config,
        policies=policies,
        reference=reference,
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        device=device,
        dtype=dtype,
        kv_dtype=kv_dtype,
        max_context=min(contexts),
        eos_token_ids=eos,
        backend=KIND,
        backend_state=cluster,
    )
