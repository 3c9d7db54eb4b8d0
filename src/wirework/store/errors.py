"""The store's errors; they live in ``wirework.errors`` (the one tree) and are named here too."""

from __future__ import annotations

from wirework.errors import (
    StoreBusyError,
    StoreClosedError,
    StoreConflictError,
    StoreError,
    StoreQueryError,
    StoreSchemaError,
    StoreUnavailableError,
    TransactionError,
)

__all__ = [
    "StoreBusyError",
    "StoreClosedError",
    "StoreConflictError",
    "StoreError",
    "StoreQueryError",
    "StoreSchemaError",
    "StoreUnavailableError",
    "TransactionError",
]
