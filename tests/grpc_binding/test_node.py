"""A Node client (@grpc/grpc-js + @grpc/proto-loader) built from the emitted .proto
calls the Python service: issue 5's "a client in another language" check.

The npm packages come from ``node/package-lock.json``, installed once with
``npm ci`` into ``~/.cache/wirework-node/<hash of the lock>`` (outside the
repository, reused while the lock is unchanged). Without node and npm this test
fails and says what to install: it never skips.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.grpc_binding.shop import svc
from wirework.grpc import GrpcServer
from wirework.grpc.proto import derive, render_proto

NODE_DIR = Path(__file__).parent / "node"
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wirework-node"
NPM_TIMEOUT = 600.0
NODE_TIMEOUT = 60.0


def node_tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "the gRPC interop test needs Node.js (18 or later) and npm on PATH: install them "
            "(Debian: apt-get install nodejs npm); the npm packages are installed by the test"
        )
    return node, npm


def node_modules(npm: str) -> Path:
    """The installed packages of ``node/package-lock.json``, installing them the first time."""
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    target = CACHE_ROOT / hashlib.sha256(lock).hexdigest()[:16]
    if (target / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return target / "node_modules"
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    staging = CACHE_ROOT / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(NODE_DIR / name, staging / name)
        result = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=staging,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
        try:
            staging.rename(target)  # atomic: a concurrent run either wins or finds it done
        except OSError:
            if not (target / "node_modules").is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "node_modules"


@pytest.fixture(scope="module")
def node_setup() -> tuple[str, Path]:
    node, npm = node_tools()
    return node, node_modules(npm)


async def run_node(node: str, modules: Path, port: int, root: Path, file: str) -> Any:
    process = await asyncio.create_subprocess_exec(
        node,
        str(NODE_DIR / "client.js"),
        str(port),
        str(root),
        file,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(modules)},
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, stderr.decode()
    return json.loads(stdout)


async def test_a_node_client_built_from_the_emitted_proto_calls_the_service(
    node_setup: tuple[str, Path], tmp_path: Path
) -> None:
    node, modules = node_setup
    proto = derive(svc)
    (tmp_path / proto.file_name).parent.mkdir(parents=True)
    (tmp_path / proto.file_name).write_text(render_proto(svc))

    async with GrpcServer(svc) as server:
        result = await run_node(node, modules, server.port, tmp_path, proto.file_name)

    order = result["get_order"]["response"]
    assert order["id"] == "00000000-0000-0000-0000-000000000007"
    assert order["status"] == "STATUS_SHIPPED"
    assert order["lines"] == [{"sku": "apple", "qty": "2"}]
    assert order["total"] == "3.10"
    assert order["placed_at"] == "2026-01-02T03:04:05.600000+00:00"

    placed = result["place_order"]["response"]
    assert placed["priority"] == "PRIORITY_HIGH"
    assert placed["ship_to"] == {"street": "1 Main St", "city": "Lyon"}
    assert placed["tags"] == {"gift": "yes"}
    assert placed["by_sku"] == {"pear": {"sku": "pear", "qty": "3"}}

    invalid = result["invalid"]["error"]
    assert invalid["code"] == 3  # INVALID_ARGUMENT
    assert "lines.0.qty: Input should be greater than 0" in invalid["details"]
    assert invalid["type"] == "wirework.grpc.codec.InvalidMessageError"

    missing = result["missing"]["error"]
    assert (missing["code"], missing["type"]) == (5, "wirework.errors.NotFoundError")

    events = result["watch"]["items"]
    assert "error" not in result["watch"]
    # proto3 leaves a zero int64 off the wire, and proto-loader (defaults: false) off the object.
    assert [int(event.get("seq", 0)) for event in events] == [0, 1, 2]
    assert {(event["order_id"], event["status"]) for event in events} == {("o-9", "STATUS_OPEN")}
