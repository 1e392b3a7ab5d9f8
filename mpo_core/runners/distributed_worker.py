"""A worker rank: load its shard, report to rank 0, join the group, serve rank 0's calls.

Started by rank 0 (``mpo serve`` spawns ``python -m mpo_core.runners.distributed_worker``
per rank above 0, with the family in a file), or by torchrun / a manifest (``mpo serve``
with ``RANK`` > 0 calls ``run_worker``). Each call rank 0 broadcasts (a step's plan,
scoring, prompt log-probs, a ping, stop) runs on the shard's own one-process runner, and
its answer goes back: a step's log-probs as one tensor to rank 0, anything else through
a gather. docs/distributed.md.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import signal
import sys
import threading
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import PolicySetConfig, load_config, parse_config
from ..errors import ConfigError
from ..models.kv_budget import KVBudget, kv_budget_for
from ..models.policies import PolicySet
from .base import PolicyRunner
from .distributed_world import (
    CONFIG_ENV,
    UNUSED,
    Shard,
    WireRow,
    World,
    WorldSettings,
    budget_part,
    comm_device,
    control_group,
    open_store,
    score_columns,
    shard_of,
    shard_report,
)
from .factory import capabilities_of, load_policy_set, make_runner

logger = logging.getLogger(__name__)


def _worker_config() -> PolicySetConfig:
    path = os.environ.get(CONFIG_ENV)
    if path:
        return parse_config(json.loads(Path(path).read_text()))
    config_path = os.environ.get("MPO_CONFIG")
    if not config_path:
        raise ConfigError(f"a worker rank needs the family: set {CONFIG_ENV} or MPO_CONFIG")
    return load_config(config_path)


def run_worker(config: PolicySetConfig) -> int:
    """A worker rank's whole life: load its shard, report, join, serve calls until rank 0
    says stop (0) or is lost (1)."""
    settings = WorldSettings.from_env(config)
    rank = settings.rank
    _outlive_signals(rank)
    store = open_store(settings)
    shard = shard_of(config, rank)
    try:
        if shard is None:
            raise ConfigError(f"rank {rank} hosts no member of the family")
        policy_set = load_policy_set(shard.config)
        report = shard_report(shard, policy_set)
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}"
        logger.error("rank %d failed to load its members: %s", rank, message)
        store.set(settings.key("error", rank), message)
        store.set(settings.key("done", rank), "1")
        return 2
    store.set(settings.key("report", rank), base64.b64encode(pickle.dumps(report)).decode())
    store.set(settings.key("done", rank), "1")
    store.wait([settings.key("go", 0)], timedelta(seconds=settings.start_timeout_s))
    if store.get(settings.key("go", 0)) == b"abort":
        logger.error("rank %d: rank 0 did not start (its own error says why)", rank)
        return 2
    comm = comm_device(settings, policy_set)
    dist.init_process_group(
        settings.transport,
        store=dist.PrefixStore(settings.prefix, store),
        rank=rank,
        world_size=settings.world_size,
        timeout=timedelta(seconds=settings.step_timeout_s),
    )
    control = control_group(settings)
    world = World(settings, shard, {rank: shard}, {}, control, comm)
    try:
        return worker_loop(world, policy_set)
    except Exception:
        logger.error("rank %d lost rank 0: %s", rank, traceback.format_exc(limit=3))
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _outlive_signals(rank: int) -> None:
    """A worker ignores SIGTERM and SIGINT: torchrun, a pod's deletion or a Ctrl-C send
    them to every rank at once, and rank 0 must drain its requests (every rank still
    serving) before it tells the workers to stop. A worker ends on rank 0's "stop", on
    rank 0's loss, or on SIGKILL."""

    def note(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        logger.info("rank %d: %s: serving until rank 0 has drained and says stop", rank, name)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, note)
        signal.signal(signal.SIGINT, note)


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("MPO_LOG_LEVEL", "INFO").upper(),
        format=f"%(levelname)s rank{os.environ.get('RANK', '?')} %(name)s: %(message)s",
    )
    try:
        config = _worker_config()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_worker(config)


def worker_loop(world: World, policy_set: PolicySet) -> int:
    """Serve rank 0's calls on this rank's shard until it says stop."""
    shard = world.shard
    assert shard is not None
    rank = world.settings.rank
    runner: PolicyRunner | None = None
    budget: KVBudget | None = None
    rows: dict[int, WireRow] = {}
    logger.info("rank %d serving %s", rank, shard.config.policy_names)
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=world.control)
        message = box[0]
        op = message["op"]
        if op == "stop":
            logger.info("rank %d: stop", rank)
            return 0
        if op == "verify":
            assert runner is not None
            _worker_step(world, shard, runner, rows, message)
            continue
        try:
            if runner is not None:
                apply_pending(shard, runner, rows, message["pending"])
            if op == "ping":
                answer: Any = "pong"
            elif op == "budget":
                shared = capabilities_of(policy_set).shared_forward
                budget = kv_budget_for(
                    policy_set, message["budget_bytes"], message["fraction"], True, shared
                )
                answer = budget_part(budget)
            elif op == "setup":
                runner, _ = make_runner(
                    policy_set, message["max_rows"], message["max_context"], budget
                )
                answer = (runner.max_context, getattr(runner, "max_rows", None))
            elif op == "score":
                assert runner is not None
                result = runner.score(
                    message["prompts"], message["completions"], message["chunk_tokens"]
                )
                answer = score_columns(shard, result)
            elif op == "prompt_positions":
                assert runner is not None
                wanted = message["wanted"].get(rank, [])
                positions = runner.prompt_positions(message["tokens"], wanted) if wanted else {}
                answer = {j: t.cpu() for j, t in positions.items()}
            else:
                raise ValueError(f"unknown call {op!r}")
            reply: tuple[str, Any] = ("ok", answer)
        except Exception as exc:
            logger.exception("rank %d: %r failed", rank, op)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        dist.gather_object(reply, None, dst=0, group=world.control)


def apply_pending(
    shard: Shard, runner: PolicyRunner, rows: dict[int, WireRow], pending: list[tuple[str, Any]]
) -> None:
    """What rank 0 did to its rows since the last call, in its order: rollbacks after a
    verify, rows dropped, prompt chunks run ahead of a row's joining."""
    for kind, value in pending:
        if kind == "rollback":
            runner.rollback(value)
        elif kind == "keep":
            runner.keep(value)
            for sid in [sid for sid in rows if sid not in value]:
                del rows[sid]
        elif kind == "prefill_chunk":
            chunk_rows, ends = value
            wire = [
                WireRow(sid, list(tokens), shard.local_coefs(c)) for sid, tokens, c in chunk_rows
            ]
            runner.prefill_chunk(wire, ends)
        else:
            raise ValueError(f"unknown pending call {kind!r}")


def _worker_step(
    world: World,
    shard: Shard,
    runner: PolicyRunner,
    rows: dict[int, WireRow],
    message: dict[str, Any],
) -> None:
    """Run one step's plan on this rank's models and send the log-probs to rank 0."""
    device = world.comm_device
    try:
        apply_pending(shard, runner, rows, message["pending"])
        running = []
        for sid, gained in message["running"]:
            row = rows[sid]
            row.token_ids.extend(gained)
            running.append(row)
        newcomers = []
        for sid, tokens, coefs in message["newcomers"]:
            rows[sid] = WireRow(sid, list(tokens), shard.local_coefs(coefs))
            newcomers.append(rows[sid])
        out = runner.verify(running, message["drafts"], newcomers).logprobs  # [M_r, B, G, V]
        used = [j for j, g in enumerate(shard.members) if g != UNUSED]
        payload = out[used].to(device=device, dtype=torch.float32).contiguous()
        header = torch.tensor([0, *payload.shape], dtype=torch.long, device=device)
    except Exception as exc:
        logger.exception("rank %d: the step failed", world.settings.rank)
        text = f"{type(exc).__name__}: {exc}".encode()[:4000]
        payload = torch.tensor(list(text), dtype=torch.uint8, device=device)
        header = torch.tensor([1, len(text), 0, 0, 0], dtype=torch.long, device=device)
    dist.send(header, dst=0)
    dist.send(payload, dst=0)


if __name__ == "__main__":
    sys.exit(main())
