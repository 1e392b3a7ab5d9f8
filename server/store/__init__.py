"""Weight profiles: named mixing weights, versioned, persisted (see ``base``).

``open_store(url)`` picks a backend from the URL's scheme: SQLite (the default) or
PostgreSQL (shared by replicas, needs the ``postgres`` extra). New backends join here.
"""

from __future__ import annotations

from mpo_core.errors import ConfigError

from .base import (
    ProfileStore,
    ProfileVersion,
    ProfileVersions,
    StoreUnavailable,
    UnreadableProfile,
)
from .sqlite import SQLiteProfileStore

__all__ = [
    "ProfileStore",
    "ProfileVersion",
    "ProfileVersions",
    "SQLiteProfileStore",
    "StoreUnavailable",
    "UnreadableProfile",
    "open_store",
]


def open_store(url: str) -> ProfileStore:
    """A store for ``url``: ``sqlite:///path.db`` (or a bare path), or ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        # SQLAlchemy's convention: sqlite:///rel.db is relative, sqlite:////abs.db absolute
        return SQLiteProfileStore(url[len("sqlite:///") :])
    if "://" not in url:
        return SQLiteProfileStore(url)
    scheme = url.split("://", 1)[0]
    if scheme in ("postgresql", "postgres"):
        try:  # lazy: psycopg comes with the optional `postgres` extra
            from .postgres import PostgresProfileStore
        except ImportError as exc:
            raise ConfigError(
                f"a {scheme}:// profile store needs psycopg 3 ({exc}); "
                "install it with: pip install 'mpo-server[postgres]'"
            ) from exc
        return PostgresProfileStore(url)
    raise ConfigError(
        f"unsupported profile store URL scheme {scheme!r} in {url!r}; "
        "use sqlite:///PATH or postgresql://..."
    )
