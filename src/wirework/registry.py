"""Where services answer: addresses per service and protocol, round-robin across instances.

A typed client (``wirework.http.HttpClient``, the gRPC client) asks the
registry for the next address of a service over one scheme, so the code
that calls ``orders`` never holds a host name. The addresses come from the
environment, in one of two forms (set one, not both):

* ``WIREWORK_REGISTRY``: services separated by ``;``, each
  ``name=url,url,...``::

      WIREWORK_REGISTRY="orders=http://127.0.0.1:8000,grpc://127.0.0.1:50051;payments=grpc://10.0.0.2:50051"

* ``WIREWORK_REGISTRY_FILE``: the path of a YAML (or JSON, a subset of
  YAML) file with a ``services`` mapping of name to a list of URLs::

      services:
        orders: [http://127.0.0.1:8000, grpc://127.0.0.1:50051]
        payments: [grpc://10.0.0.2:50051]

A URL's scheme is the protocol (``http``, ``https``, ``grpc``, ``grpcs``);
an HTTP URL may carry a path prefix (a service behind ``/orders`` on a shared
host). Static addresses, read once: a registry that watches a control plane
is a later concern, and ``Registry(...)`` in code is the seam for it.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from wirework.errors import ConfigurationError

REGISTRY_VARIABLE = "WIREWORK_REGISTRY"
REGISTRY_FILE_VARIABLE = "WIREWORK_REGISTRY_FILE"
SCHEMES: frozenset[str] = frozenset({"http", "https", "grpc", "grpcs"})

_SERVICE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class Registry:
    """Addresses of services by name and scheme, handed out round-robin.

    Args:
        services: service name to its URLs (any mix of schemes).
        source: where the addresses came from, for error messages
            (``"WIREWORK_REGISTRY"``, a file path, ``"code"``).

    Raises:
        ConfigurationError: a bad service name or URL; the message names
            ``source``, the service and the entry.
    """

    def __init__(self, services: Mapping[str, Sequence[str]], *, source: str = "code") -> None:
        self.source = source
        self._addresses: dict[tuple[str, str], tuple[str, ...]] = {}
        for name, urls in services.items():
            if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
                raise ConfigurationError(
                    f"{source}: service name {name!r} is invalid; use 1-200 characters "
                    f"from A-Z a-z 0-9 . _ -"
                )
            if isinstance(urls, str) or not isinstance(urls, Sequence) or not urls:
                raise ConfigurationError(
                    f"{source}: service {name!r} needs a non-empty list of URLs, "
                    f"e.g. [http://127.0.0.1:8000], not {urls!r}"
                )
            by_scheme: dict[str, list[str]] = {}
            for url in urls:
                scheme, address = _check_url(url, name, source)
                if address not in by_scheme.setdefault(scheme, []):
                    by_scheme[scheme].append(address)
            for scheme, addresses in by_scheme.items():
                self._addresses[(name, scheme)] = tuple(addresses)
        self._turns: dict[tuple[str, str], Iterator[str]] = {
            key: itertools.cycle(addresses) for key, addresses in self._addresses.items()
        }

    def __repr__(self) -> str:
        return f"Registry({self.services()!r}, source={self.source!r})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Registry:
        """The registry ``WIREWORK_REGISTRY`` or ``WIREWORK_REGISTRY_FILE`` describes.

        With neither set, the registry is empty, and asking it for a service
        raises an error that names both variables.

        Raises:
            ConfigurationError: both are set, the file cannot be read, or an
                entry is malformed (the message names the variable or file).
        """
        env = os.environ if environ is None else environ
        inline = env.get(REGISTRY_VARIABLE, "").strip()
        path = env.get(REGISTRY_FILE_VARIABLE, "").strip()
        if inline and path:
            raise ConfigurationError(
                f"both {REGISTRY_VARIABLE} and {REGISTRY_FILE_VARIABLE} are set; "
                f"set one of them (the file for many services, the variable for a few)"
            )
        if path:
            return cls.from_file(path)
        if inline:
            return cls.parse(inline, source=REGISTRY_VARIABLE)
        return cls({}, source=f"{REGISTRY_VARIABLE} / {REGISTRY_FILE_VARIABLE} (neither set)")

    @classmethod
    def parse(cls, text: str, *, source: str = REGISTRY_VARIABLE) -> Registry:
        """The registry ``name=url,url;name=url`` describes (the ``WIREWORK_REGISTRY`` form).

        Raises:
            ConfigurationError: an entry without ``=``, a repeated service, a bad URL.
        """
        services: dict[str, list[str]] = {}
        for entry in text.split(";"):
            entry = entry.strip()
            if not entry:
                continue
            name, sep, urls = entry.partition("=")
            name = name.strip()
            if not sep or not name:
                raise ConfigurationError(
                    f"{source}: entry {entry!r} is not `service=url[,url...]`; "
                    f"e.g. orders=http://127.0.0.1:8000,grpc://127.0.0.1:50051"
                )
            if name in services:
                raise ConfigurationError(
                    f"{source}: service {name!r} appears twice; list all its URLs in one "
                    f"entry, separated by commas"
                )
            services[name] = [url.strip() for url in urls.split(",") if url.strip()]
        return cls(services, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> Registry:
        """The registry a YAML or JSON file describes (a ``services`` mapping).

        Raises:
            ConfigurationError: the file is missing, unreadable, not YAML, or
                has no ``services`` mapping of names to URL lists.
        """
        where = f"{REGISTRY_FILE_VARIABLE} file {str(path)!r}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{where} cannot be read: {exc}") from exc
        try:
            document: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{where} is not valid YAML or JSON: {exc}") from exc
        services = document.get("services") if isinstance(document, dict) else None
        if not isinstance(services, dict):
            raise ConfigurationError(
                f"{where} must hold a `services` mapping of service name to a list of "
                f"URLs, e.g. `services: {{orders: [http://127.0.0.1:8000]}}`"
            )
        return cls(services, source=where)

    def services(self) -> dict[str, tuple[str, ...]]:
        """Every known service and all its addresses, in the order given."""
        known: dict[str, list[str]] = {}
        for (name, _), addresses in self._addresses.items():
            known.setdefault(name, []).extend(addresses)
        return {name: tuple(addresses) for name, addresses in known.items()}

    def addresses(self, service: str, scheme: str) -> tuple[str, ...]:
        """The URLs of ``service`` over ``scheme`` (empty when it has none)."""
        return self._addresses.get((service, scheme), ())

    def next(self, service: str, scheme: str | Sequence[str]) -> str:
        """The next URL of ``service`` over ``scheme``, turning round-robin across instances.

        ``scheme`` may list several (``("https", "http")``): the first one the
        service has is used.

        Raises:
            ConfigurationError: the registry has no such address; the message
                names the service, the scheme and where the registry came from.
        """
        schemes = (scheme,) if isinstance(scheme, str) else tuple(scheme)
        for candidate in schemes:
            turn = self._turns.get((service, candidate))
            if turn is not None:
                return next(turn)
        known = self._describe(service)
        raise ConfigurationError(
            f"no {'/'.join(schemes)} address for service {service!r} in {self.source} "
            f"({known}); add e.g. `{service}={schemes[0]}://127.0.0.1:8000` to "
            f"{REGISTRY_VARIABLE}, or `{service}: [{schemes[0]}://...]` to the "
            f"{REGISTRY_FILE_VARIABLE} file"
        )

    def _describe(self, service: str) -> str:
        """What the registry knows of ``service``, for error messages."""
        addresses = self.services().get(service)
        return f"it has {', '.join(addresses)}" if addresses else "it does not list it"


def _check_url(url: object, service: str, source: str) -> tuple[str, str]:
    """``(scheme, url)`` for one registry entry, the URL without a trailing slash."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(
            f"{source}: service {service!r} has an empty or non-text URL {url!r}"
        )
    text = url.strip()
    bad = f"{source}: service {service!r} has a bad URL {text!r}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"{bad}: {exc}") from exc
    if parts.scheme not in SCHEMES:
        raise ConfigurationError(
            f"{bad}: the scheme must be one of {sorted(SCHEMES)}, e.g. http://127.0.0.1:8000"
        )
    if not parts.hostname:
        raise ConfigurationError(f"{bad}: it names no host, e.g. {parts.scheme}://127.0.0.1:8000")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            f"{bad}: credentials do not belong in a registry; the client carries them"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{bad}: a service address has no query or fragment")
    if parts.scheme.startswith("grpc"):
        if port is None:
            raise ConfigurationError(f"{bad}: a gRPC address needs a port, e.g. grpc://host:50051")
        if parts.path not in ("", "/"):
            raise ConfigurationError(f"{bad}: a gRPC address has no path")
    return parts.scheme, text.rstrip("/")
