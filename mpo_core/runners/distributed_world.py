"""The processes of a family placed over several ranks: shards, start-up, and what rank 0
and the workers share (the rows a call carries, the answers' shapes).

Each member names the rank (process) that runs it (``rank:``, default 0). Rank r loads its
*shard*: a family of its own members only, run by the local backend that family's kind
calls for (separate models, adapters, personas, llama.cpp), with every rank number set to
0 so that it is an ordinary one-process family there. A persona or adapter family's model
is loaded on every rank that hosts a persona or adapter of it; its reference rows run on
the rank of ``reference:`` / ``base:``.

Start-up (``start_world``, on rank 0):

1. rank 0 opens the rendezvous (a ``torch.distributed.TCPStore``) and, unless torchrun
   started the ranks, spawns one worker process per other rank
   (``python -m mpo_core.runners.distributed_worker``), which reads the family from the file
   rank 0 wrote;
2. each worker loads its shard and posts a report (or its error) in the store: its
   tokenizer's fingerprint, the vocabulary, where each member landed;
3. rank 0 waits for every report (a worker that exits or never reports by
   ``start_timeout_s`` is one error line naming its rank), checks the tokenizers and the
   placements, and every rank joins the process group.

Then the workers run ``distributed_worker.worker_loop``: take the next call rank 0
broadcasts, run it on the shard's own runner, send the answer back. docs/distributed.md.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import PolicySetConfig
from ..errors import ConfigError
from ..models.kv_budget import KVBudget
from ..models.personas import RequestPersona
from ..models.policies import PolicySet
from .scoring import ScoreResult

logger = logging.getLogger(__name__)

CONFIG_ENV = "MPO_DISTRIBUTED_CONFIG"  # a spawned worker's family: a JSON file rank 0 wrote
UNUSED = -1  # a shard's model that is loaded but whose rows another rank runs


@dataclass
class Shard:
    """One rank's part of a family."""

    rank: int
    config: PolicySetConfig  # the one-process family this rank loads
    # Per local model (its policies, then its reference): the global model index (policy
    # k, or K for the reference), or UNUSED (a host whose reference rows run elsewhere).
    members: list[int]

    def local_coefs(self, coefs: Sequence[float]) -> tuple[float, ...]:
        """A row's coefficients [K + 1] as this shard's models see them."""
        return tuple(float(coefs[g]) if g != UNUSED else 0.0 for g in self.members)


def _rank0(spec: Any) -> Any:
    return None if spec is None else spec.model_copy(update={"rank": 0})


def shard_of(config: PolicySetConfig, rank: int) -> Shard | None:
    """Rank ``rank``'s shard of ``config``; None when it hosts nothing (rank 0 may not)."""
    k = len(config.policies)
    mine = [i for i, p in enumerate(config.policies) if p.rank == rank]
    host = config.reference or config.base
    owns_reference = host is not None and config.reference_rank == rank
    local: dict[str, Any] = {"distributed": config.distributed.model_copy()}
    if rank > 0:
        local["mixing_device"] = None  # a worker hands its log-probs over from its members
    if mine:
        local["policies"] = [_rank0(config.policies[i]) for i in mine]
        if config.is_persona_family or config.is_adapter_family:
            # its members need the family's model: loaded here whoever runs its rows
            local["reference"], local["base"] = _rank0(config.reference), _rank0(config.base)
            members = [*mine, k if owns_reference else UNUSED]
        else:
            local["reference"] = _rank0(config.reference) if owns_reference else None
            members = [*mine, *([k] if owns_reference else [])]
    elif owns_reference:  # the reference alone: a one-model family here
        assert host is not None
        local.update(policies=[_rank0(host)], reference=None, base=None)
        members = [k]
    else:
        return None
    return Shard(rank, config.model_copy(update=local), members)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of a tokenizer's vocabulary and special tokens: equal on every rank."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = [
        str(getattr(tokenizer, attr, None))
        for attr in ("bos_token", "eos_token", "pad_token", "unk_token")
    ]
    text = json.dumps([len(tokenizer), vocab, special], ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def member_places(shard: Shard, policy_set: PolicySet) -> dict[int, str]:
    """Where each of the shard's used models landed: global index -> device."""
    members = [*policy_set.policies, *([policy_set.reference] if policy_set.reference else [])]
    places: dict[int, str] = {}
    for g, loaded in zip(shard.members, members):
        if g == UNUSED:
            continue
        params = getattr(loaded.model, "parameters", None)
        places[g] = str(next(params()).device) if callable(params) else "llama.cpp"
    return places


def shard_report(shard: Shard, policy_set: PolicySet) -> dict[str, Any]:
    """What a rank tells rank 0 once its shard is loaded (the start-up checks read it)."""
    return {
        "rank": shard.rank,
        "pid": os.getpid(),
        "host": os.uname().nodename,
        "tokenizer": tokenizer_fingerprint(policy_set.tokenizer),
        "vocab_size": policy_set.vocab_size,
        "max_context": policy_set.max_context,
        "places": member_places(shard, policy_set),
        "parameters": member_parameters(shard, policy_set),
        "eos_token_ids": list(policy_set.eos_token_ids),
        "backend": policy_set.backend,
    }


def member_parameters(shard: Shard, policy_set: PolicySet) -> dict[int, int]:
    """Each used model's parameter count (0 where it is not a torch model)."""
    members = [*policy_set.policies, *([policy_set.reference] if policy_set.reference else [])]
    counts: dict[int, int] = {}
    for g, loaded in zip(shard.members, members):
        params = getattr(loaded.model, "parameters", None)
        if g != UNUSED:
            counts[g] = sum(p.numel() for p in params()) if callable(params) else 0
    return counts


# -- the world's settings ------------------------------------------------------------------
@dataclass
class WorldSettings:
    """Where the ranks meet and how long each wait may take."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    transport: str  # "gloo" or "nccl"
    start_timeout_s: float
    step_timeout_s: float
    torchrun: bool  # every rank was started from outside (torchrun, a manifest): none spawned
    prefix: str = "mpo"

    @classmethod
    def from_env(cls, config: PolicySetConfig) -> WorldSettings:
        """Under torchrun (RANK and WORLD_SIZE set) its values; else rank 0 of a world
        this process spawns, sized by the config's ranks."""
        settings = config.distributed
        transport = settings.backend
        if transport == "auto":
            transport = "nccl" if torch.cuda.is_available() else "gloo"
        world = len(config.ranks)
        torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if torchrun:
            given = int(os.environ["WORLD_SIZE"])
            if given != world:
                raise ConfigError(
                    f"torchrun started {given} processes but the family places members on "
                    f"{world} ranks (0 to {world - 1}): set --nnodes x --nproc-per-node to "
                    f"{world}"
                )
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=world,
            master_addr=os.environ.get("MASTER_ADDR", settings.master_addr),
            master_port=int(os.environ.get("MASTER_PORT", settings.master_port)),
            transport=transport,
            start_timeout_s=settings.start_timeout_s,
            step_timeout_s=settings.step_timeout_s,
            torchrun=torchrun,
            prefix=f"mpo/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
        )

    def key(self, what: str, rank: int) -> str:
        return f"{self.prefix}/{what}/{rank}"


@dataclass
class World:
    """This process's place in the group, once every rank has joined."""

    settings: WorldSettings
    shard: Shard | None  # this rank's (rank 0 may host nothing)
    shards: dict[int, Shard]  # every rank's, by rank
    reports: dict[int, dict[str, Any]]  # every worker's start-up report
    control: Any  # the gloo group that carries calls and small answers
    comm_device: torch.device  # where the tensors the data group carries live
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)  # spawned here
    logs: dict[int, Path] = field(default_factory=dict)  # each spawned worker's output

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.settings.step_timeout_s)


def comm_device(settings: WorldSettings, policy_set: PolicySet | None) -> torch.device:
    if settings.transport != "nccl":
        return torch.device("cpu")
    device = policy_set.device if policy_set is not None else torch.device("cuda")
    if device.type != "cuda":
        raise ConfigError(
            f"rank {settings.rank}: the NCCL transport needs the rank's members on a GPU "
            f"(they run on {device}); set distributed.backend: gloo"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def open_store(settings: WorldSettings) -> dist.TCPStore:
    # torchrun's agent holds the store its ranks meet at; started any other way (a
    # manifest setting RANK / WORLD_SIZE / MASTER_ADDR itself, or spawned here), rank 0 does.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    is_master = settings.rank == 0 and not agent_store
    return dist.TCPStore(
        settings.master_addr,
        settings.master_port,
        world_size=settings.world_size,
        is_master=is_master,
        timeout=timedelta(seconds=settings.start_timeout_s),
        wait_for_workers=False,
    )


def _spawn_workers(
    config: PolicySetConfig, settings: WorldSettings, port: int
) -> tuple[list[subprocess.Popen[bytes]], dict[int, Path]]:
    """One process per rank > 0 on this machine, each reading the family from a file."""
    folder = Path(tempfile.mkdtemp(prefix="mpo-world-"))
    family = folder / "family.json"
    family.write_text(config.model_dump_json())
    workers, logs = [], {}
    for rank in range(1, settings.world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(settings.world_size),
            "MASTER_ADDR": settings.master_addr,
            "MASTER_PORT": str(port),
            CONFIG_ENV: str(family),
            "MPO_WORKER_OF": str(os.getpid()),
        }
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        logs[rank] = folder / f"rank{rank}.log"
        with logs[rank].open("wb") as log:
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mpo_core.runners.distributed_worker"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return workers, logs


def _last_line(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _wait_for_reports(
    store: dist.TCPStore,
    settings: WorldSettings,
    workers: Sequence[subprocess.Popen[bytes]],
    logs: Mapping[int, Path],
) -> dict[int, dict[str, Any]]:
    """Every worker's report, or a ConfigError naming the first rank that failed."""
    deadline = time.monotonic() + settings.start_timeout_s
    reports: dict[int, dict[str, Any]] = {}
    pending = list(range(1, settings.world_size))
    while pending:
        rank = pending[0]
        if not _has(store, settings, "done", rank):
            process = workers[rank - 1] if len(workers) >= rank else None
            if process is not None and process.poll() is not None:
                line = _last_line(logs.get(rank))
                raise ConfigError(
                    f"rank {rank} exited with code {process.returncode} while loading its "
                    f"members: {line or 'no output'} (log: {logs.get(rank)})"
                )
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"rank {rank} never joined: no report within "
                    f"{settings.start_timeout_s:g} s (distributed.start_timeout_s); is it "
                    f"running and can it reach {settings.master_addr}:{settings.master_port}?"
                )
            time.sleep(0.1)  # workers load for seconds to minutes: a poll costs nothing
            continue
        if _has(store, settings, "error", rank):
            error = store.get(settings.key("error", rank)).decode(errors="replace")
            raise ConfigError(f"rank {rank}: {error}")
        reports[rank] = pickle.loads(base64.b64decode(store.get(settings.key("report", rank))))
        pending.pop(0)
    return reports


def _has(store: dist.TCPStore, settings: WorldSettings, what: str, rank: int) -> bool:
    return bool(store.check([settings.key(what, rank)]))


def check_reports(
    shards: Mapping[int, Shard],
    reports: Mapping[int, dict[str, Any]],
    fingerprint: str,
    vocab_size: int,
    config: PolicySetConfig,
) -> None:
    """Every rank has rank 0's tokenizer, and each member runs where its ``device:`` says."""
    host = config.reference or config.base
    names = [*config.policy_names, host.name if host is not None else "reference"]
    for rank, report in sorted(reports.items()):
        if report["tokenizer"] != fingerprint or report["vocab_size"] != vocab_size:
            raise ConfigError(
                f"rank {rank} loaded a different tokenizer (fingerprint {report['tokenizer']}, "
                f"{report['vocab_size']} tokens) from rank 0's ({fingerprint}, {vocab_size} "
                "tokens): every member must share one vocabulary"
            )
        expected = {g for g in shards[rank].members if g != UNUSED}
        if set(report["places"]) != expected:
            got = sorted(names[g] for g in report["places"])
            raise ConfigError(f"rank {rank} loaded {got}, not the members placed on it")
        for g, device in report["places"].items():
            wanted = getattr(_spec_of(config, g), "device", None) or config.device
            if not placed_as_asked(wanted, device):
                raise ConfigError(
                    f"rank {rank}: member {names[g]!r} landed on {device}, not on the "
                    f"device its config names ({wanted})"
                )


def placed_as_asked(wanted: str, device: str) -> bool:
    """Does a member on ``device`` sit where ``device: wanted`` asked?"""
    if wanted == "auto" or device == "llama.cpp" or wanted == device:
        return True
    return wanted == "cuda" and device.startswith("cuda")


def _spec_of(config: PolicySetConfig, g: int) -> Any:
    if g < len(config.policies):
        return config.policies[g]
    return config.reference or config.base


def start_world(
    config: PolicySetConfig, policy_set: PolicySet | None, shard: Shard | None, tokenizer: Any
) -> World:
    """Rank 0's side of start-up (its own shard already loaded): spawn or meet the
    workers, check their reports, join the group."""
    settings = WorldSettings.from_env(config)
    if settings.rank != 0:
        raise ConfigError(f"start_world runs on rank 0, not on rank {settings.rank}")
    store = open_store(settings)
    port = store.port
    settings.master_port = port
    workers: list[subprocess.Popen[bytes]] = []
    logs: dict[int, Path] = {}
    if not settings.torchrun:
        workers, logs = _spawn_workers(config, settings, port)
        logger.info("spawned %d worker rank(s): %s", len(workers), [w.pid for w in workers])
    try:
        reports = _wait_for_reports(store, settings, workers, logs)
        shards = {r: s for r in range(settings.world_size) if (s := shard_of(config, r))}
        check_reports(shards, reports, tokenizer_fingerprint(tokenizer), len(tokenizer), config)
        store.set(settings.key("go", 0), "1")
        comm = comm_device(settings, policy_set)
        dist.init_process_group(
            settings.transport,
            store=dist.PrefixStore(settings.prefix, store),
            rank=0,
            world_size=settings.world_size,
            timeout=timedelta(seconds=settings.step_timeout_s),
        )
        control = control_group(settings)
    except BaseException:
        with contextlib.suppress(Exception):  # the workers waiting for "go" exit now
            store.set(settings.key("go", 0), "abort")
        stop_workers(workers)
        raise
    own = {"rank": 0, "pid": os.getpid(), "host": os.uname().nodename, "places": {}}
    reports[0] = shard_report(shard, policy_set) if shard and policy_set else own
    world = World(settings, shard, shards, reports, control, comm, workers, logs)
    world.store = store  # type: ignore[attr-defined]  # kept open while the group lives
    return world


def control_group(settings: WorldSettings) -> Any:
    if settings.transport == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=settings.step_timeout_s))


def stop_workers(workers: Sequence[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """End the worker processes this rank spawned: wait ``grace_s`` for each (they exit
    after rank 0's "stop" call or its loss), then kill what is left."""
    for process in workers:
        if process.poll() is None:
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- what both sides of a call share ----------------------------------------------------
@dataclass
class WireRow:
    """A row as a rank sees it: its tokens so far and its coefficients for the rank's own
    models (the ``Row`` protocol)."""

    sid: int
    token_ids: list[int]
    coefs: tuple[float, ...]
    # A request's own personas: none here (the distributed backend declares no
    # request_personas, so such requests are refused before they reach it).
    request_personas: tuple[RequestPersona, ...] = ()


def score_columns(shard: Shard, result: ScoreResult) -> dict[int, torch.Tensor]:
    """A shard's scores as columns [N] by global model index."""
    columns = {}
    k_local = result.policy_logprobs.shape[1] if result.policy_logprobs.dim() == 2 else 0
    for j, g in enumerate(shard.members):
        if g == UNUSED:
            continue
        if j < k_local:
            columns[g] = result.policy_logprobs[:, j].cpu()
        elif result.reference_logprobs is not None:
            columns[g] = result.reference_logprobs.cpu()
    return columns


def budget_part(budget: KVBudget) -> tuple[int, list[int], list[list[int]], bool]:
    return budget.budget_bytes, budget.model_token_bytes, budget.groups, budget.growing
