"""Reading a handler's signature: which parameter is the body, the context, a dependency.

A handler is written ``async def place(order: PlaceOrder, ctx: Context, stock:
Stock) -> OrderPlaced``: the parameter annotated with a pydantic model is the
message body, one annotated ``Context`` gets the context, and any other
annotated parameter is a dependency, looked up by its type among what the
service ``provide``-s (and a test may ``override``). Reading this once, at
decoration time, means a wrong signature fails when the module is imported,
not on the first message.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from pydantic import BaseModel

from wirework.envelope import event_type as event_type
from wirework.errors import ConfigurationError


@dataclass(frozen=True)
class HandlerSpec:
    """What a handler needs, read from its signature once."""

    function: Callable[..., Awaitable[Any]]
    body_name: str
    body_model: type[BaseModel]
    context_name: str | None
    dependencies: Mapping[str, type[Any]]
    returns: type[BaseModel] | None

    @property
    def name(self) -> str:
        return getattr(self.function, "__qualname__", repr(self.function))


def inspect_handler(
    function: Callable[..., Awaitable[Any]], *, context_type: type[Any]
) -> HandlerSpec:
    """Read ``function``'s signature.

    Raises:
        ConfigurationError: not an ``async def``, no body model, an
            unannotated parameter, or two body models; the message names the
            handler and says how to write it.
    """
    where = getattr(function, "__qualname__", repr(function))
    if not inspect.iscoroutinefunction(function):
        raise ConfigurationError(f"handler {where} must be an `async def` function")
    try:
        hints = get_type_hints(function)
    except NameError as exc:
        raise ConfigurationError(
            f"handler {where} has an annotation that cannot be resolved ({exc}); "
            f"import the type at module level"
        ) from exc
    body: tuple[str, type[BaseModel]] | None = None
    context_name: str | None = None
    dependencies: dict[str, type[Any]] = {}
    for parameter in inspect.signature(function).parameters.values():
        annotation = hints.get(parameter.name)
        if annotation is None:
            raise ConfigurationError(
                f"parameter {parameter.name!r} of handler {where} has no type annotation; "
                f"annotate the body with its pydantic model, the context with Context"
            )
        if annotation is context_type:
            context_name = parameter.name
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if body is not None:
                raise ConfigurationError(
                    f"handler {where} has two body models ({body[0]!r} and "
                    f"{parameter.name!r}); a message has one body"
                )
            body = (parameter.name, annotation)
        elif isinstance(annotation, type):
            dependencies[parameter.name] = annotation
        else:
            raise ConfigurationError(
                f"parameter {parameter.name!r} of handler {where} is annotated "
                f"{annotation!r}; use a pydantic model (the body), Context, or a class "
                f"the service provides"
            )
    if body is None:
        raise ConfigurationError(
            f"handler {where} has no parameter annotated with a pydantic model; "
            f"the body's model says which messages it handles"
        )
    returned = hints.get("return")
    returns = returned if isinstance(returned, type) and issubclass(returned, BaseModel) else None
    return HandlerSpec(
        function=function,
        body_name=body[0],
        body_model=body[1],
        context_name=context_name,
        dependencies=dependencies,
        returns=returns,
    )
