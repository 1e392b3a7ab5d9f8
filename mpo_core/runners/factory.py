"""The backends' registry: the one place that knows every backend.

``BACKENDS`` lists them; the first that ``claims`` a policy-set config loads it
(``load_policy_set``) and runs it (``make_runner``). A GGUF family runs on llama.cpp
(``LlamaCppRunner``) when its ``backend:`` and llama-cpp-python allow. An adapter family
runs on the grouped-LoRA ``AdapterRunner``, a persona family on ``PersonaRunner`` (one
model, a slot per request and persona), any other family on ``SeparateModelsRunner``;
each on growing caches or, when the config asks (the default on CUDA), on static caches
with CUDA graphs, falling back per model with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..config import PolicySetConfig
from ..errors import ConfigError
from ..models.kv_budget import KVBudget, kv_budget_for
from ..models.kvcache import GrowingBatch, KVStorage
from ..models.policies import LoadedModel, PolicySet, device_of
from ..models.static_cache import DEFAULT_MAX_CACHE_LEN, StaticBatch, static_unsupported
from .adapters import AdapterRunner
from .base import Capabilities, DecodeBatch, PolicyRunner, context_limit
from .distributed import DistributedRunner, LocalBackends
from .llama_cpp import LlamaCppRunner
from .personas import PersonaRunner
from .separate import SeparateModelsRunner

logger = logging.getLogger(__name__)

# Every backend, in the order they are asked to claim a config (the last claims the rest).
Backend = type[
    DistributedRunner | LlamaCppRunner | AdapterRunner | PersonaRunner | SeparateModelsRunner
]
BACKENDS: tuple[Backend, ...] = (
    DistributedRunner,  # members placed on ranks > 0 (each rank runs its own, by the rest)
    LlamaCppRunner,  # GGUF families, when llama.cpp can run them (``backend:``)
    PersonaRunner,
    AdapterRunner,
    SeparateModelsRunner,
)


def load_policy_set(config: PolicySetConfig) -> PolicySet:
    """Load the family ``config`` describes, by the backend that runs it."""
    backend = next(b for b in BACKENDS if b.claims(config))
    logger.info("policy set %r runs on the %s backend", config.served_name, backend.kind)
    return backend.load(config)


def backend_of(policy_set: PolicySet) -> Backend:
    """The backend that runs ``policy_set`` (the one that loaded it)."""
    for backend in BACKENDS:
        if backend.kind == policy_set.backend:
            return backend
    raise ConfigError(f"no backend runs policy sets of kind {policy_set.backend!r}")


def capabilities_of(policy_set: PolicySet) -> Capabilities:
    """What the backend of ``policy_set`` can do, before a runner is made."""
    return backend_of(policy_set).capabilities_of(policy_set)


@dataclass
class OpenedRunner:
    """A policy set's runner, ready for an engine (``open_runner``)."""

    runner: PolicyRunner
    max_context: int  # a request's most tokens: the engine's, capped by the runner's
    kv_budget: KVBudget  # what admission checks a request's worst case against
    max_running: int  # the engine's, capped by the rows the runner can run (``max_rows``)


def open_runner(
    policy_set: PolicySet,
    limits: Any,
    max_context: int,
    runner: PolicyRunner | None = None,
    request_personas: int = 0,
) -> OpenedRunner:
    """The runner of ``policy_set`` (or ``runner``, when given) with its KV budget, under
    ``limits`` (``engine.EngineLimits``): the budget from ``kv_cache_bytes`` or
    ``kv_cache_fraction``, ``max_running`` and ``max_context`` capped by the runner;
    ``request_personas``: the most personas a request may bring (``make_runner``)."""
    shared = (runner.capabilities if runner else capabilities_of(policy_set)).shared_forward
    budget = kv_budget_of(policy_set, limits.kv_cache_bytes, limits.kv_cache_fraction, shared)
    if runner is None:
        runner, max_context = make_runner(
            policy_set, limits.max_running, max_context, budget, request_personas
        )
    else:
        max_context = context_limit(runner, max_context)
    max_running = limits.max_running
    rows = getattr(runner, "max_rows", None)
    if rows is not None and rows < max_running:
        logger.warning(
            "the backend runs at most %d requests at once: max_running %d -> %d",
            rows, max_running, rows,
        )  # fmt: skip
        max_running = rows
    # Static caches are preallocated within the budget: nothing to admit by memory.
    budget.growing = getattr(runner, "max_context", None) is None
    logger.info("%s; a request holds at most %d tokens", budget.describe(), max_context)
    return OpenedRunner(runner, max_context, budget, max_running)


def kv_budget_of(
    policy_set: PolicySet, budget_bytes: int | None, fraction: float, shared_forward: bool
) -> KVBudget:
    """The KV-cache budget of ``policy_set``: its backend's own where it has one (each
    rank's memory for a family on several ranks), else ``kv_budget.kv_budget_for``."""
    own = getattr(backend_of(policy_set), "kv_budget", None)
    if own is not None:
        return own(policy_set, budget_bytes, fraction, shared_forward)  # type: ignore[no-any-return]
    return kv_budget_for(policy_set, budget_bytes, fraction, True, shared_forward)


def make_runner(
    policy_set: PolicySet,
    max_rows: int,
    max_context: int,
    budget: KVBudget | None = None,
    request_personas: int = 0,
) -> tuple[PolicyRunner, int]:
    """The backend a policy set runs on: grouped LoRA for an adapter family, one batch
    of persona slots for a persona family, K separate models otherwise; on static caches
    (CUDA-graphed on a GPU) when the config asks.

    A static cache has the config's ``max_cache_len`` columns per slot, else as many as
    ``budget`` gives ``max_rows`` requests over every model, up to ``max_context``
    (without a budget: at most DEFAULT_MAX_CACHE_LEN). Returns the runner and the context
    limit settled with it: ``max_context``, capped by the columns of a static cache.
    ``request_personas``: the most personas a request may bring (llama.cpp sizes its
    sequences by it; the other backends' batches grow)."""
    config = policy_set.config
    if policy_set.backend == DistributedRunner.kind:  # each rank runs its own, by these rules
        ranked = DistributedRunner(policy_set, max_rows, max_context, budget, make_runner)
        return ranked, context_limit(ranked, max_context)
    if policy_set.backend == LlamaCppRunner.kind:  # its own contexts, sized by the budget
        llama = LlamaCppRunner(
            policy_set, max_rows, budget=budget, request_personas=request_personas
        )
        return llama, context_limit(llama, max_context)
    on_cuda = policy_set.device.type == "cuda"
    static = config.static_cache == "on" or (
        config.static_cache == "auto" and on_cuda and config.cuda_graphs
    )
    if config.max_cache_len is not None:
        max_len = min(max_context, config.max_cache_len)
    elif budget is not None:
        max_len = budget.static_len(max_rows, max_context)
    else:
        max_len = min(max_context, DEFAULT_MAX_CACHE_LEN)
    if static and max_len < 2:
        assert budget is not None
        raise ConfigError(
            f"static KV caches for {max_rows} running requests do not fit the KV cache budget "
            f"({budget.describe()}): raise MPO_KV_CACHE_BYTES / MPO_KV_CACHE_FRACTION, lower "
            "MPO_MAX_RUNNING, or set static_cache: off"
        )
    graphs = on_cuda and config.cuda_graphs
    pool = torch.cuda.graph_pool_handle() if static and graphs else None

    def batch(model: LoadedModel, storage: KVStorage, slots: int) -> DecodeBatch:
        if not static:
            return GrowingBatch(model, policy_set.vocab_size, device_of(model), storage)
        return static_or_growing(policy_set, model, storage, slots, max_len, graphs, pool)

    backend: Any = backend_of(policy_set)  # a one-process backend: (set, rows, batches)
    runner: PolicyRunner = backend(policy_set, max_rows, batch)
    return runner, context_limit(runner, max_context)


def static_or_growing(
    policy_set: PolicySet,
    model: LoadedModel,
    storage: KVStorage,
    slots: int,
    max_len: int,
    graphs: bool,
    pool: object,
) -> DecodeBatch:
    """A static batch for ``model``, or, with a warning naming the reason, a growing one."""
    reason = static_unsupported(model, max_len)
    if reason is None:
        try:
            return StaticBatch(
                model,
                policy_set.vocab_size,
                device_of(model),
                slots=slots,
                max_len=max_len,
                kv_dtype=policy_set.kv_dtype,
                graphs=graphs,
                pool=pool,
            )
        except Exception as exc:  # a forward that cannot be captured: eager is still right
            reason = f"{'graph capture' if graphs else 'static cache'} failed: {exc!r}"
    logger.warning("model %r decodes eagerly with a growing cache: %s", model.name, reason)
    return GrowingBatch(model, policy_set.vocab_size, device_of(model), storage)


# A rank of a family over several processes loads its shard with the backends above.
DistributedRunner.local_backends = LocalBackends(load_policy_set, capabilities_of)
