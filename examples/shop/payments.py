"""Payments: charges customers and refunds them, over gRPC (and REST) from one handler each.

The demo injects an outage through ``PaymentGate`` to show orders' circuit
breaker opening and, once payments heals, closing again; and one customer's
card is declined, a definite answer the fulfilment saga compensates at once.
A charge and a refund are keyed by the caller's Idempotency-Key, so a retried
call (or a saga step repeated after a crash) charges or refunds once.
"""

from __future__ import annotations

from examples.shop.models import Charge, ChargeRequest, Refund, RefundRequest
from wirework.errors import PreconditionFailedError, ServiceUnavailableError
from wirework.service import CallContext, Service

payments = Service("payments")

#: Customers whose card the network declines (a definite "no": retrying cannot help).
DECLINED = {"mallory"}


class PaymentGate:
    """The card network as the demo sees it: up, or down (every charge fails with 503)."""

    def __init__(self) -> None:
        self.down = False
        self.attempts = 0
        self.charges: dict[str, Charge] = {}
        self.refunds: dict[str, Refund] = {}


GATE = PaymentGate()
payments.provide(PaymentGate, lambda: GATE)


@payments.post("/v1/charges")
async def charge(request: ChargeRequest, ctx: CallContext, gate: PaymentGate) -> Charge:
    """Charge the customer once per Idempotency-Key (or order, when no key is sent)."""
    gate.attempts += 1
    if gate.down:
        raise ServiceUnavailableError("the card network does not answer (outage injected)")
    if request.customer in DECLINED:
        raise PreconditionFailedError(f"card of {request.customer} declined")
    key = ctx.idempotency_key or request.order_id
    if key not in gate.charges:
        gate.charges[key] = Charge(
            order_id=request.order_id,
            charge_id=f"ch-{len(gate.charges) + 1}",
            amount_cents=request.amount_cents,
        )
    return gate.charges[key]


@payments.post("/v1/refunds")
async def refund(request: RefundRequest, ctx: CallContext, gate: PaymentGate) -> Refund:
    """Give back the charge made under ``charge_key``, once; a key that never charged gets
    nothing back (its charge failed, or never arrived)."""
    key = ctx.idempotency_key or request.charge_key
    if key not in gate.refunds:
        charged = gate.charges.get(request.charge_key)
        gate.refunds[key] = Refund(
            order_id=request.order_id,
            charge_id=charged.charge_id if charged else None,
            refunded=charged is not None,
        )
    return gate.refunds[key]
