"""Admin routes for weight profiles: ``/admin/profiles[/{name}]`` behind the admin token.

Handlers are plain ``def``: FastAPI runs them in its thread pool, so a store waiting on
another process's write lock never blocks the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from mpo_core.names import Name

from ..deps import EngineDep, StoreDep, require_admin
from ..openapi import BODY_ERRORS, error_responses
from ..protocol.admin import DefaultPut, ProfileHistory, ProfileList, ProfileOut, ProfilePut
from ..protocol.common import MAX_INT
from ..store import ProfileVersion

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])
ERRORS = error_responses(400, 401, 403, 404, 503)  # 400: a bad path or query parameter
BODY = error_responses(*BODY_ERRORS, 401, 403, 404, 503)
MAX_HISTORY_PAGE = 100


def profile_out(version: ProfileVersion, default: str | None) -> dict[str, Any]:
    return {**version.to_dict(), "is_default": version.name == default}


@router.get("/profiles", response_model=ProfileList, responses=ERRORS)
def list_profiles(store: StoreDep) -> dict[str, Any]:
    default = store.get_default()
    return {"default": default, "profiles": [profile_out(p, default) for p in store.list()]}


@router.put("/profiles", response_model=ProfileList, responses=BODY)
def set_default(body: DefaultPut, store: StoreDep) -> dict[str, Any]:
    """Mark the default profile, used when a request names none; null means uniform."""
    store.set_default(body.default)
    return list_profiles(store)


@router.get("/profiles/{name}", response_model=ProfileOut, responses=ERRORS)
def get_profile(
    name: str, store: StoreDep, version: int | None = Query(default=None, ge=1, le=MAX_INT)
) -> dict[str, Any]:
    return profile_out(store.get(name, version), store.get_default())


@router.get("/profiles/{name}/versions", response_model=ProfileHistory, responses=ERRORS)
def profile_history(
    name: str,
    store: StoreDep,
    after: int = Query(default=0, ge=0, le=MAX_INT, description="versions after this one"),
    limit: int = Query(default=20, ge=1, le=MAX_HISTORY_PAGE, description="versions a page"),
) -> dict[str, Any]:
    """A page of a profile's versions, oldest first; ``next`` is the ``after`` of the next
    page (null on the last). Versions carry their ``meta`` (up to 64 KiB each)."""
    default = store.get_default()
    later = [v for v in store.history(name) if v.version > after]
    page = later[:limit]
    following = page[-1].version if len(later) > limit else None
    return {"name": name, "versions": [profile_out(v, default) for v in page], "next": following}


@router.put(
    "/profiles/{name}",
    response_model=ProfileOut,
    responses={**BODY, 201: {"model": ProfileOut, "description": "The profile's first version"}},
)
def put_profile(name: Name, body: ProfilePut, store: StoreDep, engine: EngineDep) -> JSONResponse:
    """Store new weights as a new version, or (``{"version": n}``) roll back to version n."""
    weights: dict[str, float] | list[float] | None = body.weights
    strength, meta = body.strength, body.meta
    if body.version is not None:
        old = store.get(name, body.version)
        weights, strength = old.weights, old.strength
        meta = {**body.meta, "rollback_of": body.version}
    # The engine's mixture checks the names against the loaded policies; the store then
    # applies the same core rules to what it writes.
    mixture = engine.mixture(weights, strength)
    version = store.put(name, mixture.as_dict(), mixture.strength, meta)
    if body.default:
        store.set_default(name)
    status = 201 if version.version == 1 else 200
    return JSONResponse(profile_out(version, store.get_default()), status_code=status)


@router.delete("/profiles/{name}", responses=ERRORS)
def delete_profile(name: str, store: StoreDep) -> dict[str, Any]:
    store.delete(name)
    return {"name": name, "deleted": True}
