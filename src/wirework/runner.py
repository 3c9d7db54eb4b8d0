"""Run services until a signal, in this process or in supervised worker processes.

This is the runtime behind ``wirework run`` and has no command-line
dependencies, so it can be driven from a test or another entry point.

Stopping (RELIABILITY.md DEV-04): the first SIGTERM or SIGINT stops every
consumer from fetching, gives running handlers ``grace`` seconds, cancels the
rest (their messages are nacked back to the broker, so nothing is lost) and
ends with exit code 0. A second signal cancels the handlers at once, hands
their messages back and ends with 130. A stop that hangs past its deadline
(a handler that swallows cancellation, a broker that never closes) is cut
short rather than allowed to outlive an orchestrator's kill timeout unseen.

Worker processes (``--workers N``) are ``wirework.supervisor``'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from wirework.clock import SYSTEM_CLOCK, wait_first
from wirework.consumer import ConsumerStats
from wirework.errors import ConfigurationError, WireworkError
from wirework.listeners import Listeners
from wirework.loops import running_loop_name
from wirework.service import Binding, Service
from wirework.service.requests import RequestStats

log = logging.getLogger("wirework.run")

EXIT_OK = 0
EXIT_FAILED = 1
#: A configuration error: restarting cannot fix it, so a supervisor gives up.
EXIT_CONFIG = 2
#: 128 + SIGINT, what shells report for a process stopped by Ctrl-C.
EXIT_FORCED = 130

#: Seconds past ``grace`` a stop may take before the runner cancels everything.
STOP_MARGIN = 1.0
#: Seconds a forced stop may take before the process exits without cleaning up.
ABANDON_AFTER = 2.0
#: Seconds past ``grace`` a supervisor waits for its workers before killing them;
#: above STOP_MARGIN + ABANDON_AFTER, so a worker always gets to end on its own.
KILL_MARGIN = 5.0
#: How often a worker checks that its parent is still there.
PARENT_POLL = 0.5

State = Literal["starting", "running", "stopping", "stopped"]
Watch = Callable[["Snapshot"], None]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# -- finding services -------------------------------------------------------------


def load_service(target: str) -> Service:
    """The ``Service`` a ``module:attribute`` target names.

    The attribute may be dotted (``module:app.orders``) and may be a function
    taking no arguments that returns a ``Service`` (a factory).

    Raises:
        ConfigurationError: the target is malformed, the module cannot be
            imported, the attribute is missing, or it is not a Service; the
            message names the culprit and says what to write.
    """
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigurationError(
            f"target {target!r} is not module:attribute; write the module's import path "
            f"and the Service's name, e.g. myapp.services:svc"
        )
    if module_name.endswith(".py") or "/" in module_name:
        dotted = module_name.removesuffix(".py").replace("/", ".")
        raise ConfigurationError(
            f"target {target!r} names a file; write the module's import path: {dotted}:{attribute}"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise ConfigurationError(
                f"cannot import module {module_name!r} of target {target!r}: no module named "
                f"{missing!r}; write the dotted path you would import, and run from the "
                f"directory that holds it (or add that directory to PYTHONPATH)"
            ) from exc
        raise _import_failed(module_name, exc) from exc
    except Exception as exc:
        raise _import_failed(module_name, exc) from exc
    found: object = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attribute!r} (target {target!r}); "
                f"{_services_in(module, module_name)}"
            )
        found = getattr(found, part)
    if isinstance(found, Service):
        return found
    if callable(found) and not isinstance(found, type):
        return _call_factory(target, found)
    raise ConfigurationError(
        f"{target!r} is {_a(found)}, not a wirework Service; point at a Service "
        f"(svc = Service('name')) or at a function that takes no arguments and returns one"
    )


def load_services(targets: Iterable[str]) -> list[Service]:
    """Every target's Service, in order; each object and each name may appear once.

    Raises:
        ConfigurationError: as ``load_service``, or a service listed twice.
    """
    services: list[Service] = []
    seen: dict[str, str] = {}
    for target in targets:
        service = load_service(target)
        if service.name in seen:
            raise ConfigurationError(
                f"targets {seen[service.name]!r} and {target!r} are both service "
                f"{service.name!r}; list each service once, and give different services "
                f"different names"
            )
        seen[service.name] = target
        services.append(service)
    if not services:
        raise ConfigurationError("no services to run; name at least one module:attribute")
    return services


def check_brokers(services: Iterable[Service]) -> None:
    """Resolve every service's broker now, so a missing one is reported before anything runs.

    Resolving only builds the broker object (no connection is made), but it
    validates the URL, and for ``broker=None`` services reads ``WIREWORK_BROKER``.

    Raises:
        ConfigurationError: a service has no broker, or its URL is invalid.
    """
    for service in services:
        _ = service.broker


def _import_failed(module_name: str, exc: Exception) -> ConfigurationError:
    if isinstance(exc, WireworkError):
        return ConfigurationError(f"importing {module_name!r} failed: {exc}")
    return ConfigurationError(
        f"importing {module_name!r} raised {type(exc).__name__}: {exc}; fix the module "
        f"(python -c 'import {module_name}' shows the traceback)"
    )


def _services_in(module: object, module_name: str) -> str:
    names = sorted(n for n, v in vars(module).items() if isinstance(v, Service))
    if not names:
        return f"it defines no Service at module level; write {module_name}:<name of your Service>"
    return f"Services there: {', '.join(f'{module_name}:{n}' for n in names)}"


def _call_factory(target: str, factory: Callable[..., object]) -> Service:
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        parameters = []  # no signature to read (some builtins): just try the call
    required = [
        p.name
        for p in parameters
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise ConfigurationError(
            f"{target!r} is a function that needs arguments ({', '.join(required)}); a "
            f"factory for wirework run takes none, so point at a Service or a no-argument function"
        )
    try:
        made = factory()
    except Exception as exc:
        raise ConfigurationError(f"calling {target!r} raised {type(exc).__name__}: {exc}") from exc
    if inspect.isawaitable(made):
        if inspect.iscoroutine(made):
            made.close()
        raise ConfigurationError(
            f"{target!r} is an async function; make the factory a plain def returning the Service"
        )
    if not isinstance(made, Service):
        raise ConfigurationError(
            f"{target!r} returned {_a(made)}, not a wirework Service; return the Service from it"
        )
    return made


def _a(value: object) -> str:
    if isinstance(value, type):
        return f"the class {value.__name__}"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


# -- what is happening: counts, with no I/O -----------------------------------------


@dataclass(frozen=True)
class HandlerCounts:
    """One consumer's counters; several handlers on one topic and group share a consumer."""

    service: str
    kind: str
    topic: str
    group: str
    handlers: str
    handled: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class RequestCounts:
    """A service's requests to others (``Service.request``), from the caller's side."""

    service: str
    sent: int = 0
    replied: int = 0
    timed_out: int = 0
    remote_errors: int = 0


#: The per-consumer counters, in the order the live table and summaries show them.
COUNTED = ("handled", "failed", "retried", "dead_lettered", "in_flight")


@dataclass(frozen=True)
class Snapshot:
    """Every service's counters at one moment, for the live table or the summary lines.

    ``requests`` has one row per service, so it also lists the services in order.
    """

    state: State
    grace: float
    handlers: tuple[HandlerCounts, ...] = ()
    requests: tuple[RequestCounts, ...] = ()

    @property
    def services(self) -> list[str]:
        return [row.service for row in self.requests]

    @property
    def in_flight(self) -> int:
        return sum(row.in_flight for row in self.handlers)

    def summary(self, service: str) -> str:
        """One ``key=value`` line of a service's counts (easy to grep and to parse)."""
        rows = [row for row in self.handlers if row.service == service]
        line = " ".join(f"{name}={sum(getattr(row, name) for row in rows)}" for name in COUNTED)
        for request in self.requests:
            if request.service == service and request.sent:
                line += (
                    f" requests_sent={request.sent} replied={request.replied} "
                    f"timed_out={request.timed_out} remote_errors={request.remote_errors}"
                )
        return line


# -- running in this process ------------------------------------------------------


@dataclass
class _Watched:
    """Counters captured when a service started: they outlive its stop, so totals stay true."""

    requests: RequestStats
    started_at: float
    consumers: list[tuple[HandlerCounts, ConsumerStats]] = field(default_factory=list)


class Runner:
    """Runs services in this process, in one task group, until a signal or ``request_stop``.

    Args:
        services: what to run; each is started, and stopped with ``grace``.
        grace: seconds in-flight handlers get to finish once a stop is asked.
        parent_pid: stop when this process stops being our parent (a worker
            whose supervisor died must not run on unsupervised).
        handle_signals: install SIGTERM/SIGINT handlers (off when embedding).
        abandon_after: seconds a forced stop may take before ``os._exit``;
            None never exits the process from under its owner.
        listeners: REST and gRPC servers to open once every service has
            started, and to close before any stops (``--http``, ``--grpc``).
    """

    def __init__(
        self,
        services: Sequence[Service],
        *,
        grace: float = 5.0,
        parent_pid: int | None = None,
        handle_signals: bool = True,
        abandon_after: float | None = ABANDON_AFTER,
        listeners: Listeners | None = None,
    ) -> None:
        if grace < 0:
            raise ConfigurationError(f"grace must be 0 or more seconds, got {grace}")
        self.services = list(services)
        self.grace = grace
        self.parent_pid = parent_pid
        self.handle_signals = handle_signals
        self.abandon_after = abandon_after
        self.state: State = "starting"
        self._watched: dict[int, _Watched] = {}
        self._stop = asyncio.Event()
        self._serving: list[asyncio.Task[None]] = []
        self._signals = 0
        self._forced: int | None = None
        self._failures: list[int] = []  # the exit code each failure asks for
        self._timers: list[asyncio.TimerHandle] = []
        self.listeners = listeners
        self._started = 0
        self._all_started = asyncio.Event()
        self._listeners_closed = asyncio.Event()
        if listeners is None or not listeners.wanted:
            self._listeners_closed.set()

    def snapshot(self) -> Snapshot:
        """The counters now (zeros for a service that has not started)."""
        handlers: list[HandlerCounts] = []
        requests: list[RequestCounts] = []
        for service in self.services:
            watched = self._watched.get(id(service))
            if watched is None:
                handlers.extend(row for row, _ in _rows(service))
                requests.append(RequestCounts(service.name))
                continue
            handlers.extend(
                replace(row, **{name: getattr(stats, name) for name in COUNTED})
                for row, stats in watched.consumers
            )
            r = watched.requests
            requests.append(
                RequestCounts(service.name, r.sent, r.replied, r.timed_out, r.remote_errors)
            )
        return Snapshot(self.state, self.grace, tuple(handlers), tuple(requests))

    def request_stop(self, reason: str) -> None:
        """Stop gracefully: no new messages, ``grace`` seconds for those in flight."""
        if self._stop.is_set():
            return
        in_flight = self.snapshot().in_flight
        self.state = "stopping"
        self._stop.set()
        for service in self.services:
            service.stop_taking(grace=self.grace)
        log.info(
            "stopping %d service(s) (%s): no new messages; %d handler(s) in flight get %.1f s",
            len(self.services),
            reason,
            in_flight,
            self.grace,
        )
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(self.grace, self._grace_over))
        self._timers.append(loop.call_later(self.grace + STOP_MARGIN, self._overdue))

    def force_stop(self, reason: str, *, code: int = EXIT_FORCED) -> None:
        """Cancel every handler now; their messages are handed back, brokers closed."""
        self._stop.set()
        if self._forced is not None:
            return
        self._forced = code
        self.state = "stopping"
        log.warning("forcing the stop (%s): cancelling running handlers", reason)
        for task in self._serving:
            task.cancel()
        if self.abandon_after is not None:
            loop = asyncio.get_running_loop()
            self._timers.append(loop.call_later(self.abandon_after, self._abandon))

    async def serve(self, *, watch: Watch | None = None, every: float = 0.25) -> int:
        """Run every service until stopped; returns the process exit code.

        Args:
            watch: called with a ``Snapshot`` every ``every`` seconds while the
                services run and once when they have stopped (a live table,
                or summary lines).
            every: seconds between ``watch`` calls.

        Returns:
            0 after a graceful stop, 130 after a forced one, 2 if a service's
            configuration is wrong, 1 if a service failed.
        """
        loop = asyncio.get_running_loop()
        if self.handle_signals:
            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            async with asyncio.TaskGroup() as tasks:
                self._serving = [
                    tasks.create_task(self._serve_one(service), name=f"serve {service.name}")
                    for service in self.services
                ]
                if watch is not None:
                    tasks.create_task(self._report(watch, every), name="report")
                if self.parent_pid is not None:
                    tasks.create_task(self._watch_parent(self.parent_pid), name="parent")
                if not self._listeners_closed.is_set():
                    tasks.create_task(self._listen(), name="listeners")
                self.state = "running"
                log.info(
                    "starting %d service(s) in pid %d on %s; SIGTERM or Ctrl-C stops "
                    "gracefully (grace %.1f s), a second one forces",
                    len(self.services),
                    os.getpid(),
                    running_loop_name(),
                    self.grace,
                )
        finally:
            if self.handle_signals:
                for sig in STOP_SIGNALS:
                    loop.remove_signal_handler(sig)
            for timer in self._timers:
                timer.cancel()
            self.state = "stopped"
        code = self._exit_code()
        log.info("all services stopped (exit %d)", code)
        return code

    def _exit_code(self) -> int:
        if self._forced is not None:
            return self._forced
        return max(self._failures, default=EXIT_OK)

    async def _serve_one(self, service: Service) -> None:
        starting = True
        try:
            try:
                await service.start()
                starting = False
                self._watch_counts(service)
                log.info("started %s: %s", service.name, _describe(service))
                self._started += 1
                if self._started == len(self.services):
                    self._all_started.set()
                await self._stop.wait()
                # Calls in flight finish before their services' brokers close.
                await self._listeners_closed.wait()
            except asyncio.CancelledError:
                if self._forced is not None:
                    raise
                # The service's own task group cancels this wait when one of its
                # tasks dies; stop() below raises that task's error. Stopping the
                # rest now also arms the stop deadline, in case stop() hangs.
                self.request_stop(f"a task of service {service.name} died")
            finally:
                # Forced while still waiting: the cancellation is spent, so say "now" here.
                await service.stop(grace=self.grace if self._forced is None else 0.0)
        except asyncio.CancelledError:
            if self._forced is None:
                raise
            log.warning("stopped %s by force: %s", service.name, self._totals(service))
            raise
        except Exception as exc:
            self._failed(service, exc, starting=starting)
        else:
            log.info("stopped %s: %s", service.name, self._totals(service))

    def _failed(self, service: Service, exc: Exception, *, starting: bool) -> None:
        leaves = list(_leaves(exc))
        config = starting and all(isinstance(e, ConfigurationError) for e in leaves)
        self._failures.append(EXIT_CONFIG if config else EXIT_FAILED)
        for leaf in leaves:
            if isinstance(leaf, WireworkError):
                log.error("service %s failed: %s", service.name, leaf)
            else:
                log.error("service %s failed", service.name, exc_info=leaf)
        self.request_stop(f"service {service.name} failed")

    def _watch_counts(self, service: Service) -> None:
        watched = _Watched(requests=service.request_stats, started_at=time.monotonic())
        for row, binding in _rows(service):
            # The consumer's own stats object: it keeps counting until the consumer
            # ends, and ``binding.stats`` reads as zeros once the service stopped.
            watched.consumers.append((row, binding.stats))
        self._watched[id(service)] = watched

    def _totals(self, service: Service) -> str:
        watched = self._watched.get(id(service))
        took = time.monotonic() - watched.started_at if watched else 0.0
        return f"{self.snapshot().summary(service.name)} after {took:.1f} s"

    async def _report(self, watch: Watch, every: float) -> None:
        try:
            while not all(task.done() for task in self._serving):
                watch(self.snapshot())
                await asyncio.wait(self._serving, timeout=every)
            self.state = "stopped"
            watch(self.snapshot())
        except Exception:
            # The view is not worth stopping the services for.
            log.exception("the progress display failed; the services keep running")

    async def _listen(self) -> None:
        """Open the listeners once every service runs; close them first when stopping."""
        listeners = self.listeners
        try:
            if listeners is None:
                return
            await wait_first(self._all_started, self._stop, clock=SYSTEM_CLOCK, pause=None)
            if self._stop.is_set():
                return
            try:
                await listeners.start()
            except WireworkError as exc:
                config = isinstance(exc, ConfigurationError)
                self._failures.append(EXIT_CONFIG if config else EXIT_FAILED)
                log.error("cannot open the listeners: %s", exc)
                self.request_stop("a listener failed")
                return
            try:
                await self._stop.wait()
            finally:
                await asyncio.shield(listeners.stop())
        finally:
            self._listeners_closed.set()

    async def _watch_parent(self, parent_pid: int) -> None:
        while not self._stop.is_set():
            if os.getppid() != parent_pid:
                log.error("supervisor (pid %d) is gone; stopping this worker", parent_pid)
                self.request_stop("supervisor gone")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PARENT_POLL)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            self.request_stop(name)
        elif self._signals == 2:
            self.force_stop(f"second signal, {name}")
        else:
            self._abandon()

    def _grace_over(self) -> None:
        left = self.snapshot().in_flight
        if left and self.state == "stopping":
            log.warning(
                "grace of %.1f s is over: cancelling %d running handler(s); their messages "
                "go back to the broker",
                self.grace,
                left,
            )

    def _overdue(self) -> None:
        log.error("services did not stop within grace + %.1f s", STOP_MARGIN)
        self.force_stop("stop overdue", code=EXIT_FAILED)

    def _abandon(self) -> None:
        log.critical("stop is stuck; exiting without cleaning up")
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stdout.flush()
        os._exit(self._forced if self._forced is not None else EXIT_FORCED)


def _rows(service: Service) -> list[tuple[HandlerCounts, Binding]]:
    """One zeroed row per consumer (topic and group), with the first binding that feeds it."""
    groups: dict[tuple[str, str], list[Binding]] = {}
    for binding in service.bindings:
        groups.setdefault((binding.topic, binding.group), []).append(binding)
    return [
        (
            HandlerCounts(
                service=service.name,
                kind="/".join(dict.fromkeys(b.kind for b in bindings)),
                topic=topic,
                group=group,
                handlers=", ".join(b.spec.name for b in bindings),
            ),
            bindings[0],
        )
        for (topic, group), bindings in groups.items()
    ]


def _describe(service: Service) -> str:
    handlers = "; ".join(binding.name for binding in service.bindings) or "no handlers"
    return f"{handlers} (broker {type(service.broker).__name__})"


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
