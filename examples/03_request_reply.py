"""03 · Request-reply: ask another service, and wait for its answer no longer than a timeout.

A responder's exception comes back as ``RemoteError``, no reply in time as ``RequestTimeoutError``.
Run: ``python examples/03_request_reply.py`` (SQLite in a temp directory, or $WIREWORK_BROKER).
"""

import asyncio
import os
import tempfile

from pydantic import BaseModel

from wirework import connect
from wirework.errors import RemoteError, RequestTimeoutError
from wirework.service import Service

STOCK = {"kettle": 5, "anvil": 1}


class Reserve(BaseModel):
    sku: str
    quantity: int


class Reserved(BaseModel):
    left: int


async def ask(shop: Service, sku: str, quantity: int) -> str:
    body = Reserve(sku=sku, quantity=quantity)
    try:
        reply = await shop.request("inventory.reserve", body, returns=Reserved, timeout=0.5)
    except RemoteError as exc:
        return f"refused: {exc.remote_message}"
    except RequestTimeoutError:
        return "no reply within 0.5 s, gave up"
    return f"reserved, {reply.left} left"


async def main(url: str) -> None:
    async with connect(url) as broker:
        inventory = Service("inventory", broker=broker)

        @inventory.respond("inventory.reserve")
        async def reserve(request: Reserve) -> Reserved:
            await asyncio.sleep(1.0 if request.sku == "anvil" else 0)  # anvils: a slow lookup
            if STOCK[request.sku] < request.quantity:
                raise ValueError(f"only {STOCK[request.sku]} {request.sku} left")
            STOCK[request.sku] -= request.quantity
            return Reserved(left=STOCK[request.sku])

        async with inventory, Service("shop", broker=broker) as shop:
            for sku, quantity in [("kettle", 2), ("kettle", 9), ("anvil", 1)]:
                print(f"reserve {quantity} {sku}: {await ask(shop, sku, quantity)}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(os.environ.get("WIREWORK_BROKER") or f"sqlite:///{tmp}/wirework.db"))
