"""Admin routes for weight profiles: ``/admin/profiles[/{name}]`` behind the admin token.

Handlers are plain ``def``: FastAPI runs them in its thread pool, so a store waiting on
another process's write lock never blocks the event loop. While the store is down they
get 503 at once (``GuardedStore``).

A deleted profile (docs/server.md, Deleted profiles): ``GET`` says so (404), its history
keeps every version with the deletion as a ``deleted`` version, a ``PUT`` with weights
re-creates it (201) at the next number, and a rollback is refused (409) until then.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from mpo_core.errors import UnknownProfile
from mpo_core.names import Name

from ..deps import EngineDep, StoreDep, require_admin
from ..errors import APIError
from ..openapi import BODY_ERRORS, error_responses
from ..protocol.admin import DefaultPut, ProfileHistory, ProfileList, ProfileOut, ProfilePut
from ..protocol.common import MAX_INT
from ..store import DeletedProfile, ProfileStore, ProfileVersion, UnreadableProfile

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])
ERRORS = error_responses(400, 401, 403, 404, 503)  # 400: a bad path or query parameter
BODY = error_responses(*BODY_ERRORS, 401, 403, 404, 409, 503)
MAX_HISTORY_PAGE = 100


def profile_out(version: ProfileVersion, default: str | None) -> dict[str, Any]:
    return {**version.to_dict(), "is_default": version.name == default and not version.deleted}


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
    page (null on the last). Versions carry their ``meta`` (up to 64 KiB each); a delete
    is a version with ``deleted: true``, and ``deleted`` says whether the profile is now."""
    default = store.get_default()
    history = store.history(name)
    later = [v for v in history if v.version > after]
    page = later[:limit]
    following = page[-1].version if len(later) > limit else None
    return {
        "name": name,
        "deleted": bool(history) and history[-1].deleted,
        "versions": [profile_out(v, default) for v in page],
        "next": following,
    }


@router.put(
    "/profiles/{name}",
    response_model=ProfileOut,
    responses={**BODY, 201: {"model": ProfileOut, "description": "The profile's first version"}},
)
def put_profile(name: Name, body: ProfilePut, store: StoreDep, engine: EngineDep) -> JSONResponse:
    """Store new weights as a new version, or (``{"version": n}``) roll back to version n.
    201 when this creates the profile (again, after a delete), 409 for a rollback of a
    deleted profile."""
    weights: dict[str, float] | list[float] | None = body.weights
    strength, meta, personas = body.strength, body.meta, body.own_personas()
    live = _is_live(store, name)
    if body.version is not None:
        if live is not None and not live:
            raise APIError(
                409,
                f"profile {name!r} is deleted; a rollback applies to a live profile: re-create "
                "it with weights first (its history stays readable at "
                f"GET /admin/profiles/{name}/versions)",
                param="version",
                code="profile_deleted",
            )
        old = store.get(name, body.version)
        weights, strength, personas = old.weights, old.strength, old.request_personas
        meta = {**body.meta, "rollback_of": body.version}
    # The engine's mixture checks the names against the loaded policies; the store then
    # applies the same core rules to what it writes.
    mixture = engine.mixture(weights, strength, personas=personas)
    own = {p.name: p.wire() for p in mixture.request_personas}
    version = store.put(name, mixture.as_dict(), mixture.strength, meta, own)
    if body.default:
        store.set_default(name)
    status = 200 if live else 201
    return JSONResponse(profile_out(version, store.get_default()), status_code=status)


def _is_live(store: ProfileStore, name: str) -> bool | None:
    """True for a live profile, False for a deleted one, None for a name never stored."""
    try:
        store.get(name)
    except DeletedProfile:
        return False
    except UnreadableProfile:  # stored, though unreadable: a put replaces it
        return True
    except UnknownProfile:
        return None
    return True


@router.delete("/profiles/{name}", responses=ERRORS)
def delete_profile(name: str, store: StoreDep) -> dict[str, Any]:
    store.delete(name)
    return {"name": name, "deleted": True}
