"""Recording who handled what, to print each order's causation tree.

A consume middleware on every service notes the handled envelope's id,
cause and correlation; the tree of one order is then read off the notes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from wirework.consumer import ConsumeApp, ConsumeMiddleware, Incoming


@dataclass(frozen=True)
class Step:
    handler: str
    event_type: str
    event_id: str
    caused_by: str | None
    correlation: str
    attempt: int


class FlowLog:
    """Every handled message, in the order the handlers started."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def recorder(self, handler: str) -> ConsumeMiddleware:
        """A middleware that notes each message ``handler`` is about to handle."""

        def wrap(app: ConsumeApp) -> ConsumeApp:
            async def record(incoming: Incoming) -> None:
                envelope = incoming.envelope
                self.steps.append(
                    Step(
                        handler=handler,
                        event_type=envelope.type,
                        event_id=envelope.id,
                        caused_by=envelope.causationid,
                        correlation=envelope.correlationid or envelope.id,
                        attempt=incoming.delivery.attempt,
                    )
                )
                await app(incoming)

            return record

        return wrap

    def tree(self, correlation: str) -> Iterator[tuple[int, Step]]:
        """The steps of one flow, depth-first from its root, with their depth.

        A message handled several times (retries) appears once, as its last attempt.
        """
        last: dict[tuple[str, str], Step] = {}
        for step in self.steps:
            if step.correlation == correlation:
                last[(step.handler, step.event_id)] = step
        steps = list(last.values())
        ids = {step.event_id for step in steps}
        seen: set[tuple[str, str]] = set()

        def walk(cause: str | None, depth: int) -> Iterator[tuple[int, Step]]:
            for step in steps:
                is_child = step.caused_by == cause or (cause is None and step.caused_by not in ids)
                if is_child and (step.handler, step.event_id) not in seen:
                    seen.add((step.handler, step.event_id))
                    yield depth, step
                    yield from walk(step.event_id, depth + 1)

        yield from walk(None, 0)
