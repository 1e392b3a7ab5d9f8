"""Weight profiles: named mixing weights, versioned, persisted, one family's (``base``).

``open_store(url, family)`` picks a backend from the URL's scheme: SQLite (the default) or
PostgreSQL (shared by replicas, needs the ``postgres`` extra). New backends join here.
``GuardedStore`` fails fast while the database is down; ``ServedProfiles`` answers the
profiles this replica served from its cache meanwhile.
"""

from __future__ import annotations

from mpo_core.errors import ConfigError

from .base import (
    UNSCOPED,
    DeletedProfile,
    Family,
    ProfileStore,
    ProfileVersion,
    ProfileVersions,
    StoreTimeouts,
    StoreUnavailable,
    UnreadableProfile,
)
from .guard import GuardedStore
from .served import ServedProfiles
from .sqlite import SQLiteProfileStore

__all__ = [
    "UNSCOPED",
    "DeletedProfile",
    "Family",
    "GuardedStore",
    "ProfileStore",
    "ProfileVersion",
    "ProfileVersions",
    "SQLiteProfileStore",
    "ServedProfiles",
    "StoreTimeouts",
    "StoreUnavailable",
    "UnreadableProfile",
    "open_store",
]


def open_store(
    url: str, family: Family = UNSCOPED, timeouts: StoreTimeouts | None = None
) -> ProfileStore:
    """``family``'s profiles at ``url``: ``sqlite:///path.db`` (or a bare path), or
    ``postgresql://...``; StoreUnavailable when the database cannot be reached."""
    timeouts = timeouts or StoreTimeouts()
    if url.startswith("sqlite:///") or "://" not in url:
        # SQLAlchemy's convention: sqlite:///rel.db is relative, sqlite:////abs.db absolute
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else url
        return SQLiteProfileStore(path, family, busy_timeout_s=timeouts.statement_s)
    scheme = url.split("://", 1)[0]
    if scheme in ("postgresql", "postgres"):
        try:  # lazy: psycopg comes with the optional `postgres` extra
            from .postgres import PostgresProfileStore
        except ImportError as exc:
            raise ConfigError(
                f"a {scheme}:// profile store needs psycopg 3 ({exc}); "
                "install it with: pip install 'mpo-server[postgres]'"
            ) from exc
        return PostgresProfileStore(url, family=family, timeouts=timeouts)
    raise ConfigError(
        f"unsupported profile store URL scheme {scheme!r} in {url!r}; "
        "use sqlite:///PATH or postgresql://..."
    )
