"""Hand ended spans to an exporter in batches, on a thread of its own, never blocking.

OpenTelemetry's ``BatchSpanProcessor`` does the same job, but when its queue
is full it silently drops the oldest span and counts only through an opt-in
meter. A handler must never wait for tracing, and an operator must be able to
see what tracing lost, so this one refuses the newest span when full and
counts it in ``stats.dropped``; ``force_flush`` waits for what was queued.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import TraceFlags

from wirework.errors import ConfigurationError
from wirework.tracing.lean import EndedSpan

log = logging.getLogger("wirework.tracing")

DEFAULT_QUEUE_SIZE = 8192
DEFAULT_BATCH_SIZE = 512
DEFAULT_SCHEDULE_DELAY = 0.5


@dataclass
class ExportStats:
    """Counts since start: spans queued, exported, refused (queue full) and lost to errors."""

    queued: int = 0
    exported: int = 0
    dropped: int = 0
    failed: int = 0


class BatchProcessor(SpanProcessor):
    """Batches sampled spans for ``exporter``: at most ``max_queue_size`` wait at once.

    Args:
        exporter: where batches go, called on this processor's thread only.
        max_queue_size: spans that may wait; the next ones are dropped and counted.
        max_batch_size: spans handed to the exporter in one call.
        schedule_delay: seconds between exports when the queue is not full of a batch.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int = DEFAULT_QUEUE_SIZE,
        max_batch_size: int = DEFAULT_BATCH_SIZE,
        schedule_delay: float = DEFAULT_SCHEDULE_DELAY,
    ) -> None:
        if max_queue_size < 1 or max_batch_size < 1 or schedule_delay <= 0:
            raise ConfigurationError(
                f"span batching needs a positive queue size, batch size and delay; got "
                f"{max_queue_size}, {max_batch_size}, {schedule_delay}"
            )
        self.exporter = exporter
        self.stats = ExportStats()
        self._max_queue = max_queue_size
        self._max_batch = min(max_batch_size, max_queue_size)
        self._delay = schedule_delay
        self._queue: deque[ReadableSpan | EndedSpan] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        self._handled = 0  # spans taken off the queue and exported (or failed)
        self._flushing = 0
        self._closed = False
        self._users = 1  # providers that shut this down; the last one closes it
        self._thread = self._start_thread()
        if hasattr(os, "register_at_fork"):
            # A forked worker has no exporting thread: give it one and a clean queue.
            restart = weakref.WeakMethod(self._after_fork)
            os.register_at_fork(after_in_child=lambda: (r := restart()) and r())

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(
            target=self._run, name=f"wirework-spans-{type(self.exporter).__name__}", daemon=True
        )
        thread.start()
        return thread

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        self._queue.clear()
        self.stats = ExportStats()
        self._handled = 0
        self._flushing = 0
        if not self._closed:
            self._thread = self._start_thread()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        # Runs for every span on the handler's thread: the flags by tuple index, one len().
        context = span.context
        if context is None or not context[3] & TraceFlags.SAMPLED:
            return
        self.put(span)

    def put(self, ended: ReadableSpan | EndedSpan) -> None:
        """Queue a span for export, sampled already: a ``LeanSpan`` ends into this."""
        queue = self._queue
        with self._lock:
            waiting = len(queue)
            if waiting >= self._max_queue or self._closed:
                self.stats.dropped += 1
                return
            queue.append(ended)
            self.stats.queued += 1
            if waiting + 1 >= self._max_batch:
                self._wake.notify()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export everything queued so far; False if that took longer than the timeout."""
        deadline = time.monotonic() + timeout_millis / 1000
        with self._lock:
            target = self.stats.queued
            self._flushing += 1
            self._wake.notify()
            try:
                while self._handled < target and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._progress.wait(remaining)
                return self._handled >= target
            finally:
                self._flushing -= 1

    def share(self) -> bool:
        """One more provider hands its spans here (False: closed, make another).

        Each provider's ``shutdown`` shuts this processor down; shared, each but
        the last only exports what is queued, and the last one closes it.
        """
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def shutdown(self) -> None:
        """Export what is queued (up to 30 s); then, unless another provider still
        uses this processor (``share``), stop the thread and shut the exporter down."""
        with self._lock:
            if self._closed:
                return
            self._users -= 1
            last = self._users <= 0
        self.force_flush()
        if not last:
            return
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self.exporter.shutdown()

    def _run(self) -> None:
        while True:
            with self._lock:
                full = len(self._queue) >= self._max_batch
                if not (self._closed or full or (self._flushing and self._queue)):
                    self._wake.wait(self._delay)
                if self._closed and not self._queue:
                    self._progress.notify_all()
                    return
                size = min(self._max_batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(size)]
            if batch:
                self._export(batch)
            with self._lock:
                self._handled += len(batch)
                self._progress.notify_all()

    def _export(self, batch: list[ReadableSpan | EndedSpan]) -> None:
        try:
            # EndedSpan-s are put only by lean providers, whose one exporter is the store's.
            result = self.exporter.export(batch)  # type: ignore[arg-type]
        except Exception:
            log.exception("span exporter %s failed", type(self.exporter).__name__)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.stats.exported += len(batch)
            return
        self.stats.failed += len(batch)
        if self.stats.failed == len(batch) or self.stats.failed % 10_000 < len(batch):
            log.warning(
                "span exporter %s lost %d spans (%d so far)",
                type(self.exporter).__name__,
                len(batch),
                self.stats.failed,
            )
