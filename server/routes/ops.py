"""Operational routes: ``/health``, ``/info``, ``/metrics``.

``/health`` and ``/metrics`` are open (probes and scrapers, as in TGI and vLLM); ``/info``
lists profiles and limits, so it takes the API key when one is set, as ``/v1/models`` does.

``/health`` runs on the event loop and reads only in-memory state, so it answers in
milliseconds whatever the profile store is doing; it reports the store's state but does
not fail on it (a replica serves its cached profiles through a store outage).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse

from mpo_core import __version__

from ..deps import MetricsDep, ServingDep, SettingsDep, StoreDep, require_api_key
from ..errors import error_response
from ..openapi import error_responses

router = APIRouter(tags=["ops"])


HEALTH_OK = (
    '`{"status": "ok", "store": {"state": "up"}}`; while the profile store is unreachable '
    '`"store": {"state": "down", "since": <unix s>, "error": "..."}` (still 200)'
)


@router.get("/health", responses={200: {"description": HEALTH_OK}, **error_responses(503)})
async def health(request: Request) -> Response:
    """200 only when the engine is loaded and its loop is alive; else 503. The body reports
    the profile store's state, which does not change the status."""
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        return error_response(503, "the engine is not loaded", code="engine_not_loaded")
    if not serving.engine.is_alive:
        lost = serving.engine.runner.failure()  # a worker rank lost, for one
        message = f"the engine is not running: {lost}" if lost else "the engine loop is not running"
        return error_response(503, message, code="engine_not_running")
    state = getattr(request.app.state.store, "state", lambda: {"state": "unknown"})()
    body = json.dumps({"status": "ok", "store": state}, separators=(",", ":"))
    return Response(content=body, media_type="application/json")


@router.get("/info", dependencies=[Depends(require_api_key)], responses=error_responses(401, 503))
def info(serving: ServingDep, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    engine = serving.engine
    ps = engine.policy_set
    return {
        "model_id": serving.served_name,
        "served_name": serving.served_name,
        "policies": list(engine.policy_names),
        "reference": ps.reference_name,
        # the backend that runs the family; an adapter family's adds each policy's LoRA
        # adapter (rank, alpha, layers), null elsewhere
        "backend": engine.runner.describe()["backend"],
        "adapters": engine.runner.describe().get("adapters"),
        # a family over several ranks: each rank's members, host and pid, the transport and
        # the traffic so far (docs/distributed.md); null for a one-process family
        "distributed": _distributed(engine.runner.describe()),
        "vocab_size": int(ps.vocab_size),
        "device": str(ps.device),
        "dtype": str(ps.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(ps.kv_dtype).removeprefix("torch."),
        "profiles": [p.name for p in store.list()],
        "default_profile": store.get_default(),
        "limits": {
            "max_context": int(engine.max_context),
            "max_running": engine.limits.max_running,
            "max_queued": engine.limits.max_queued,
            "prefill_chunk_tokens": engine.limits.prefill_chunk_tokens,
            "max_top_logprobs": settings.max_top_logprobs,
            "max_n": settings.max_n,
            "max_body_bytes": settings.max_body_bytes,
            "default_max_tokens": settings.default_max_tokens,
        },
        "version": __version__,
    }


def _distributed(described: dict[str, Any]) -> dict[str, Any] | None:
    if "ranks" not in described:
        return None
    keys = ("transport", "ranks", "traffic", "failure")
    return {key: described[key] for key in keys if key in described}


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(metrics: MetricsDep) -> Response:
    body, content_type = metrics.render()
    return Response(content=body, media_type=content_type)
