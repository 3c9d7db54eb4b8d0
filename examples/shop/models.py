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
    """Event: an order was accepted; notifications and analytics each get a copy."""

    __event_type__: ClassVar[str] = "shop.order_placed"
    order_id: str
    customer: str
    sku: str
    quantity: int
    total_cents: int


class OrderRejected(BaseModel):
    """Event: an order could not be accepted."""

    __event_type__: ClassVar[str] = "shop.order_rejected"
    order_id: str
    reason: str


class PrintLabel(BaseModel):
    """Command for the shipping workers' queue."""

    __event_type__: ClassVar[str] = "shop.print_label"
    order_id: str
    customer: str


class OrderAccepted(BaseModel):
    """What ``POST /v1/orders`` answers: the order is queued; follow it by its correlation."""

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
