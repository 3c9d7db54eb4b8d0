"""``Service``: typed handlers reached over queues, topics and request-reply.

A service is declared once (decorators), then run (``async with svc:`` or
``await svc.run()``, or ``wirework run module:svc``). Each decorated handler
becomes one ``Consumer`` of its group; they all run in the service's task
group and stop together, in-flight handlers first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

from pydantic import BaseModel

from wirework.brokers import connect
from wirework.brokers.base import (
    NAME_PATTERN,
    Broker,
    DeadLetterReason,
    Delivery,
    Failure,
    GroupAdmin,
    ReplyPath,
    Subscription,
    check_name,
)
from wirework.clock import SYSTEM_CLOCK, Clock
from wirework.consumer import (
    ConsumeMiddleware,
    Consumer,
    Incoming,
    RetryPolicy,
    Route,
    current_incoming,
)
from wirework.envelope import Envelope, decode_wire, encode_binary
from wirework.errors import (
    ConfigurationError,
    DecodeError,
    Expired,
    HandlerSignal,
)
from wirework.service.binding import Binding, Kind, Publish, PublishMiddleware
from wirework.service.context import Context
from wirework.service.endpoints import Endpoint, HttpMethod, IdempotencyMode, inspect_endpoint
from wirework.service.handlers import HandlerSpec, event_type, inspect_handler
from wirework.service.requests import (
    DEADLINE_EXTENSION,
    ERROR_EVENT_TYPE,
    Requester,
    RequestStats,
    deadline_passed,
    direct_sender,
    error_reply_body,
    reply_path,
)
from wirework.store import Store, Transaction, connect_store
from wirework.store.inbox import InboxStats, inbox_middleware
from wirework.store.outbox import Relay

log = logging.getLogger("wirework.service")

M = TypeVar("M", bound=BaseModel)
OutboxStamp = Callable[[str, Envelope], Envelope]
"""Rewrites an event (and its topic) as it is written to the outbox: see ``Transaction.stamp``."""

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])
E = TypeVar("E", bound=Callable[..., Any])
"""An endpoint handler: a coroutine function, or an async generator for a server stream."""


class Service:
    """A named service: its handlers, its broker, and the ways to reach others.

    Args:
        name: the service's name: the default group of its subscriptions and
            the ``source`` of what it publishes.
        broker: a ``Broker`` (the caller closes it), a URL (the service opens
            and closes it), or None to read ``WIREWORK_BROKER`` when started.
        clock: time for retries, leases and deadlines (a ``ManualClock`` in tests).
        shutdown_grace: seconds in-flight handlers get when the service stops.
        store: a ``Store`` (the caller closes it), a URL (the service opens and
            closes it), or None to read ``WIREWORK_STORE`` when a handler needs
            one (``idempotent=True``). A service with a store runs an outbox
            relay, so what ``tx.publish`` wrote reaches the broker.
        relay: run the outbox relay when the service has a store (default);
            turn it off where another process relays the same store.
    """

    def __init__(
        self,
        name: str,
        *,
        broker: Broker | str | None = None,
        clock: Clock | None = None,
        shutdown_grace: float = 5.0,
        store: Store | str | None = None,
        relay: bool = True,
    ) -> None:
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigurationError(
                f"invalid service name {name!r}: use 1-200 characters from A-Z a-z 0-9 . _ -"
            )
        self.name = name
        self.instance = uuid.uuid4().hex[:12]
        self.clock = clock or SYSTEM_CLOCK
        self.shutdown_grace = shutdown_grace
        self.bindings: list[Binding] = []
        self.endpoints: list[Endpoint] = []
        """REST and gRPC endpoints, served by ``wirework.http`` and ``wirework.grpc``."""
        self._broker_arg = broker
        self._broker: Broker | None = broker if isinstance(broker, Broker) else None
        self._owns_broker = not isinstance(broker, Broker)
        self._store_arg = store
        self._store: Store | None = store if isinstance(store, Store) else None
        self._owns_store = not isinstance(store, Store)
        self._relay_wanted = relay
        self._relay: Relay | None = None
        self.inbox_stats = InboxStats()
        """Claims, duplicates and rollbacks of this service's idempotent handlers."""
        self._providers: dict[type[Any], Callable[[], Any]] = {}
        self._overrides: dict[type[Any], Any] = {}
        self._provided: dict[type[Any], Any] = {}
        """Values made by providers, once each, kept apart from test overrides."""
        self._consume_middleware: list[ConsumeMiddleware] = []
        self._publish_middleware: list[PublishMiddleware] = []
        self._publish_app: Publish | None = None
        self._reply_app: tuple[Broker, ReplyPath | None, Publish | None] | None = None
        """For the broker it was made for: its direct reply path and the publish
        middleware around it (made once: the protocol check and the chain cost ~50 us)."""
        self._requester: Requester | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._stopped = asyncio.Event()
        self._outbox_stamps: list[OutboxStamp] = []

    # -- declaring ----------------------------------------------------------------

    def consume(
        self,
        queue: str,
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
        lease_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        idempotent: bool = False,
    ) -> Callable[[H], H]:
        """Handle commands on ``queue``; every instance of every service competes for them.

        ``idempotent=True`` runs the handler under the inbox: inside a store
        transaction (``ctx.tx``) that also records (group, message id), so a
        redelivered copy is acked without running the handler again.
        """
        return self._bind(
            "consume",
            queue,
            queue,
            concurrency,
            prefetch,
            lease_timeout,
            retry,
            idempotent=idempotent,
        )

    def subscribe(
        self,
        topic: str,
        *,
        group: str | None = None,
        concurrency: int = 1,
        prefetch: int | None = None,
        lease_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        start: Literal["earliest", "latest"] = "earliest",
        idempotent: bool = False,
    ) -> Callable[[H], H]:
        """Get a copy of every event on ``topic`` for ``group`` (default: the service name).

        ``idempotent=True``: as for ``consume``, once per group.
        """
        return self._bind(
            "subscribe",
            topic,
            group or self.name,
            concurrency,
            prefetch,
            lease_timeout,
            retry,
            start,
            idempotent=idempotent,
        )

    def respond(
        self,
        subject: str,
        *,
        concurrency: int = 8,
        prefetch: int | None = None,
        lease_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> Callable[[H], H]:
        """Answer requests on ``subject``; the handler's return value is the reply.

        A handler exception becomes an error reply (the caller's ``RemoteError``)
        at once; by default a request is tried once (``max_attempts=1``), since
        its caller waits against a deadline.
        """
        return self._bind(
            "respond",
            subject,
            subject,
            concurrency,
            prefetch,
            lease_timeout,
            retry or RetryPolicy(max_attempts=1),
        )

    def _bind(
        self,
        kind: Kind,
        topic: str,
        group: str,
        concurrency: int,
        prefetch: int | None,
        lease_timeout: float,
        retry: RetryPolicy | None,
        start: Literal["earliest", "latest"] = "earliest",
        *,
        idempotent: bool = False,
    ) -> Callable[[H], H]:
        check_name("topic", topic)
        check_name("group", group)

        def decorate(function: H) -> H:
            spec = inspect_handler(function, context_type=Context)
            if kind == "respond" and spec.returns is None:
                raise ConfigurationError(
                    f"responder {spec.name} must declare its reply model as the return "
                    f"annotation, e.g. `-> Reserved`"
                )
            for other in self.bindings:
                if (other.topic, other.group) == (topic, group) and (
                    event_type(other.spec.body_model) == event_type(spec.body_model)
                ):
                    raise ConfigurationError(
                        f"{spec.name} and {other.spec.name} both handle "
                        f"{event_type(spec.body_model)!r} on {topic}/{group}"
                    )
            self.bindings.append(
                Binding(
                    kind=kind,
                    topic=topic,
                    group=group,
                    spec=spec,
                    concurrency=concurrency,
                    prefetch=prefetch or max(10, concurrency),
                    lease_timeout=lease_timeout,
                    retry=retry or RetryPolicy(),
                    start=start,
                    idempotent=idempotent,
                )
            )
            return function

        return decorate

    # -- synchronous endpoints (REST and gRPC) ----------------------------------------

    def get(self, path: str, **options: Any) -> Callable[[E], E]:
        """Answer ``GET path`` over REST, and the same handler over gRPC (see ``endpoint``)."""
        return self.endpoint("GET", path, **options)

    def post(self, path: str, **options: Any) -> Callable[[E], E]:
        """Answer ``POST path``; not retried by clients unless it carries an Idempotency-Key."""
        return self.endpoint("POST", path, **options)

    def put(self, path: str, **options: Any) -> Callable[[E], E]:
        return self.endpoint("PUT", path, **options)

    def patch(self, path: str, **options: Any) -> Callable[[E], E]:
        return self.endpoint("PATCH", path, **options)

    def delete(self, path: str, **options: Any) -> Callable[[E], E]:
        return self.endpoint("DELETE", path, **options)

    def endpoint(
        self,
        method: HttpMethod,
        path: str,
        *,
        name: str | None = None,
        status_code: int | None = None,
        http: bool = True,
        grpc: bool = True,
        idempotent: bool | None = None,
        idempotency: IdempotencyMode | None = None,
    ) -> Callable[[E], E]:
        """Declare a synchronous endpoint, served over REST (``http``) and gRPC (``grpc``).

        Args:
            name: the gRPC method name (default: the function name in CamelCase).
            status_code: the HTTP status of a success (default 200, 204 without a body).
            idempotent: whether a client may retry the call without an
                Idempotency-Key (default: GET, PUT and DELETE are, POST and PATCH not).
            idempotency: ``"off"``, ``"optional"`` or ``"required"``: whether the
                REST binding stores answers by ``Idempotency-Key`` and replays them
                (``wirework.http.idempotency``; default: optional for unary POST
                and PATCH, off otherwise).
        """

        def decorate(function: E) -> E:
            endpoint = inspect_endpoint(
                function,
                method=method,
                path=path,
                name=name,
                status_code=status_code,
                http=http,
                grpc=grpc,
                idempotent=idempotent,
                idempotency=idempotency,
            )
            for other in self.endpoints:
                if other.name == endpoint.name:
                    raise ConfigurationError(
                        f"{endpoint.qualname} and {other.qualname} are both named "
                        f"{endpoint.name!r} (the gRPC method name); pass name=... to one"
                    )
                if (other.method, other.path) == (method, path):
                    raise ConfigurationError(
                        f"{endpoint.qualname} and {other.qualname} both answer {method} {path}"
                    )
            self.endpoints.append(endpoint)
            return function

        return decorate

    def resolve(self, kind: type[Any], needed_by: str) -> Any:
        """The value of a dependency typed ``kind`` (an override, else the provider's)."""
        if kind in self._overrides:
            return self._overrides[kind]
        if kind in self._provided:
            return self._provided[kind]
        factory = self._providers.get(kind)
        if factory is None:
            raise ConfigurationError(
                f"handler {needed_by} needs a {kind.__name__}, which service {self.name!r} "
                f"does not provide; call service.provide({kind.__name__}, factory)"
            )
        value = self._provided[kind] = factory()
        return value

    def provide(self, kind: type[M] | type[Any], factory: Callable[[], Any]) -> None:
        """Make ``factory()`` (called once, lazily) the value of parameters typed ``kind``."""
        self._providers[kind] = factory

    def override(self, kind: type[Any], value: Any) -> None:
        """Use ``value`` for parameters typed ``kind`` (tests swap dependencies with this)."""
        self._overrides[kind] = value

    def overrides(self) -> dict[type[Any], Any]:
        """A copy of the current overrides, to hand back to ``reset_overrides`` later."""
        return dict(self._overrides)

    def reset_overrides(self, saved: Mapping[type[Any], Any] | None = None) -> None:
        """Drop every override, then apply ``saved`` (from ``overrides()``) if given."""
        self._overrides = dict(saved or {})

    def use(self, middleware: ConsumeMiddleware) -> None:
        """Wrap every handler of this service in ``middleware`` (outermost first)."""
        self._consume_middleware.append(middleware)

    def use_publish(self, middleware: PublishMiddleware) -> None:
        """Wrap everything this service publishes in ``middleware`` (outermost first)."""
        self._publish_middleware.append(middleware)
        self._publish_app = self._reply_app = None

    def remove_publish(self, middleware: PublishMiddleware) -> None:
        """Unwrap a publish middleware added with ``use_publish``; absent: no error."""
        if middleware in self._publish_middleware:
            self._publish_middleware.remove(middleware)
            self._publish_app = self._reply_app = None

    def remove(self, middleware: ConsumeMiddleware) -> None:
        """Unwrap a consume middleware added with ``use``; takes effect at the next start."""
        if middleware in self._consume_middleware:
            self._consume_middleware.remove(middleware)

    def use_outbox_stamp(self, stamp: OutboxStamp) -> None:
        """Apply ``stamp`` to every event this service writes to the outbox (tracing does)."""
        self._outbox_stamps.append(stamp)

    def remove_outbox_stamp(self, stamp: OutboxStamp) -> None:
        if stamp in self._outbox_stamps:
            self._outbox_stamps.remove(stamp)

    def stamp_outbox(self, tx: Transaction) -> Transaction:
        """Make ``tx``'s outbox events this service's: their source and its stamps."""
        tx.default_source = f"/{self.name}"
        stamps = tuple(self._outbox_stamps)
        if stamps:

            def stamp(topic: str, envelope: Envelope) -> Envelope:
                for each in stamps:
                    envelope = each(topic, envelope)
                return envelope

            tx.stamp = stamp
        return tx

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """``async with svc.transaction() as tx:`` a transaction of this service's store.

        As ``svc.store.transaction()``, but events written with ``tx.publish``
        are this service's (their ``source``) and carry the caller's trace
        context when the service is traced, as ``ctx.tx`` events do.
        """
        async with self.store.transaction() as tx:
            yield self.stamp_outbox(tx)

    def use_broker(self, broker: Broker | str | None) -> Broker | str | None:
        """Point a stopped service at another broker (tests swap in ``memory://`` with this).

        A ``Broker`` passed here is the caller's to close; a URL is opened on first
        use. Returns the setting it replaced, so the caller can put it back.
        """
        if self._tasks is not None:
            raise ConfigurationError(f"stop service {self.name!r} before changing its broker")
        if self._owns_broker and self._broker is not None:
            raise ConfigurationError(
                f"service {self.name!r} still holds the broker it opened; stop it first"
            )
        previous = self._broker_arg
        self._broker_arg = broker
        self._broker = broker if isinstance(broker, Broker) else None
        self._owns_broker = not isinstance(broker, Broker)
        return previous

    def use_store(self, store: Store | str | None) -> Store | str | None:
        """Point a stopped service at another store (a URL, or a ``Store`` the caller closes).

        Returns the setting it replaced, so the caller can put it back.
        """
        if self._tasks is not None:
            raise ConfigurationError(f"stop service {self.name!r} before changing its store")
        if self._owns_store and self._store is not None:
            raise ConfigurationError(
                f"service {self.name!r} still holds the store it opened; stop it first"
            )
        previous = self._store_arg
        self._store_arg = store
        self._store = store if isinstance(store, Store) else None
        self._owns_store = not isinstance(store, Store)
        return previous

    def use_clock(self, clock: Clock) -> Clock:
        """Give a stopped service another clock; returns the one it replaced."""
        if self._tasks is not None:
            raise ConfigurationError(f"stop service {self.name!r} before changing its clock")
        previous, self.clock = self.clock, clock
        return previous

    # -- reaching others ----------------------------------------------------------

    @property
    def broker(self) -> Broker:
        """The broker, opened from the URL (or ``WIREWORK_BROKER``) on first use."""
        if self._broker is None:
            url = self._broker_arg if isinstance(self._broker_arg, str) else None
            url = url or os.environ.get("WIREWORK_BROKER")
            if not url:
                raise ConfigurationError(
                    f"service {self.name!r} has no broker: pass broker='sqlite:///app.db' "
                    f"(or a Broker) to Service(), or set WIREWORK_BROKER"
                )
            self._broker = connect(url, clock=self.clock)
        return self._broker

    @property
    def store(self) -> Store:
        """The store, opened from the URL (or ``WIREWORK_STORE``) on first use."""
        if self._store is None:
            url = self._store_arg if isinstance(self._store_arg, str) else None
            url = url or os.environ.get("WIREWORK_STORE")
            if not url:
                raise ConfigurationError(
                    f"service {self.name!r} has no store: pass store='sqlite:///app.db' "
                    f"(or a Store) to Service(), or set WIREWORK_STORE; idempotent handlers "
                    f"and the outbox keep their records there"
                )
            self._store = connect_store(url)
        return self._store

    def _uses_store(self) -> bool:
        """Whether start() opens the store and runs its relay.

        ``WIREWORK_STORE`` counts: a deployment that names a store may write to
        its outbox from outside any handler (``svc.store.transaction()``), and
        those rows need this service's relay as much as ``ctx.tx`` rows do.
        """
        return (
            self._store_arg is not None
            or self._store is not None
            or bool(os.environ.get("WIREWORK_STORE"))
            or any(b.idempotent for b in self.bindings)
        )

    def envelope(
        self,
        body: BaseModel,
        *,
        key: str | None = None,
        replyto: str | None = None,
        extensions: dict[str, str] | None = None,
    ) -> Envelope:
        """The envelope this service would publish ``body`` in, lineage included.

        Inside a handler the new event is caused by the handled message and
        shares its correlation; outside one it starts a new correlation.
        """
        incoming = current_incoming.get()
        causation = incoming.envelope if incoming is not None else None
        return Envelope.new(
            event_type(type(body)),
            body,
            source=f"/{self.name}",
            key=key,
            replyto=replyto,
            causationid=causation.id if causation else None,
            correlationid=(causation.correlationid or causation.id) if causation else None,
            time=self.clock.now(),
            extensions=extensions or None,
        )

    async def publish(
        self, topic: str, event: BaseModel, *, key: str | None = None, delay: float = 0.0
    ) -> Envelope:
        """Publish an event to every group of ``topic``; returns the envelope sent."""
        envelope = self.envelope(event, key=key)
        await self.publish_envelope(topic, envelope, key=key, delay=delay)
        return envelope

    async def send(
        self, queue: str, command: BaseModel, *, key: str | None = None, delay: float = 0.0
    ) -> Envelope:
        """Send a command to ``queue`` (a topic read by one group); returns the envelope."""
        return await self.publish(queue, command, key=key, delay=delay)

    async def publish_envelope(
        self, topic: str, envelope: Envelope, *, key: str | None = None, delay: float = 0.0
    ) -> None:
        """Publish a ready-made envelope through this service's publish middleware."""
        if self._publish_app is None:
            app: Publish = self._publish_raw
            for layer in reversed(self._publish_middleware):
                app = layer(app)
            self._publish_app = app
        await self._publish_app(topic, envelope, key, delay)

    async def _publish_raw(
        self, topic: str, envelope: Envelope, key: str | None, delay: float
    ) -> None:
        await self.broker.publish(topic, encode_binary(envelope), key=key, delay=delay)

    @overload
    async def request(
        self, subject: str, body: BaseModel, *, returns: type[M], timeout: float
    ) -> M: ...

    @overload
    async def request(
        self, subject: str, body: BaseModel, *, returns: None = None, timeout: float
    ) -> Envelope: ...

    async def request(
        self,
        subject: str,
        body: BaseModel,
        *,
        returns: type[M] | None = None,
        timeout: float,
    ) -> M | Envelope:
        """Ask a responder on ``subject`` and wait at most ``timeout`` seconds for the reply.

        Returns the reply parsed as ``returns`` (or its envelope).

        Raises:
            RequestTimeoutError: no reply by the deadline.
            RemoteError: the responder raised, or dead-lettered the request.
            TooManyPendingRequestsError: too many requests wait on this instance.
        """
        requester = self._running_requester()
        deadline = self.clock.now() + timedelta(seconds=timeout)
        envelope = self.envelope(
            body,
            replyto=requester.reply_address,
            extensions={DEADLINE_EXTENSION: deadline.isoformat()},
        )
        reply = await requester.request(subject, envelope, timeout)
        return reply.decode(returns) if returns is not None else reply

    def _running_requester(self) -> Requester:
        if self._requester is None:
            raise ConfigurationError(
                f"service {self.name!r} is not running: requests need its reply inbox, so "
                f"call request() inside `async with service:` (or from a handler)"
            )
        return self._requester

    @property
    def request_stats(self) -> RequestStats:
        return self._requester.stats if self._requester is not None else RequestStats()

    # -- running ------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def declare(self) -> None:
        """Create this service's groups on the broker without consuming from them.

        What is sent to them from now on waits for the service, however late it
        starts: a deployment step, or workers brought up after the work queued.
        ``start`` declares them too; calling both is harmless.
        """
        broker = self.broker
        if isinstance(broker, GroupAdmin):
            for (topic, group), bindings in self._groups().items():
                await broker.declare_group(self._subscription(topic, group, bindings))

    async def start(self) -> None:
        """Open the broker, declare every group, and start the consumers and the reply reader.

        The consumers run in a task group entered by the calling task: if one
        fails for good (a permanent broker error), that task is cancelled and
        ``stop()`` raises the failure, as ``async with service:`` would.
        """
        if self._tasks is not None:
            raise ConfigurationError(f"service {self.name!r} is already running")
        broker = self.broker
        store = self.store if self._uses_store() else None
        if store is not None:
            await store.open()  # migrations run now, not inside the first handler
        requester = Requester(
            broker,
            reply_topic=f"wirework.reply.{self.name}.{self.instance}",
            clock=self.clock,
            publish=lambda topic, envelope: self.publish_envelope(topic, envelope),
        )
        consumers = [
            (self._consumer(topic, group, bindings), bindings)
            for (topic, group), bindings in self._groups().items()
        ]
        # The reply inbox (or topic) and the groups exist before start() returns: a
        # request's reply, and what is published next, reach them.
        await requester.open()
        try:
            if isinstance(broker, GroupAdmin):
                for consumer, _ in consumers:
                    await broker.declare_group(consumer.subscription)
        except BaseException:
            await asyncio.shield(requester.close())
            raise
        tasks = asyncio.TaskGroup()
        await tasks.__aenter__()
        self._tasks = tasks
        self._requester = requester
        self._stopped.clear()
        tasks.create_task(requester.run(), name=f"{self.name} replies")
        for consumer, bindings in consumers:
            for binding in bindings:
                binding.consumer = consumer
            where = f"{consumer.subscription.topic}/{consumer.subscription.group}"
            tasks.create_task(consumer.run(), name=f"{self.name} {where}")
        if store is not None and self._relay_wanted:
            self._relay = Relay(store, broker)
            tasks.create_task(self._relay.run(), name=f"{self.name} outbox relay")

    def stop_taking(self, *, grace: float | None = None) -> None:
        """No handler starts after this returns; ``stop`` then finishes the job."""
        grace = self.shutdown_grace if grace is None else grace
        for binding in self.bindings:
            if binding.consumer is not None:
                binding.consumer.stop_taking(grace=grace)

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop taking messages, let in-flight handlers finish within ``grace``, close."""
        tasks = self._tasks
        if tasks is None:
            return
        grace = self.shutdown_grace if grace is None else grace
        consumers = {id(b.consumer): b.consumer for b in self.bindings if b.consumer is not None}
        try:
            await asyncio.gather(*(c.stop(grace=grace) for c in consumers.values()))
            if self._relay is not None:
                await self._relay.stop()  # after the handlers: it relays what they wrote
        finally:
            for task in list(getattr(tasks, "_tasks", ())):
                task.cancel()
            try:
                await tasks.__aexit__(None, None, None)
            finally:
                self._tasks = None
                if self._requester is not None:
                    # Its task may have been cancelled before it ever ran (a quick stop), and
                    # then never removed the inbox: close() is idempotent, so always call it.
                    await asyncio.shield(self._requester.close())
                self._requester = None
                for binding in self.bindings:
                    if binding.consumer is not None:
                        binding.last_stats = binding.consumer.stats
                    binding.consumer = None
                self._relay = None
                try:
                    if self._owns_broker and self._broker is not None:
                        await self._broker.aclose()
                        self._broker = None
                finally:
                    if self._owns_store and self._store is not None:
                        await self._store.aclose()
                        self._store = None
                    self._stopped.set()

    async def run(self) -> None:
        """Run until ``stop()`` is called (from a signal handler, say)."""
        await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    # -- wiring handlers into consumers ---------------------------------------------

    def _groups(self) -> dict[tuple[str, str], list[Binding]]:
        groups: dict[tuple[str, str], list[Binding]] = {}
        for binding in self.bindings:
            groups.setdefault((binding.topic, binding.group), []).append(binding)
        return groups

    @staticmethod
    def _subscription(topic: str, group: str, bindings: Sequence[Binding]) -> Subscription:
        first = bindings[0]
        concurrency = max(b.concurrency for b in bindings)
        return Subscription(
            topic=topic,
            group=group,
            prefetch=max(max(b.prefetch for b in bindings), concurrency),
            lease_timeout=first.lease_timeout,
            start=first.start,
        )

    def _consumer(self, topic: str, group: str, bindings: Sequence[Binding]) -> Consumer:
        first = bindings[0]
        concurrency = max(b.concurrency for b in bindings)
        routes = [
            Route(event_type(b.spec.body_model), b.spec.body_model, self._handler(b))
            for b in bindings
        ]
        middleware = list(self._consume_middleware)
        idempotent = {event_type(b.spec.body_model) for b in bindings if b.idempotent}
        if idempotent:
            # Innermost, so only the handler runs inside the inbox's transaction.
            middleware.append(
                inbox_middleware(
                    self.store,
                    group,
                    stats=self.inbox_stats,
                    when=lambda incoming: incoming.route.event_type in idempotent,
                )
            )
        responding = any(b.kind == "respond" for b in bindings)
        return Consumer(
            self.broker,
            self._subscription(topic, group, bindings),
            routes=routes,
            retry=first.retry,
            concurrency=concurrency,
            middleware=middleware,
            on_dead_letter=self._answer_dead_letter if responding else None,
            clock=self.clock,
        )

    def _handler(self, binding: Binding) -> Callable[[BaseModel, Envelope], Awaitable[None]]:
        spec = binding.spec

        async def handle(body: BaseModel, envelope: Envelope) -> None:
            incoming = current_incoming.get()
            arguments = self._arguments(spec, body, envelope, binding, incoming)
            if binding.kind != "respond":
                await spec.function(**arguments)
                return
            if deadline_passed(envelope, self.clock.now()):
                raise Expired(f"request {envelope.id} arrived after its deadline")
            try:
                result = await spec.function(**arguments)
            except HandlerSignal:
                raise
            except Exception as exc:
                log.info("responder %s failed on %s: %r", spec.name, envelope.id, exc)
                await self._reply_error(envelope, "handler_error", Failure.from_exception(exc))
                return
            if envelope.replyto:
                await self._send_reply(envelope.replyto, self.envelope(result))

        return handle

    def _arguments(
        self,
        spec: HandlerSpec,
        body: BaseModel,
        envelope: Envelope,
        binding: Binding,
        incoming: Incoming | None,
    ) -> dict[str, Any]:
        arguments: dict[str, Any] = {spec.body_name: body}
        if spec.context_name is not None:
            delivery = incoming.delivery if incoming is not None else None
            arguments[spec.context_name] = Context(
                service=self,
                envelope=envelope,
                topic=binding.topic,
                group=binding.group,
                attempt=delivery.attempt if delivery is not None else 1,
                headers=delivery.message.headers if delivery is not None else {},
            )
        for name, kind in spec.dependencies.items():
            arguments[name] = self.resolve(kind, spec.name)
        return arguments

    async def _reply_error(self, request: Envelope, reason: str, failure: Failure) -> None:
        if not request.replyto:
            return
        reply = self.envelope(error_reply_body(reason, failure))
        reply = reply.model_copy(update={"type": ERROR_EVENT_TYPE})
        await self._send_reply(request.replyto, reply)

    async def _send_reply(self, replyto: str, reply: Envelope) -> None:
        """Answer through the caller's direct inbox when ``replyto`` is one of this broker's,
        else on the reply topic it names (a caller without a direct inbox, or an older one).

        Either way the reply passes through the publish middleware.
        """
        broker = self.broker
        if self._reply_app is None or self._reply_app[0] is not broker:
            path = reply_path(broker)
            app: Publish | None = None
            if path is not None:
                app = direct_sender(path)
                for layer in reversed(self._publish_middleware):
                    app = layer(app)
            self._reply_app = (broker, path, app)
        _, path, app = self._reply_app
        if path is not None and app is not None and path.is_direct_address(replyto):
            await app(replyto, reply, None, 0.0)
        elif NAME_PATTERN.fullmatch(replyto):
            await self.publish_envelope(replyto, reply)
        else:
            log.warning(
                "cannot answer request %s: replyto %r is neither a topic nor a reply inbox "
                "of this broker (a caller on another backend?)",
                reply.causationid,
                replyto,
            )

    async def _answer_dead_letter(
        self, delivery: Delivery, reason: DeadLetterReason, failure: Failure
    ) -> None:
        """A dead-lettered request still gets an answer: an error reply, never silence."""
        try:
            request = decode_wire(delivery.message)
        except DecodeError:
            headers = {k.lower(): v for k, v in delivery.message.headers.items()}
            replyto, request_id = headers.get("ce-replyto"), headers.get("ce-id")
            if not (replyto and request_id):
                return
            request = Envelope(id=request_id, source="/unknown", type="unknown", replyto=replyto)
        if not request.replyto:
            return
        token = current_incoming.set(
            Incoming(delivery=delivery, envelope=request, route=_NO_ROUTE, body=_EMPTY)
        )
        try:
            await self._reply_error(request, reason.value, failure)
        finally:
            current_incoming.reset(token)


class _Empty(BaseModel):
    pass


async def _no_handler(body: BaseModel, envelope: Envelope) -> None:
    return None


_EMPTY = _Empty()
_NO_ROUTE: Route[Any] = Route(None, _Empty, _no_handler)
