"""FastAPI dependencies: what routes reach through ``Annotated[..., Depends(...)]``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.types import Scope

from mpo_core.engine.core import Engine
from mpo_core.errors import EngineNotRunning

from .auth import check_admin_token, check_api_key
from .errors import APIError
from .metrics import Metrics
from .openapi import operations_at
from .serving import Serving
from .settings import Settings
from .store import ProfileStore, StoreUnavailable


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_serving(request: Request) -> Serving:
    serving: Serving | None = getattr(request.app.state, "serving", None)
    if serving is None or not serving.engine.is_alive:
        raise EngineNotRunning("the engine is not loaded or not running; retry shortly")
    return serving


def get_engine(serving: Annotated[Serving, Depends(get_serving)]) -> Engine:
    return serving.engine


def get_store(request: Request) -> ProfileStore:
    store: ProfileStore | None = getattr(request.app.state, "store", None)
    if store is None:
        raise StoreUnavailable("the profile store is not open yet; retry shortly")
    return store


def require_api_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    check_api_key(request, settings.api_key)


def require_admin(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    check_admin_token(request, settings.admin_token)


def authorize_route(request: Request) -> None:
    """Run the matched route's bearer checks now: a body that cannot even be parsed is
    refused before the route's dependencies run, and a caller without the token must
    learn that (401) before anything about the body (400)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    settings = get_settings(request)
    for dependency in getattr(dependant, "dependencies", []):
        if dependency.call is require_api_key:
            check_api_key(request, settings.api_key)
        elif dependency.call is require_admin:
            check_admin_token(request, settings.admin_token)


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServingDep = Annotated[Serving, Depends(get_serving)]
EngineDep = Annotated[Engine, Depends(get_engine)]
StoreDep = Annotated[ProfileStore, Depends(get_store)]


def refusal_before_body(scope: Scope) -> APIError | None:
    """The 401 (or 403) a request would get from its route's token checks, found before
    the body is read: the body limit answers it instead of a 413, so a caller without the
    key learns that first, whatever it sends. The route's checks are read from the
    OpenAPI document's ``security`` (``openapi.add_security``)."""
    request = Request(scope)
    operation = operations_at(request.app, scope["path"]).get(scope["method"], {})
    schemes = {name for requirement in operation.get("security", []) for name in requirement}
    settings = get_settings(request)
    try:
        if "adminToken" in schemes:
            check_admin_token(request, settings.admin_token)
        if "apiKey" in schemes:
            check_api_key(request, settings.api_key)
    except APIError as refusal:
        return refusal
    return None
