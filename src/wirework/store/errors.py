"""Errors of the store; they belong under ``WireworkError`` in ``wirework/errors.py``::

StoreError                    anything a store backend reports
├── StoreUnavailableError     cannot reach or open the store (retriable)
├── StoreBusyError            the SQLite file is locked past busy_timeout (retriable)
├── StoreConflictError        a serialization failure or deadlock: retry (retriable)
├── StoreQueryError           the database refused a statement (bad SQL, a constraint)
├── StoreSchemaError          the schema is newer than this wirework, or unusable
├── TransactionError          a transaction used wrongly (nested, after its end)
└── StoreClosedError          the store was closed
"""

from __future__ import annotations

from wirework.errors import WireworkError


class StoreError(WireworkError):
    """A store backend failed to do what was asked."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached or opened; retrying later may succeed."""

    retriable = True


class StoreBusyError(StoreError):
    """Another process holds the SQLite file's write lock past ``busy_timeout``.

    The transaction had no effect.
    """

    retriable = True


class StoreConflictError(StoreError):
    """The database aborted the transaction to keep it serializable (or to end a deadlock).

    Nothing was committed; running the whole transaction again may succeed.
    """

    retriable = True


class StoreQueryError(StoreError):
    """The database refused a statement: invalid SQL, a broken constraint, a wrong type.

    ``sqlstate`` is PostgreSQL's error code when there is one.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class StoreSchemaError(StoreError):
    """The database's wirework schema cannot be used by this version of wirework."""


class TransactionError(StoreError):
    """A transaction was used outside its ``async with`` block, or opened inside another."""


class StoreClosedError(StoreError):
    """The store was closed before or during the call."""
