"""What every profile backend shares: the interface, the stored value and its checks.

Every ``put`` appends a new version; nothing is overwritten, so the history of a profile
stays readable and a rollback is a ``put`` of an old version's content. ``delete`` appends
a tombstone version (``deleted``): the name disappears from ``list`` and ``get`` says it
was deleted, while ``history`` keeps every version, the tombstone included; a later ``put``
re-creates the profile at the next number. One profile may be marked default; requests
that name none use it (uniform weights when none is marked).

A store is opened for one ``Family`` (the served family's identity): its profiles and
default are that family's alone, so one database can hold several families.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mpo_core.decoding.mixing import check_strength, check_weight_map
from mpo_core.errors import InvalidParameter, MPOError, UnknownProfile
from mpo_core.models.personas import MAX_REQUEST_PERSONAS, check_request_personas
from mpo_core.names import check_name

logger = logging.getLogger(__name__)

# ``meta`` is free-form JSON kept with each version; bounded so that one profile cannot
# make every listing slow or unreadable (JSON decoders recurse once per nesting level).
MAX_META_DEPTH = 32
MAX_META_BYTES = 64 * 1024


def check_profile_name(name: object, param: str = "name") -> str:
    """A stored profile's name (also the ``<served>:<profile>`` model suffix): the one name
    rule (``mpo_core.names``), which the admin routes and the fit request apply too."""
    return check_name(name, param, kind="profile")


class StoreUnavailable(MPOError):
    """The profile database cannot be reached; the server answers 503 (retry shortly)."""


class DeletedProfile(UnknownProfile):
    """A profile whose newest version is a tombstone (404); its history stays readable."""

    def __init__(self, name: str, version: int) -> None:
        super().__init__(name)
        self.version = version  # the tombstone's version

    def __str__(self) -> str:
        return (
            f"profile {self.name!r} was deleted (version {self.version}); its history stays "
            f"readable at GET /admin/profiles/{self.name}/versions, and a PUT with weights "
            f"re-creates it as version {self.version + 1}"
        )


@dataclass(frozen=True)
class Family:
    """The family a store's profiles belong to (docs/server.md, Profiles and families).

    ``key`` is what the rows are keyed by: ``<served name>/<policy names, sorted, comma
    separated>`` unless set explicitly (``MPO_PROFILE_FAMILY``). ``policies`` are the
    family's policy names; profiles written before stores had families (the old schema)
    are adopted by a family when every version names only its policies.
    """

    key: str
    policies: tuple[str, ...] = ()

    @classmethod
    def of(cls, served_name: str, policies: Iterable[str], key: str | None = None) -> Family:
        names = tuple(policies)
        return cls(key or f"{served_name}/{','.join(sorted(names))}", names)

    def fits(self, weights: object) -> bool:
        """Whether stored weights name only this family's policies."""
        return isinstance(weights, dict) and bool(weights) and set(weights) <= set(self.policies)


UNSCOPED = Family("")  # tools and tests that need no family: their own key, adopting nothing


@dataclass(frozen=True)
class StoreTimeouts:
    """How long a store call may wait on its database before it gives up (StoreUnavailable)."""

    connect_s: float = 2.0  # opening a connection (and waiting for a pooled one)
    statement_s: float = 5.0  # one statement, lock waits included


class UnreadableProfile(UnknownProfile):
    """A stored row that breaks the rules a put applies (written by an older version or by
    hand). It is left alone: listings skip it, and a new version or a delete replaces it."""

    def __init__(self, name: str, version: object, reason: str) -> None:
        super().__init__(name)
        self.version = version
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"profile {self.name!r} version {self.version} is unreadable ({self.reason}); "
            "store a new version or delete the profile"
        )


@dataclass(frozen=True)
class ProfileVersion:
    """One stored version of a profile."""

    name: str
    version: int  # 1, 2, ... per name; never reused, even across delete and re-create
    weights: dict[str, float]
    strength: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)  # free-form: who, why, fit job id
    created_at: float = 0.0  # unix seconds
    deleted: bool = False  # a tombstone: the profile was deleted here (weights empty)
    # Personas the profile brings, as a request writes them: {name: text | {system|prefix}}
    request_personas: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "weights": dict(self.weights),
            "strength": self.strength,
            "meta": dict(self.meta),
            "created_at": self.created_at,
            "deleted": self.deleted,
            "personas": dict(self.request_personas),
        }


ProfileVersions = list[ProfileVersion]  # alias: the stores' ``list`` method shadows the builtin


def check_meta(meta: object) -> dict[str, Any]:
    """``meta`` as stored: a JSON object of finite numbers and valid Unicode text, at most
    MAX_META_DEPTH deep and MAX_META_BYTES long once encoded."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InvalidParameter("meta", f"meta must be an object, got {type(meta).__name__}")
    _check_meta_value(meta, 1)
    try:
        encoded = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidParameter("meta", f"meta must be plain JSON: {exc}") from None
    if len(encoded.encode()) > MAX_META_BYTES:
        raise InvalidParameter(
            "meta", f"meta is {len(encoded.encode())} bytes as JSON; the limit is {MAX_META_BYTES}"
        )
    return dict(meta)


def _check_meta_value(value: object, depth: int) -> None:
    if isinstance(value, (dict, list)):
        if depth > MAX_META_DEPTH:
            raise InvalidParameter("meta", f"meta is nested more than {MAX_META_DEPTH} levels deep")
        if isinstance(value, dict):
            for key in value:
                _check_meta_text(key)
        items = value.values() if isinstance(value, dict) else value
        for item in items:
            _check_meta_value(item, depth + 1)
    elif isinstance(value, str):
        _check_meta_text(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidParameter("meta", f"meta must hold finite numbers only, got {value!r}")


def _check_meta_text(text: object) -> None:
    """JSON can escape a lone surrogate (``"\\ud800"``); no UTF-8 reply can carry it."""
    if not isinstance(text, str):
        raise InvalidParameter("meta", f"meta keys must be strings, got {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameter(
            "meta",
            f"meta holds text that is not valid Unicode: a lone surrogate at position {exc.start}",
        ) from None


@dataclass(frozen=True)
class NewVersion:
    """A version's content once checked, as both backends write it."""

    weights: dict[str, float]
    strength: float
    meta: dict[str, Any]
    created_at: float
    request_personas: dict[str, Any] = field(default_factory=dict)

    def version(self, name: str, version: int) -> ProfileVersion:
        return ProfileVersion(
            name, version, self.weights, self.strength, self.meta, self.created_at,
            request_personas=self.request_personas,
        )  # fmt: skip


def prepare_put(
    name: str,
    weights: dict[str, float],
    strength: float,
    meta: dict[str, Any] | None,
    personas: dict[str, Any] | None = None,
) -> NewVersion:
    """Check a new version with the core's rules (the server also checks policy names,
    and the personas against the family's members)."""
    check_profile_name(name)
    checked = _check_weights(weights)
    own = check_stored_personas(personas)
    return NewVersion(checked, check_strength(strength), check_meta(meta), time.time(), own)


def check_stored_personas(personas: object) -> dict[str, Any]:
    """A profile's personas in the request's own form, after the request's rules on their
    shape, names and count (whatever the family: the server checks the clashes)."""
    checked = check_request_personas(personas, (), MAX_REQUEST_PERSONAS)
    return {p.name: p.wire() for p in checked}


def _check_weights(weights: object) -> dict[str, float]:
    """The core's weight rules; the keys are policy names, so they obey the name rule."""
    checked = check_weight_map(weights)
    for policy in checked:
        check_name(policy, "weights", kind="policy")
    return checked


def checked_version(
    name: str,
    version: Any,
    weights: Any,
    strength: Any,
    meta: Any,
    created_at: Any,
    personas: Any = None,
) -> ProfileVersion:
    """A stored row (JSON columns as text or decoded) as a ProfileVersion, after the
    checks a put applies; UnreadableProfile when it breaks them. NULL weights: a tombstone."""
    try:
        check_profile_name(name)
        if weights is None:
            return ProfileVersion(
                name=name, version=int(version), weights={}, created_at=float(created_at),
                deleted=True,
            )  # fmt: skip
        if isinstance(weights, (str, bytes)):
            weights = json.loads(weights)
        if isinstance(meta, (str, bytes)):
            meta = json.loads(meta)
        if isinstance(personas, (str, bytes)):
            personas = json.loads(personas)
        return ProfileVersion(
            name=name,
            version=int(version),
            weights=_check_weights(weights),
            strength=check_strength(strength),
            meta=check_meta(meta),
            created_at=float(created_at),
            request_personas=check_stored_personas(personas),
        )
    except (ValueError, TypeError) as exc:  # InvalidParameter and JSONDecodeError included
        raise UnreadableProfile(str(name), version, str(exc)) from None


def readable_versions(rows: Iterable[tuple[Any, ...]]) -> ProfileVersions:
    """The rows that pass ``checked_version``; each one that does not is named in a warning."""
    versions: ProfileVersions = []
    for row in rows:
        try:
            versions.append(checked_version(*row))
        except UnreadableProfile as exc:
            logger.warning("profile store: skipping a stored row: %s", exc)
    return versions


def found_version(
    name: str, row: tuple[Any, ...] | None, version: int | None = None
) -> ProfileVersion:
    """What ``get`` answers for the row it found: UnknownProfile when there is none,
    DeletedProfile when the newest one is a tombstone."""
    if row is None:
        raise UnknownProfile(name if version is None else f"{name}@{version}")
    found = checked_version(*row)  # UnreadableProfile for a row that breaks the rules
    if found.deleted:
        if version is not None:  # an old tombstone: the history shows it
            raise UnknownProfile(f"{name}@{version} (the version that deleted it)")
        raise DeletedProfile(name, found.version)
    return found


def adopted_names(family: Family, rows: Iterable[tuple[Any, Any]]) -> set[str]:
    """The profiles of the old, family-less schema that ``family`` adopts, from their
    (name, weights) rows: those whose every version names only the family's policies
    (tombstones aside) and that are valid names."""
    fits: dict[str, bool] = {}
    for name, weights in rows:
        if weights is None:
            continue  # a tombstone says nothing about the policies
        if isinstance(weights, (str, bytes)):
            try:
                weights = json.loads(weights)
            except ValueError:
                weights = None
        fits[str(name)] = fits.get(str(name), True) and family.fits(weights)
    return {name for name, ok in fits.items() if ok and _valid_name(name)}


def _valid_name(name: str) -> bool:
    try:
        check_profile_name(name)
    except InvalidParameter:
        return False
    return True


@runtime_checkable
class ProfileStore(Protocol):
    """What the server needs from a profile backend, for the one family it was opened for.
    Implementations must be thread-safe; an unreachable database raises StoreUnavailable."""

    family: Family

    def list(self) -> ProfileVersions:
        """The current version of every live profile, sorted by name."""
        ...

    def get(self, name: str, version: int | None = None) -> ProfileVersion:
        """The current version (or a given one, even of a deleted profile); UnknownProfile,
        DeletedProfile when it (or the version asked for) is a tombstone."""
        ...

    def history(self, name: str) -> ProfileVersions:
        """Every stored version, tombstones included, oldest first; UnknownProfile when the
        name was never stored."""
        ...

    def put(
        self,
        name: str,
        weights: dict[str, float],
        strength: float = 1.0,
        meta: dict[str, Any] | None = None,
        personas: dict[str, Any] | None = None,
    ) -> ProfileVersion:
        """Store a new version (creating the profile if needed) and return it."""
        ...

    def delete(self, name: str) -> None:
        """Remove a live profile (history kept); clears the default if it pointed here."""
        ...

    def get_default(self) -> str | None:
        """The default profile's name, or None (uniform weights)."""
        ...

    def set_default(self, name: str | None) -> None:
        """Mark a live profile default (None: back to uniform); UnknownProfile."""
        ...

    def ping(self) -> None:
        """One round trip to the database, past any cache; StoreUnavailable when it fails."""
        ...

    def close(self) -> None: ...
