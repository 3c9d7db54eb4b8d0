"""The REST binding: services' endpoints over HTTP/1.1 JSON, and the typed client.

``http_app(svc)`` is the Starlette app (OpenAPI 3.1 at ``/openapi.json``,
problem+json errors, DEV-25 limits), ``HttpServer`` runs it on uvicorn in the
current event loop, and ``HttpClient`` calls it, typed by the same endpoint
declarations.
"""

from wirework.http.app import http_app as http_app
from wirework.http.client import HttpClient as HttpClient
from wirework.http.errors import HeadersTooLargeError as HeadersTooLargeError
from wirework.http.errors import InvalidInputError as InvalidInputError
from wirework.http.errors import MethodNotAllowedError as MethodNotAllowedError
from wirework.http.errors import PayloadTooLargeError as PayloadTooLargeError
from wirework.http.limits import HttpLimits as HttpLimits
from wirework.http.problems import Problem as Problem
from wirework.http.server import HttpServer as HttpServer

__all__ = [
    "HeadersTooLargeError",
    "HttpClient",
    "HttpLimits",
    "HttpServer",
    "InvalidInputError",
    "MethodNotAllowedError",
    "PayloadTooLargeError",
    "Problem",
    "http_app",
]
