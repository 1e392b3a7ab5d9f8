"""Operational routes: ``/health``, ``/info``, ``/metrics``.

``/health`` and ``/metrics`` are open (probes and scrapers, as in TGI and vLLM); ``/info``
lists profiles and limits, so it takes the API key when one is set, as ``/v1/models`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import PlainTextResponse

from mpo_core import __version__

from ..deps import MetricsDep, ServingDep, SettingsDep, StoreDep, require_api_key
from ..errors import error_response
from ..openapi import error_responses

router = APIRouter(tags=["ops"])


@router.get(
    "/health",
    responses={200: {"description": '`{"status": "ok"}`'}, **error_responses(503)},
)
def health(request: Request) -> Response:
    """200 only when the engine is loaded and its loop is alive; else 503."""
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        return error_response(503, "the engine is not loaded", code="engine_not_loaded")
    if not serving.engine.is_alive:
        return error_response(503, "the engine loop is not running", code="engine_not_running")
    return Response(content='{"status":"ok"}', media_type="application/json")


@router.get("/info", dependencies=[Depends(require_api_key)], responses=error_responses(401, 503))
def info(serving: ServingDep, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    engine = serving.engine
    ps = engine.policy_set
    return {
        "model_id": serving.served_name,
        "served_name": serving.served_name,
        "policies": list(engine.policy_names),
        "reference": ps.reference_name,
        # an adapter family: each policy's LoRA adapter (rank, alpha, layers); else null
        "adapters": (
            [dataclasses.asdict(a) for a in ps.adapters.adapters] if ps.adapters else None
        ),
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
            "max_top_logprobs": settings.max_top_logprobs,
            "max_n": settings.max_n,
            "max_body_bytes": settings.max_body_bytes,
            "default_max_tokens": settings.default_max_tokens,
        },
        "version": __version__,
    }


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(metrics: MetricsDep) -> Response:
    body, content_type = metrics.render()
    return Response(content=body, media_type=content_type)
