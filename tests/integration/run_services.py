"""Services for ``test_run.py``, started by ``wirework run tests.integration.run_services:...``.

The broker comes from ``WIREWORK_BROKER`` (the services are made with
``broker=None``) and the handler's sleep from ``RUN_TEST_SLEEP``. Every
handled job is appended as ``"<n> <pid>"`` to the file named by
``RUN_TEST_OUT``, one ``write`` per line on an ``O_APPEND`` descriptor, so
lines from several worker processes never interleave; a handler that starts
leaves the same line in ``RUN_TEST_STARTED`` first, so a test can tell a
handler mid-flight from one that is only settling.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from wirework.service import Service

#: Long enough that a SIGTERM under load finds handlers mid-flight (a test may set it).
HANDLER_SLEEP = float(os.environ.get("RUN_TEST_SLEEP", "0.3"))
CONCURRENCY = 8
PREFETCH = 10  # RELIABILITY.md DEV-04


class Job(BaseModel):
    n: int


svc = Service("run-jobs")


@svc.consume("jobs", concurrency=CONCURRENCY, prefetch=PREFETCH)
async def work(job: Job) -> None:
    await asyncio.to_thread(_record, "RUN_TEST_STARTED", job.n)
    await asyncio.sleep(HANDLER_SLEEP)
    await asyncio.to_thread(_record, "RUN_TEST_OUT", job.n)


def _record(variable: str, n: int) -> None:
    fd = os.open(os.environ[variable], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{n} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def make_audit() -> Service:
    """A factory target: a second service in the same process, copying every job."""
    audit = Service("run-audit")

    @audit.subscribe("jobs")
    async def seen(job: Job) -> None:
        return None

    return audit


not_a_service = 42


class Pong(BaseModel):
    n: int
    pid: int


api = Service("run-api")


@api.get("/v1/ping/{n}")
async def ping(n: int) -> Pong:
    """Answers with the worker's pid, so a test sees which process served it."""
    return Pong(n=n, pid=os.getpid())
