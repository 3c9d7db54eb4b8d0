"""A backend whose server is down skips locally and fails under WIREWORK_REQUIRE_SERVICES=1."""

from __future__ import annotations

import socket

import pytest

from tests.helpers.network import free_port
from tests.helpers.services import require_service


def test_down_service_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WIREWORK_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="does not answer"):
        require_service("redis", "127.0.0.1", free_port())


def test_down_service_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WIREWORK_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="WIREWORK_REQUIRE_SERVICES=1"):
        require_service("redis", "127.0.0.1", free_port())


def test_answering_service_passes() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        require_service("test server", "127.0.0.1", server.getsockname()[1])
