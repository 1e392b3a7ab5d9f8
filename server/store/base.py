"""What every profile backend shares: the interface, the stored value and its checks.

Every ``put`` appends a new version; nothing is overwritten, so the history of a profile
stays readable and a rollback is a ``put`` of an old version's content. ``delete`` appends
a tombstone (the name disappears from ``list`` but its history stays). One profile may be
marked default; requests that name none use it (uniform weights when none is marked).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from mpo_core.errors import InvalidParameter, MPOError
from mpo_core.mixing import check_strength, check_weight_map

# ``meta`` is free-form JSON kept with each version; bounded so that one profile cannot
# make every listing slow or unreadable (JSON decoders recurse once per nesting level).
MAX_META_DEPTH = 32
MAX_META_BYTES = 64 * 1024


# A stored profile's name (also the ``<served>:<profile>`` model suffix): the store's rule,
# which the admin routes and the fit request apply to the names they are given.
PROFILE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def check_profile_name(name: object, param: str = "name") -> str:
    if not isinstance(name, str) or not PROFILE_NAME_PATTERN.match(name):
        raise InvalidParameter(
            param,
            f"invalid profile name {name!r}: use 1-64 letters, digits, '_', '.', '-' "
            "starting with a letter or digit",
        )
    return name


class StoreUnavailable(MPOError):
    """The profile database cannot be reached; the server answers 503 (retry shortly)."""


@dataclass(frozen=True)
class ProfileVersion:
    """One stored version of a profile."""

    name: str
    version: int  # 1, 2, ... per name; never reused, even across delete and re-create
    weights: dict[str, float]
    strength: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)  # free-form: who, why, fit job id
    created_at: float = 0.0  # unix seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "weights": dict(self.weights),
            "strength": self.strength,
            "meta": dict(self.meta),
            "created_at": self.created_at,
        }


ProfileVersions = list[ProfileVersion]  # alias: the stores' ``list`` method shadows the builtin


def check_meta(meta: object) -> dict[str, Any]:
    """``meta`` as stored: a JSON object of finite numbers, at most MAX_META_DEPTH deep and
    MAX_META_BYTES long once encoded."""
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
        items = value.values() if isinstance(value, dict) else value
        for item in items:
            _check_meta_value(item, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidParameter("meta", f"meta must hold finite numbers only, got {value!r}")


@dataclass(frozen=True)
class NewVersion:
    """A version's content once checked, as both backends write it."""

    weights: dict[str, float]
    strength: float
    meta: dict[str, Any]
    created_at: float


def prepare_put(
    name: str, weights: dict[str, float], strength: float, meta: dict[str, Any] | None
) -> NewVersion:
    """Check a new version with the core's rules (the server also checks policy names)."""
    check_profile_name(name)
    checked = check_weight_map(weights)
    return NewVersion(checked, check_strength(strength), check_meta(meta), time.time())


@runtime_checkable
class ProfileStore(Protocol):
    """What the server needs from a profile backend. Implementations must be thread-safe."""

    def list(self) -> ProfileVersions:
        """The current version of every live profile, sorted by name."""
        ...

    def get(self, name: str, version: int | None = None) -> ProfileVersion:
        """The current version (or a given one, even of a deleted profile); UnknownProfile."""
        ...

    def history(self, name: str) -> ProfileVersions:
        """Every stored version, oldest first; UnknownProfile when the name was never stored."""
        ...

    def put(
        self,
        name: str,
        weights: dict[str, float],
        strength: float = 1.0,
        meta: dict[str, Any] | None = None,
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

    def close(self) -> None: ...
