"""Broker backends, chosen by URL.

``connect(url)`` opens ``memory://``, ``sqlite:///path/to/file.db``,
``redis://``, ``amqp://`` and ``nats://``; options go in the query string
(``?durability=fast``) or as keyword arguments. The server backends take the
URL without its query string, and their ``Settings`` from the rest. Each
backend module imports its client library itself, so importing this package
imports none.
"""

from __future__ import annotations

import difflib
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from wirework.brokers.base import (
    Broker,
    DeadLetter,
    DeadLetterReason,
    DeadLetterStore,
    Delivery,
    Failure,
    GroupStats,
    Inspectable,
    Subscription,
)
from wirework.clock import Clock
from wirework.errors import ConfigurationError

__all__ = [
    "Broker",
    "DeadLetter",
    "DeadLetterReason",
    "DeadLetterStore",
    "Delivery",
    "Failure",
    "GroupStats",
    "Inspectable",
    "Subscription",
    "connect",
]

_SCHEMES = (
    "memory://",
    "sqlite:///path/to/file.db",
    "redis://host:6379/0",
    "amqp://user:pass@host:5672/vhost",
    "nats://host:4222",
)


def connect(url: str, *, clock: Clock | None = None, **options: Any) -> Broker:
    """Open the broker a URL names; nothing is contacted until first use.

    ``sqlite:///relative.db`` is relative to the working directory and
    ``sqlite:////abs/path.db`` absolute, as in SQLAlchemy. Query-string options
    and keyword options are the backend's settings (see its ``Settings`` class).

    Raises:
        ConfigurationError: the scheme, path or an option is wrong; the message
            says what to write instead.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"broker URL {url!r} has no scheme; write one of: {', '.join(_SCHEMES)}"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    merged: dict[str, Any] = dict(parse_qsl(parts.query, keep_blank_values=True))
    merged.update(options)
    if scheme == "memory":
        from wirework.brokers.memory import MemoryBroker, MemorySettings

        return MemoryBroker(settings=_settings(MemorySettings, merged, url), clock=clock)
    if scheme == "sqlite":
        from wirework.brokers.sqlite import SqliteBroker, SqliteSettings

        path = unquote(parts.path)
        if parts.netloc:
            raise ConfigurationError(
                f"sqlite URL {url!r} has a host ({parts.netloc!r}); write "
                f"sqlite:///relative/file.db or sqlite:////absolute/file.db"
            )
        path = path[1:] if path.startswith("/") else path
        if not path or path.endswith("/"):
            raise ConfigurationError(
                f"sqlite URL {url!r} names no file; write sqlite:///wirework.db "
                f"or sqlite:////var/lib/app/wirework.db"
            )
        return SqliteBroker(path, settings=_settings(SqliteSettings, merged, url), clock=clock)
    base_url = url.split("?", 1)[0]
    if scheme in {"redis", "rediss"}:
        from wirework.brokers.redis import RedisBroker, RedisSettings

        return RedisBroker(base_url, settings=_settings(RedisSettings, merged, url), clock=clock)
    if scheme in {"amqp", "amqps"}:
        from wirework.brokers.rabbitmq import RabbitBroker, RabbitSettings

        return RabbitBroker(base_url, settings=_settings(RabbitSettings, merged, url), clock=clock)
    if scheme in {"nats", "tls"}:
        from wirework.brokers.nats import NatsBroker, NatsSettings

        return NatsBroker(base_url, settings=_settings(NatsSettings, merged, url), clock=clock)
    raise ConfigurationError(
        f"unknown broker scheme {scheme!r} in {url!r}; write one of: {', '.join(_SCHEMES)}"
    )


def _settings(cls: Any, options: dict[str, Any], url: str) -> Any:
    """Build a backend's settings, naming the closest valid option on a typo."""
    from pydantic import ValidationError

    known = set(cls.model_fields)
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigurationError(
                f"unknown option {name!r} for {url.split('?')[0]}; {hint}"
                f"valid options: {', '.join(sorted(known))}"
            )
    try:
        return cls(**options)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = ".".join(str(p) for p in first["loc"])
        raise ConfigurationError(
            f"option {name!r}={first.get('input')!r} for {url.split('?')[0]} is invalid: "
            f"{first['msg']}"
        ) from exc
