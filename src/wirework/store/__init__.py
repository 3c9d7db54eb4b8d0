"""Durable state shared by the patterns: the inbox, the outbox, and the user's own tables.

``connect_store(url)`` opens ``sqlite:///path/to/file.db`` (the embedded
default) or ``postgresql://user@host/db?schema=name``; ``WIREWORK_STORE`` gives
the URL when none is passed. Each backend imports its client inside its own
module, so importing this package imports no database client::

    store = connect_store("sqlite:///app.db")
    async with store.transaction() as tx:
        await tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", order.id, total)
        await tx.publish("orders.events", placed, key=order.id)   # the outbox
"""

from __future__ import annotations

import difflib
import os
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from wirework.errors import ConfigurationError
from wirework.store.base import Dialect, Row, Store, Transaction, current_transaction
from wirework.store.errors import (
    StoreBusyError,
    StoreClosedError,
    StoreConflictError,
    StoreError,
    StoreQueryError,
    StoreSchemaError,
    StoreUnavailableError,
    TransactionError,
)
from wirework.store.inbox import Inbox, InboxStats, inbox_middleware, prune_inbox
from wirework.store.outbox import Relay, RelayStats

__all__ = [
    "Dialect",
    "Inbox",
    "InboxStats",
    "Relay",
    "RelayStats",
    "Row",
    "Store",
    "StoreBusyError",
    "StoreClosedError",
    "StoreConflictError",
    "StoreError",
    "StoreQueryError",
    "StoreSchemaError",
    "StoreUnavailableError",
    "Transaction",
    "TransactionError",
    "connect_store",
    "current_transaction",
    "inbox_middleware",
    "prune_inbox",
]

_SCHEMES = ("sqlite:///path/to/file.db", "postgresql://user@host:5432/db?schema=name")

#: Environment variable naming the store when no URL is given.
STORE_ENV = "WIREWORK_STORE"


def connect_store(url: str | None = None, **options: Any) -> Store:
    """Open the store a URL names (or ``$WIREWORK_STORE``); nothing is contacted until first use.

    ``sqlite:///relative.db`` is relative to the working directory and
    ``sqlite:////abs/path.db`` absolute. Query-string options and keyword
    options are the backend's settings: ``busy_timeout`` on SQLite; ``schema``,
    ``min_size``, ``max_size``, ``connect_timeout`` on PostgreSQL, where any
    other query parameter (``sslmode``, ...) is left to asyncpg.

    Raises:
        ConfigurationError: no URL, an unknown scheme or option; the message
            says what to write instead.
    """
    url = url or os.environ.get(STORE_ENV)
    if not url:
        raise ConfigurationError(
            f"no store URL: pass one to connect_store() or set {STORE_ENV}, e.g. "
            f"{STORE_ENV}=sqlite:///app.db"
        )
    if "://" not in url:
        raise ConfigurationError(
            f"store URL {url!r} has no scheme; write one of: {', '.join(_SCHEMES)}"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    merged: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
    merged.update(options)
    if scheme == "sqlite":
        from wirework.store.sqlite import SqliteStore, SqliteStoreSettings

        if parts.netloc:
            raise ConfigurationError(
                f"sqlite URL {url!r} has a host ({parts.netloc!r}); write "
                f"sqlite:///relative/file.db or sqlite:////absolute/file.db"
            )
        path = unquote(parts.path)
        path = path[1:] if path.startswith("/") else path
        if not path or path.endswith("/"):
            raise ConfigurationError(
                f"sqlite URL {url!r} names no file; write sqlite:///app.db "
                f"or sqlite:////var/lib/app/app.db"
            )
        return SqliteStore(path, settings=_settings(SqliteStoreSettings, merged, url))
    if scheme in {"postgresql", "postgres"}:
        from wirework.store.postgres import PostgresStore, PostgresStoreSettings

        # Query parameters that are no setting of ours are asyncpg's (sslmode, ...): they
        # stay in the DSN. Keyword options must be settings.
        known = set(PostgresStoreSettings.model_fields) | {"schema"}
        query = parse_qsl(parts.query, keep_blank_values=True)
        ours: dict[str, Any] = {name: value for name, value in query if name in known}
        ours.update(options)
        if "schema" in ours:
            ours["db_schema"] = ours.pop("schema")
        theirs = urlencode([(name, value) for name, value in query if name not in known])
        dsn = urlunsplit((scheme, parts.netloc, parts.path, theirs, ""))
        return PostgresStore(dsn, settings=_settings(PostgresStoreSettings, ours, url))
    raise ConfigurationError(
        f"unknown store scheme {scheme!r} in {url!r}; write one of: {', '.join(_SCHEMES)}"
    )


def _settings(cls: Any, options: dict[str, Any], url: str) -> Any:
    """Build a backend's settings, naming the closest valid option on a typo."""
    from pydantic import ValidationError

    known = set(cls.model_fields)
    for name in options:
        if name not in known:
            shown = sorted("schema" if k == "db_schema" else k for k in known)
            close = difflib.get_close_matches(name, shown, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigurationError(
                f"unknown option {name!r} for the store {_redacted(url)}; {hint}"
                f"valid options: {', '.join(shown)}"
            )
    try:
        return cls(**options)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = ".".join(str(p) for p in first["loc"])
        raise ConfigurationError(
            f"option {name!r}={first.get('input')!r} for the store {_redacted(url)} is "
            f"invalid: {first['msg']}"
        ) from exc


def _redacted(url: str) -> str:
    """The URL without its query string and password, for error messages (RELIABILITY §3.6)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}" if ":" in user else netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
