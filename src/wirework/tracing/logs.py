"""Log records that name their trace: trace id, span id and correlation id on every line.

``TraceContextFilter`` puts the three on each record (empty strings outside a
span or handler), so any formatter can print them; ``JsonFormatter`` writes
one JSON object per line, which is what a log shipper wants and what keeps a
CRLF in a message from forging a second line (RELIABILITY.md §3.4).
``configure_logging`` chooses JSON when stderr is not a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace

from wirework.consumer import current_incoming

TEXT_FORMAT = (
    "%(asctime)s %(levelname)-7s %(name)s [trace=%(trace_id)s span=%(span_id)s "
    "correlation=%(correlation_id)s] %(message)s"
)

# Attributes every LogRecord has; anything else was passed in ``extra=`` and is kept.
_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "trace_id", "span_id", "correlation_id", "taskName"}
)


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id``, ``span_id`` and ``correlation_id`` to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = f"{span_context.trace_id:032x}"
            record.span_id = f"{span_context.span_id:016x}"
        else:
            record.trace_id = record.span_id = ""
        incoming = current_incoming.get()
        record.correlation_id = (
            (incoming.envelope.correlationid or incoming.envelope.id) if incoming else ""
        )
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the trace fields, extras."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("trace_id", "span_id", "correlation_id"):
            value = getattr(record, name, "")
            if value:
                document[name] = value
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str, ensure_ascii=False)


_installed: logging.Handler | None = None


def configure_logging(
    *, json: bool | None = None, level: int | str = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Log to ``stream`` (stderr) from the root logger, with the trace fields on every line.

    Args:
        json: JSON lines (True), text (False), or JSON unless ``stream`` is a terminal (None).
        level: the root logger's level.
        stream: where lines go.

    Calling it again replaces the handler it installed before; returns the handler.
    """
    global _installed
    target = stream if stream is not None else sys.stderr
    as_json = json if json is not None else not _is_terminal(target)
    handler = logging.StreamHandler(target)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(level)
    _installed = handler
    return handler


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
