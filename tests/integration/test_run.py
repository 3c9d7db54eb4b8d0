"""``wirework run`` as an operator uses it: a real process, a SQLite file, real signals.

The services live in ``run_services.py``; every handled job leaves a line
``"<n> <pid>"`` in a file, so lost and duplicated jobs are counted from the
outside. Each process writes its output to a file (no pipe to fill up), and
the ``launch`` fixture kills every process it started, workers included, even
when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest
from pydantic import BaseModel

from wirework.brokers import Inspectable, connect
from wirework.service import Service
from wirework.testing.conformance import wait_until

ROOT = Path(__file__).resolve().parents[2]
SERVICES = "tests.integration.run_services"
JOBS = f"{SERVICES}:svc"
AUDIT = f"{SERVICES}:make_audit"
#: As in run_services.py, which only the ``wirework run`` processes import.
PREFETCH = 10
#: The handler's sleep unless a test asks for another (``RUN_TEST_SLEEP``).
HANDLER_SLEEP = 0.3
#: What ``wirework run`` waits for its workers past their grace (runner.KILL_MARGIN).
KILL_MARGIN = 5.0


class Job(BaseModel):
    n: int


class Run:
    """One ``wirework run`` process and the file its output goes to."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self) -> float:
        """Send SIGTERM; returns the moment it was sent."""
        self.process.send_signal(signal.SIGTERM)
        return time.monotonic()

    async def exited(self, limit: float) -> int:
        await self.wait_until(lambda: self.process.poll() is not None, limit, what="exit")
        return self.process.returncode

    async def wait_until(
        self, predicate: Callable[[], bool | Awaitable[bool]], limit: float, *, what: str
    ) -> None:
        """``wait_until`` whose failure shows this process's output."""
        try:
            await wait_until(predicate, limit, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- output ---\n{self.output}") from None


class Launcher:
    """Starts ``wirework run`` processes on one broker file; ``close`` kills what is left."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.broker = f"sqlite:///{tmp_path / 'broker.db'}"
        self.handled = tmp_path / "handled.txt"
        self.started = tmp_path / "started.txt"
        self.runs: list[Run] = []
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")]),
            "WIREWORK_BROKER": self.broker,
            "RUN_TEST_OUT": str(self.handled),
            "RUN_TEST_STARTED": str(self.started),
        }

    def start(self, *args: str, sleep: float = HANDLER_SLEEP) -> Run:
        log = self.tmp_path / f"run-{len(self.runs)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "wirework.cli.main", "run", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env={**self.env, "RUN_TEST_SLEEP": str(sleep)},
            )
        run = Run(process, log)
        self.runs.append(run)
        return run

    async def publish(self, count: int) -> None:
        publisher = Service("run-test-publisher", broker=self.broker)
        try:
            for n in range(count):
                await publisher.send("jobs", Job(n=n))
        finally:
            await publisher.broker.aclose()

    async def groups_exist(self, *groups: str) -> bool:
        """Whether every group reads ``jobs`` yet.

        Publish only after that: the broker drops a message once every group
        that exists has acked it, so a group created a moment after the
        other service's group had acked would miss the first jobs.
        """
        async with connect(self.broker) as broker:
            assert isinstance(broker, Inspectable)
            stats = await broker.stats()
        return {s.group for s in stats if s.topic == "jobs"} >= set(groups)

    def ids(self) -> list[int]:
        return [int(line.split()[0]) for line in _lines(self.handled)]

    def pids(self) -> set[int]:
        return {int(line.split()[1]) for line in _lines(self.handled)}

    def mid_flight(self) -> set[int]:
        """Jobs whose handler has started and not finished (not merely settling its ack)."""
        started = {int(line.split()[0]) for line in _lines(self.started)}
        return started - set(self.ids())

    def close(self) -> None:
        for run in self.runs:
            strays: list[psutil.Process] = []
            if run.process.poll() is None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    strays = psutil.Process(run.process.pid).children(recursive=True)
                run.process.kill()
            # Workers run in sessions of their own; kill the ones the log names too.
            for pid in map(int, re.findall(r"worker \d+ started \(pid (\d+)\)", run.output)):
                with contextlib.suppress(psutil.NoSuchProcess):
                    strays.append(psutil.Process(pid))
            for stray in strays:
                with contextlib.suppress(psutil.NoSuchProcess):
                    stray.kill()
            run.process.wait(timeout=10)
            psutil.wait_procs(strays, timeout=10)


def _logged_at(output: str, *needles: str) -> list[float]:
    """The time of the first log line holding each needle, in seconds since midnight."""
    times = []
    for needle in needles:
        line = next((line for line in output.splitlines() if needle in line), None)
        assert line is not None, f"no log line with {needle!r}\n{output}"
        clock = line.split()[1]  # "2026-11-26 21:40:48,319 INFO ..."
        hours, minutes, seconds = clock.replace(",", ".").split(":")
        times.append(int(hours) * 3600 + int(minutes) * 60 + float(seconds))
    return times


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.mark.parametrize(
    "grace",
    [pytest.param(2.0, id="finish-in-grace"), pytest.param(0.1, id="hand-back-after-grace")],
)
async def test_sigterm_under_load_exits_0_in_time_and_loses_nothing(
    launch: Launcher, grace: float
) -> None:
    """SIGTERM mid-load exits 0 within grace + 1 s; a second run handles every remaining job."""
    first = launch.start("--grace", str(grace), JOBS, AUDIT)
    await first.wait_until(lambda: launch.groups_exist("jobs", "run-audit"), 20, what="groups")
    await launch.publish(100)
    # A handler must be sleeping at SIGTERM, not just acking: 16 recorded jobs
    # alone can mean the second batch is settling and the third not yet begun.
    await first.wait_until(
        lambda: len(launch.ids()) >= 16 and bool(launch.mid_flight()), 20, what="load"
    )

    sent = first.terminate()
    code = await first.exited(grace + 5)
    took = time.monotonic() - sent
    assert code == 0, first.output
    # The runner's own promise, timed by its log (load on the machine cannot stretch it):
    # every service stopped within grace + STOP_MARGIN of the signal.
    stopping, stopped = _logged_at(first.output, "stopping 2 service(s)", "all services stopped")
    took_inside = stopped - stopping
    assert took_inside <= grace + 1.0, f"stop took {took_inside:.2f} s\n{first.output}"
    # And the process is gone well inside what a supervisor waits before killing it.
    assert took <= grace + KILL_MARGIN, f"exit took {took:.2f} s\n{first.output}"
    assert len(set(launch.ids())) < 100, "the first run was not stopped under load"
    assert "stopping 2 service(s) (SIGTERM)" in first.output
    cancelled = re.search(r"grace of [\d.]+ s is over: cancelling (\d+)", first.output)
    if grace > HANDLER_SLEEP:
        assert cancelled is None, "a handler did not finish within grace"
    else:
        assert cancelled is not None, f"no handler was running at SIGTERM\n{first.output}"

    second = launch.start("--grace", str(grace), JOBS, AUDIT)
    await second.wait_until(lambda: set(launch.ids()) >= set(range(100)), 30, what="drain")
    second.terminate()
    assert await second.exited(grace + 5) == 0, second.output

    handled = Counter(launch.ids())
    lost = set(range(100)) - set(handled)
    duplicates = sum(handled.values()) - len(handled)
    assert not lost, f"lost {sorted(lost)}"
    assert duplicates <= PREFETCH, f"{duplicates} duplicates"


async def test_a_second_sigterm_forces_the_stop_with_exit_130(launch: Launcher) -> None:
    """A second signal does not wait out the grace: handlers are cancelled and it exits 130."""
    await launch.publish(20)
    run = launch.start("--grace", "30", JOBS, sleep=60)
    in_flight = re.compile(r"in_flight=[1-9]")
    await run.wait_until(lambda: bool(in_flight.search(run.output)), 20, what="busy")
    sent = run.terminate()
    await run.wait_until(lambda: "stopping 1 service(s)" in run.output, 5, what="stopping")
    run.terminate()
    assert await run.exited(5) == 130, run.output
    assert time.monotonic() - sent < 5.0
    assert "forcing the stop (second signal, SIGTERM)" in run.output
    assert not launch.handled.exists(), "a cancelled handler ran to its end"


async def test_two_workers_share_the_work_and_stop_cleanly(launch: Launcher) -> None:
    """With --workers 2 both worker processes take jobs, and SIGTERM stops all with exit 0."""
    await launch.publish(60)
    parent = launch.start("--workers", "2", "--grace", "2", "--loop", "asyncio", JOBS)
    await parent.wait_until(lambda: len(launch.pids()) >= 2, 20, what="both workers busy")

    parent.terminate()
    assert await parent.exited(2 + KILL_MARGIN + 1) == 0, parent.output
    exits = re.findall(r"worker (\d) \(pid (\d+)\) exited with code (\d+)", parent.output)
    assert sorted((index, code) for index, _, code in exits) == [("1", "0"), ("2", "0")]
    assert launch.pids() <= {int(pid) for _, pid, _ in exits}
    assert not any(psutil.pid_exists(pid) for pid in launch.pids())
    # Each worker runs on the loop the command line chose, not its own default.
    assert len(re.findall(r"in pid \d+ on asyncio;", parent.output)) == 2, parent.output


async def test_a_killed_worker_is_reported_and_replaced(launch: Launcher) -> None:
    """A worker killed with SIGKILL is logged loudly and restarted, and the new one takes jobs."""
    await launch.publish(300)
    parent = launch.start("--workers", "2", "--grace", "1", JOBS)
    await parent.wait_until(lambda: len(launch.pids()) >= 2, 20, what="both workers busy")
    victim = min(launch.pids())
    os.kill(victim, signal.SIGKILL)

    await parent.wait_until(lambda: "WORKER DIED" in parent.output, 10, what="death")
    assert f"(pid {victim}) was killed by SIGKILL" in parent.output
    await parent.wait_until(lambda: len(launch.pids()) >= 3, 20, what="replacement busy")

    parent.terminate()
    assert await parent.exited(1 + KILL_MARGIN + 1) == 0, parent.output


async def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
    launch: Launcher,
) -> None:
    """Workers whose supervisor died of SIGKILL notice and stop, instead of running unwatched."""
    await launch.publish(100)
    parent = launch.start("--workers", "2", "--grace", "1", JOBS)
    await parent.wait_until(lambda: len(launch.pids()) >= 2, 20, what="both workers busy")
    workers = [psutil.Process(pid) for pid in launch.pids()]
    parent.process.kill()

    def ended(worker: psutil.Process) -> bool:
        try:
            return worker.status() == psutil.STATUS_ZOMBIE  # ended, not reaped yet
        except psutil.NoSuchProcess:
            return True

    await parent.wait_until(lambda: all(map(ended, workers)), 1 + 3, what="workers ended")
    assert parent.output.count("is gone; stopping this worker") == 2, parent.output
    assert parent.output.count("all services stopped (exit 0)") == 2, parent.output


@pytest.mark.parametrize(
    ("args", "names"),
    [
        pytest.param(("nope:svc",), "cannot import module 'nope'", id="no-module"),
        pytest.param((f"{SERVICES}:missing",), "has no attribute 'missing'", id="no-attribute"),
        pytest.param((f"{SERVICES}:not_a_service",), "is an int, not a wirework", id="not-service"),
        pytest.param((SERVICES,), "is not module:attribute", id="no-colon"),
        pytest.param(
            ("--loop", "trio", JOBS),
            "unknown event loop 'trio': write one of auto, asyncio, uvloop",
            id="unknown-loop",
        ),
    ],
)
def test_a_bad_target_or_option_is_one_line_saying_what_to_fix(
    launch: Launcher, args: tuple[str, ...], names: str
) -> None:
    """A target that does not name a Service, or an unknown loop, exits 2 with one error line."""
    result = subprocess.run(
        [sys.executable, "-m", "wirework.cli.main", "run", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=launch.env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert names in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not launch.handled.exists()


@pytest.mark.parametrize(
    ("options", "loop"),
    [
        pytest.param((), "uvloop", id="auto-is-uvloop"),
        pytest.param(("--loop", "asyncio"), "asyncio", id="asyncio"),
    ],
)
async def test_plain_output_has_start_summary_and_stop_lines(
    launch: Launcher, options: tuple[str, ...], loop: str
) -> None:
    """Without a terminal the output is log lines: start, counts while working, stop with totals."""
    run = launch.start(*options, JOBS, AUDIT)
    await run.wait_until(lambda: launch.groups_exist("jobs", "run-audit"), 20, what="groups")
    await launch.publish(3)
    summary = re.compile(r"run-jobs: handled=\d+ failed=0 retried=0 dead_lettered=0 in_flight=\d+")
    await run.wait_until(lambda: len(launch.ids()) == 3, 20, what="3 jobs handled")
    await run.wait_until(lambda: bool(summary.search(run.output)), 10, what="summary")

    run.terminate()
    assert await run.exited(6) == 0, run.output
    out = run.output
    assert re.search(rf"starting 2 service\(s\) in pid \d+ on {loop};", out), out
    assert "started run-jobs: consume jobs" in out
    assert "started run-audit: subscribe jobs [run-audit]" in out
    assert re.search(r"stopped run-jobs: handled=3 failed=0 .* after [\d.]+ s", out), out
    assert re.search(r"stopped run-audit: handled=3 ", out), out
    assert "all services stopped (exit 0)" in out
    assert "\x1b" not in out, "escape codes in plain output"


API = f"{SERVICES}:api"


def _listening(output: str, kind: str) -> int | None:
    pattern = r"REST on http://127\.0\.0\.1:(\d+)" if kind == "http" else r"gRPC on [\d.]+:(\d+)"
    found = re.search(pattern, output)
    return int(found.group(1)) if found else None


async def test_run_serves_endpoints_over_rest_and_grpc_and_stops_them(launch: Launcher) -> None:
    """--http and --grpc open once the services run; SIGTERM closes them and exits 0."""
    from tests.integration.run_services import ping
    from wirework.grpc import GrpcClient
    from wirework.http import HttpClient

    run = launch.start("--http", ":0", "--grpc", "127.0.0.1:0", API)
    await run.wait_until(
        lambda: None not in (_listening(run.output, "http"), _listening(run.output, "grpc")),
        20,
        what="ports",
    )
    http_port, grpc_port = _listening(run.output, "http"), _listening(run.output, "grpc")
    async with HttpClient(api_service(), address=f"http://127.0.0.1:{http_port}") as rest:
        over_rest = await rest.call(ping, n=7)
    async with GrpcClient(api_service(), address=f"127.0.0.1:{grpc_port}") as grpc:
        over_grpc = await grpc.call(ping, n=8)

    assert (over_rest.n, over_rest.pid) == (7, run.process.pid)
    assert (over_grpc.n, over_grpc.pid) == (8, run.process.pid)
    run.terminate()
    assert await run.exited(10) == 0, run.output


async def test_workers_share_the_http_port(launch: Launcher) -> None:
    """With --workers 2 both processes accept on one port (SO_REUSEPORT)."""
    import aiohttp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = launch.start("--workers", "2", "--http", f"127.0.0.1:{port}", API)
    await run.wait_until(
        lambda: run.output.count(f"REST on http://127.0.0.1:{port}") == 2, 30, what="workers"
    )
    seen: set[int] = set()

    async def two_workers_answered() -> bool:
        # A new connection per call: the kernel spreads connections, not requests.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for n in range(20):
                async with session.get(f"http://127.0.0.1:{port}/v1/ping/{n}") as response:
                    seen.add((await response.json())["pid"])
        return len(seen) == 2

    await run.wait_until(two_workers_answered, 30, what="both workers answering")
    run.terminate()
    assert await run.exited(KILL_MARGIN + 10) == 0, run.output


async def test_grpc_without_endpoints_is_a_usage_error(launch: Launcher) -> None:
    run = launch.start("--grpc", ":0", JOBS)
    assert await run.exited(20) == 2, run.output
    assert "none of the services (run-jobs) declares an endpoint" in run.output


async def test_http_serves_prometheus_metrics_of_a_worker_service(launch: Launcher) -> None:
    """--http on a service without endpoints still serves /metrics with its handlers' counts."""
    import aiohttp

    run = launch.start("--http", ":0", JOBS, sleep=0.0)
    await run.wait_until(lambda: _listening(run.output, "http") is not None, 20, what="port")
    await run.wait_until(lambda: launch.groups_exist("jobs"), 20, what="group")
    await launch.publish(5)
    await run.wait_until(lambda: len(launch.ids()) == 5, 20, what="5 jobs")
    url = f"http://127.0.0.1:{_listening(run.output, 'http')}/metrics"

    async def counted() -> bool:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            text = await response.text()
        return bool(
            re.search(r'wirework_messages_handled_total\{[^}]*service="run-jobs"[^}]*\} 5\.0', text)
        )

    await run.wait_until(counted, 20, what="handled=5 in /metrics")
    run.terminate()
    assert await run.exited(10) == 0, run.output


def api_service() -> Service:
    from tests.integration.run_services import api

    return api
