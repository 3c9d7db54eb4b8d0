"""The RabbitMQ backend's connection: opened lazily, re-opened with backoff, errors translated.

One AMQP connection per broker object carries everything: a confirming
channel for publishes, a plain one for declarations, one per subscription
(so that leaving a subscription hands its messages back by closing just that
channel), and short-lived ones for reads that may fail with 404 and take
their channel down. The confirming channel has a ``Window``: at most
``publish_window`` publishes sent and not yet confirmed, the rest waiting
their turn before they are sent.

A supervisor task keeps the connection open while the broker is: after a
loss it reconnects with exponential backoff and jitter, and tells every
listener (the subscriptions) so they re-attach by themselves. Callers either
fail at once while it is down (``wait=False``) or wait for it up to a
deadline. Client errors become wirework errors in one place, ``amqp_errors``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import aiormq
from aiormq import exceptions as amqp
from aiormq.abc import AbstractChannel, AbstractConnection
from yarl import URL

from wirework.errors import (
    BrokerClosedError,
    BrokerUnavailableError,
    ConfigurationError,
    DeadlineExceededError,
)

if TYPE_CHECKING:
    from wirework.brokers.rabbitmq import RabbitSettings

log = logging.getLogger("wirework.brokers.rabbitmq")

T = TypeVar("T")


class Spawner(Protocol):
    """Starts background work owned by the broker (cancelled by its ``aclose``)."""

    def __call__(self, work: Coroutine[Any, Any, T], /) -> asyncio.Task[T]: ...


#: Seconds a channel close may take before it is abandoned (the connection may be gone).
CLOSE_TIMEOUT = 2.0

#: Errors that mean "the connection or channel is gone": the operation did not happen here.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    amqp.AMQPConnectionError,
    amqp.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)

#: Everything aiormq raises for a failed operation (connection, channel or protocol level).
AMQP_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, amqp.AMQPError)

#: What ``amqp_errors`` turns into ``BrokerUnavailableError``; RuntimeError is aiormq's
#: "connection closed" when a channel is asked of a dead connection.
_UNAVAILABLE: tuple[type[BaseException], ...] = (*AMQP_ERRORS, RuntimeError)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs (RELIABILITY.md §3.6)."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


@contextlib.contextmanager
def amqp_errors(what: str, url: str) -> Iterator[None]:
    """Translate aiormq's errors into wirework's, saying what failed and what to do."""
    try:
        yield
    except amqp.ChannelPreconditionFailed as exc:
        raise ConfigurationError(
            f"{what}: RabbitMQ refused it ({exc}); the namespace's queues were created with "
            f"other settings (queue_type, partitions): use another namespace or purge this one"
        ) from exc
    except amqp.ChannelAccessRefused as exc:
        raise ConfigurationError(
            f"{what}: RabbitMQ refused access ({exc}); check the user's permissions "
            f"on the vhost of {redact(url)}"
        ) from exc
    except amqp.AuthenticationError as exc:
        raise ConfigurationError(
            f"{what}: RabbitMQ refused the credentials of {redact(url)}"
        ) from exc
    except _UNAVAILABLE as exc:
        raise BrokerUnavailableError(
            f"{what}: RabbitMQ at {redact(url)} is unreachable ({type(exc).__name__}: {exc}); "
            f"retry later"
        ) from exc


class Window:
    """At most ``size`` publishes sent and not yet confirmed; the others wait their turn
    before anything of them is written.

    Without it, a burst of thousands of publishes is written at once (one frame
    at a time, under aiormq's channel lock) and its confirms come back together,
    with every publish's ``publish_timeout`` already running: a message RabbitMQ
    did store is reported outcome-unknown only because of the queue in front of
    it. With it, that queue is here, before the send: a publish waiting its turn
    has written nothing, its own timeout is paused, and the confirm deadline
    starts when it is sent.

    A counter and a queue of futures rather than an ``asyncio.Semaphore`` in an
    async context manager: every publish passes here, and ``take`` (a place is
    free) is a plain call, where the semaphore's path cost a coroutine, a
    generator-based context manager and a scan of its waiters per publish. Places
    go to waiters first come, first served, handed over directly by ``give``.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take(self) -> bool:
        """Take a place now if one is free and nobody waits for one; False otherwise."""
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    def give(self) -> None:
        """Give a place back: to the longest waiting publish, else to the free ones."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    async def wait(self, until: float | None) -> float:
        """Wait for a place (held on return, to be given back); returns the seconds waited.

        Args:
            until: the latest moment (loop time) to wait: the message's own deadline;
                None waits as long as it takes (every place is given back within
                ``publish_timeout`` of its send).

        Raises:
            DeadlineExceededError: ``until`` passed first; nothing was sent.
        """
        if self.take():
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(until):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a place as this gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise DeadlineExceededError(
                    f"the message's deadline passed while it waited its turn behind "
                    f"{self.size} publishes awaiting RabbitMQ's confirms (publish_window); "
                    f"nothing was sent"
                ) from None
            raise
        return loop.time() - started


class Link:
    """One AMQP connection kept open by a supervisor task, and its shared channels.

    Args:
        url: ``amqp://user:pass@host:port/vhost`` without a query string.
        settings: connection and reconnection settings.
    """

    def __init__(
        self,
        url: str,
        settings: RabbitSettings,
        spawn: Spawner,
    ) -> None:
        self.url = url
        self._spawn = spawn
        self._target = str(URL(url).update_query(heartbeat=settings.heartbeat))
        self._settings = settings
        self.connection: AbstractConnection | None = None
        self.epoch = 0
        """Raised on every new connection; anything cached per connection compares it."""
        self._up = asyncio.Event()
        self._tried = asyncio.Event()
        self._last_error: BaseException | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._listeners: set[Callable[[], None]] = set()
        self._shared: dict[bool, AbstractChannel] = {}
        self._opening: dict[bool, asyncio.Task[None]] = {}
        self.window = Window(settings.publish_window)
        """The unconfirmed publishes in flight on the confirming channel (``Topology.send``)."""
        self.closed = False

    def listen(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` whenever the connection goes down or comes up; returns an undo."""
        self._listeners.add(callback)
        return lambda: self._listeners.discard(callback)

    @property
    def up(self) -> bool:
        return self.connection is not None and not self.connection.is_closed

    async def connected(self, *, wait: bool, timeout: float | None) -> AbstractConnection:
        """The open connection; raise at once (``wait=False``) or wait up to ``timeout``.

        The first call starts the supervisor and waits for its first attempt even
        when ``wait`` is false, as the broker is contacted on first use.

        Raises:
            BrokerClosedError: the broker was closed.
            BrokerUnavailableError: no connection (now, or within ``timeout``).
        """
        if self.closed:
            raise BrokerClosedError("the RabbitMQ broker was closed")
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        if not self._tried.is_set():
            first = self._settings.connect_timeout + 1.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(first if timeout is None else min(first, timeout)):
                    await self._tried.wait()
        while True:
            connection = self.connection
            if self.closed:
                raise BrokerClosedError("the RabbitMQ broker was closed")
            if connection is not None and not connection.is_closed:
                return connection
            if not wait:
                raise self._unavailable()
            try:
                async with asyncio.timeout(timeout):
                    await self._up.wait()
            except TimeoutError:
                raise self._unavailable(f" for {timeout}s") from None
            if self.connection is None or self.connection.is_closed:
                await asyncio.sleep(0.01)  # closed, and the supervisor has not noticed yet

    def _unavailable(self, waited: str = "") -> BrokerUnavailableError:
        cause = f" ({self._last_error!r})" if self._last_error is not None else ""
        return BrokerUnavailableError(
            f"RabbitMQ at {redact(self.url)} is unreachable{waited}{cause}; nothing was sent. "
            f"Retry later, or set on_disconnect='wait' to wait up to publish_timeout"
        )

    async def _supervise(self) -> None:
        backoff = self._settings.reconnect_initial_backoff
        warned = False  # one warning per outage; the retries after it are debug
        while not self.closed:
            try:
                async with asyncio.timeout(self._settings.connect_timeout):
                    connection = await aiormq.connect(self._target)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._last_error = exc
                self._tried.set()
                level = logging.DEBUG if warned else logging.WARNING
                log.log(level, "cannot connect to %s: %r; retrying", redact(self.url), exc)
                warned = True
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # jitter
                backoff = min(backoff * 2, self._settings.reconnect_max_backoff)
                continue
            if warned:
                log.warning("connected to %s again", redact(self.url))
            backoff = self._settings.reconnect_initial_backoff
            warned = False
            self.connection = connection
            self.epoch += 1
            self._shared.clear()
            self._up.set()
            self._tried.set()
            self._notify()
            await asyncio.wait([connection.closing])
            self._up.clear()
            self.connection = None
            self._last_error = _closing_error(connection)
            if not self.closed:
                log.warning("lost the connection to %s: %r", redact(self.url), self._last_error)
                warned = True
            self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def open_channel(self, *, confirms: bool) -> AbstractChannel | None:
        """The shared channel if it is open now, without a coroutine (every publish asks)."""
        channel = self._shared.get(confirms)
        return channel if channel is not None and not channel.is_closed else None

    async def channel(
        self, *, confirms: bool, wait: bool, timeout: float | None
    ) -> AbstractChannel:
        """The shared confirming (publish) or plain (declare) channel, reopened if it closed.

        Opening runs shielded: a caller cancelled meanwhile must not cancel the
        channel's opening half-way (aiormq then closes it, racing the next one).
        """
        channel = self._shared.get(confirms)
        if channel is not None and not channel.is_closed:
            return channel
        await self.connected(wait=wait, timeout=timeout)
        task = self._opening.get(confirms)
        if task is None:
            task = self._opening[confirms] = self._spawn(self._open_shared(confirms))
        await asyncio.shield(task)
        channel = self._shared.get(confirms)
        if channel is None or channel.is_closed:
            raise self._unavailable()
        return channel

    async def _open_shared(self, confirms: bool) -> None:
        try:
            connection = await self.connected(wait=False, timeout=None)
            with amqp_errors("opening a channel", self.url):
                self._shared[confirms] = await connection.channel(publisher_confirms=confirms)
        finally:
            self._opening.pop(confirms, None)

    @contextlib.asynccontextmanager
    async def private_channel(self, *, wait: bool = False) -> AsyncIterator[AbstractChannel]:
        """A channel of its own for the block (reads that may 404), closed afterwards."""
        connection = await self.connected(wait=wait, timeout=self._settings.publish_timeout)
        opening = self._spawn(self._open_private(connection))
        try:
            channel = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(self._close_orphan)
            raise
        try:
            yield channel
        finally:
            await self.close_channel(channel)

    async def _open_private(self, connection: AbstractConnection) -> AbstractChannel:
        with amqp_errors("opening a channel", self.url):
            return await connection.channel(publisher_confirms=False)

    async def close_channel(self, channel: AbstractChannel) -> None:
        """Close ``channel``, waiting at most ``CLOSE_TIMEOUT`` and never cancelling the close.

        A ``channel.close`` cancelled half-way makes aiormq send a second
        ``channel.close``, which RabbitMQ answers by closing the whole connection
        (CHANNEL_ERROR - expected 'channel.open'); so the close runs as background
        work, and a caller that is cancelled or gives up only stops waiting for it.
        """
        if channel.is_closed:
            return
        closing = self._spawn(_close(channel))
        await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT)

    def _close_orphan(self, opening: asyncio.Task[AbstractChannel]) -> None:
        """A channel opened for a caller that was cancelled meanwhile: close it."""
        if not opening.cancelled() and opening.exception() is None:
            self._spawn(_close(opening.result()))

    async def aclose(self) -> None:
        self.closed = True
        self._up.set()  # wake waiters; they see ``closed``
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await connection.close()
        self._notify()


def _closing_error(connection: AbstractConnection) -> BaseException | None:
    closing: Any = connection.closing
    if not closing.done() or closing.cancelled():
        return None
    exception: BaseException | None = closing.exception()
    return exception


async def _close(channel: AbstractChannel) -> None:
    """Close a channel whose connection may already be gone; errors mean it is closed."""
    with contextlib.suppress(Exception):
        await channel.close()
