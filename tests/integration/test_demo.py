"""`make demo` is the main job: it must run, and say what happened truthfully."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.services import require_service

ROOT = Path(__file__).resolve().parents[2]


def count(pattern: str, out: str) -> int:
    found = re.search(pattern + r"\s*│\s*(-?\d+)", out)
    assert found is not None, f"no {pattern!r} line in the demo's summary"
    return int(found.group(1))


SERVERS = {
    "redis://127.0.0.1:6379/0": ("Redis", 6379),
    "nats://127.0.0.1:4222": ("NATS", 4222),
    "amqp://guest:guest@127.0.0.1:5672/": ("RabbitMQ", 5672),
}


@pytest.mark.parametrize(
    "broker",
    [
        "",
        "memory://",
        *(pytest.param(url, marks=pytest.mark.ext) for url in SERVERS),
    ],
    ids=["sqlite-default", "memory", "redis", "nats", "rabbitmq"],
)
def test_shop_demo_tells_the_whole_flow(tmp_path: Path, broker: str) -> None:
    """On every backend the shop shares the label queue, fans out, answers requests and
    dead-letters poison; on a server, twice in a row, each run starting clean."""
    if broker in SERVERS:
        name, port = SERVERS[broker]
        require_service(name, "127.0.0.1", port)
    for _ in range(2 if broker in SERVERS else 1):
        run_demo(tmp_path, broker)


def run_demo(tmp_path: Path, broker: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("WIREWORK_BROKER", None)
    if broker:
        env["WIREWORK_BROKER"] = broker
    result = subprocess.run(
        [sys.executable, "-m", "examples.shop"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert count("notifications sent", out) == 6
    assert count(r"revenue booked \(cents\)", out) == 3900 + 2500 + 7800
    a, b = count("labels printed by worker-a", out), count("labels printed by worker-b", out)
    assert (a + b, min(a, b) > 0) == (4, True), "both shipping workers share the 4 labels"
    assert out.count("shop.reserve_stock") == 6, "every order asked inventory"
    assert re.search(r"analytics\s+shop\.order_placed\s+\w+ <- \w+\s+3 attempts", out)
    assert out.count("max_deliveries after 3 attempts") == 1, "exactly this run's poison"
    assert (tmp_path / ".demo" / "shop.db").exists() is (not broker)
    assert re.search(r"order o-1 over gRPC GetOrder: placed \(charge ch-\d+\)", out)
    # The outage: the breaker opens, every order then is turned down, a probe closes it.
    assert re.search(r"circuit to payments: closed -> open", out), out[-3000:]
    assert len(re.findall(r"│ o-(?:7|8|9|10|11|12)\s+│ rejected │ payment failed", out)) == 6
    assert "(CircuitOpenError)" in out, "later orders were refused without calling payments"
    assert re.search(r"open -> half_open \(cool-down over\)", out)
    assert re.search(r"half_open -> closed \(probe succeeded\)", out)
    assert "order o-13: placed" in out
