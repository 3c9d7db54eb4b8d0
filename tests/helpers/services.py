"""What a test needs from outside (a server, a binary): skipped locally, required in CI.

A test that needs a server or a server binary asks here first. Locally a
missing one skips the test with the reason; under
``WIREWORK_REQUIRE_SERVICES=1`` (CI) it fails it, so a missing server can never
pass for a green run.
"""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    """Skip (locally) or fail (``WIREWORK_REQUIRE_SERVICES=1``) a test, saying what is missing."""
    if os.environ.get("WIREWORK_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}; WIREWORK_REQUIRE_SERVICES=1 needs it", pytrace=False)
    pytest.skip(reason)


def require_service(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (``WIREWORK_REQUIRE_SERVICES=1``) unless ``host:port`` answers."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        missing(f"{name} does not answer on {host}:{port} ({exc}); see shared/services.md")
