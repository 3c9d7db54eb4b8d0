"""Payments: charges customers, answering over gRPC (and REST) from one handler.

The demo injects an outage through ``PaymentGate`` to show orders' circuit
breaker opening and, once payments heals, closing again. A charge is keyed
by the caller's Idempotency-Key, so a retried call charges once.
"""

from __future__ import annotations

from examples.shop.models import Charge, ChargeRequest
from wirework.errors import ServiceUnavailableError
from wirework.service import CallContext, Service

payments = Service("payments")


class PaymentGate:
    """The card network as the demo sees it: up, or down (every charge fails with 503)."""

    def __init__(self) -> None:
        self.down = False
        self.attempts = 0
        self.charges: dict[str, Charge] = {}


GATE = PaymentGate()
payments.provide(PaymentGate, lambda: GATE)


@payments.post("/v1/charges")
async def charge(request: ChargeRequest, ctx: CallContext, gate: PaymentGate) -> Charge:
    """Charge the customer once per Idempotency-Key (or order, when no key is sent)."""
    gate.attempts += 1
    if gate.down:
        raise ServiceUnavailableError("the card network does not answer (outage injected)")
    key = ctx.idempotency_key or request.order_id
    if key not in gate.charges:
        gate.charges[key] = Charge(
            order_id=request.order_id,
            charge_id=f"ch-{len(gate.charges) + 1}",
            amount_cents=request.amount_cents,
        )
    return gate.charges[key]
