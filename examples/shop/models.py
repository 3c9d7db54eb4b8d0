"""The shop's messages: the contract between its services."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field


class PlaceOrder(BaseModel):
    """Command: a customer wants to buy."""

    __event_type__: ClassVar[str] = "shop.place_order"
    order_id: str
    customer: str
    sku: str
    quantity: int = Field(gt=0)
    total_cents: int


class ReserveStock(BaseModel):
    """Request to inventory: hold this many units for an order."""

    __event_type__: ClassVar[str] = "shop.reserve_stock"
    order_id: str
    sku: str
    quantity: int


class StockReservation(BaseModel):
    """Inventory's reply."""

    __event_type__: ClassVar[str] = "shop.stock_reservation"
    order_id: str
    reserved: bool
    left: int


class OrderPlaced(BaseModel):
    """Event: orders took an order (written with it, through the outbox); fulfilment starts."""

    __event_type__: ClassVar[str] = "shop.order_placed"
    order_id: str
    customer: str
    sku: str
    quantity: int
    total_cents: int


class OrderConfirmed(BaseModel):
    """Event: the fulfilment saga completed: stock held, customer charged, label queued."""

    __event_type__: ClassVar[str] = "shop.order_confirmed"
    order_id: str
    customer: str
    sku: str
    quantity: int
    total_cents: int
    charge_id: str


class OrderRejected(BaseModel):
    """Event: the fulfilment saga compensated; the order will not ship."""

    __event_type__: ClassVar[str] = "shop.order_rejected"
    order_id: str
    reason: str


class PrintLabel(BaseModel):
    """Command for the shipping workers' queue."""

    __event_type__: ClassVar[str] = "shop.print_label"
    order_id: str
    customer: str


class OrderAccepted(BaseModel):
    """What ``POST /v1/orders`` answers: the order is taken; follow it by its correlation.

    ``correlation_id`` is the id of the order's ``OrderPlaced`` event, which every
    message of its flow carries (``wirework flow`` takes it); the fulfilment
    saga's id is the order id (``wirework saga show``).
    """

    order_id: str
    correlation_id: str


class OrderView(BaseModel):
    """What ``GET /v1/orders/{order_id}`` (and gRPC ``GetOrder``) answers."""

    order_id: str
    status: str
    detail: str = ""


class ChargeRequest(BaseModel):
    """Orders asks payments (over gRPC) to charge a customer for an order."""

    order_id: str
    customer: str
    amount_cents: int


class Charge(BaseModel):
    """Payments' answer: the charge, the same one however often it is asked."""

    order_id: str
    charge_id: str
    amount_cents: int


class ReleaseStock(BaseModel):
    """Compensation sent to inventory when an order cannot be paid: give the units back."""

    __event_type__: ClassVar[str] = "shop.release_stock"
    order_id: str
    sku: str
    quantity: int


class RefundRequest(BaseModel):
    """Orders asks payments to give back the charge made under ``charge_key``, if any.

    The charge's idempotency key names it even when the charge's answer was
    lost (a timeout: the saga compensates a step whose outcome is unknown).
    """

    order_id: str
    charge_key: str


class Refund(BaseModel):
    """Payments' answer: what was given back (nothing, if that key never charged)."""

    order_id: str
    charge_id: str | None
    refunded: bool
