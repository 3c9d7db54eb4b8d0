"""04 · Poison and replay: a message that keeps failing is set aside, then replayed once fixed.

``billing`` retries a failing invoice with backoff while others go past it; after ``max_attempts``
it is dead-lettered. Once the handler is fixed, ``replay`` hands it back to its group, id kept.
Run: ``python examples/04_poison_and_replay.py`` (SQLite in a temp directory, or $WIREWORK_BROKER).
"""

import asyncio
import os
import tempfile

from pydantic import BaseModel

from wirework import RetryPolicy, connect
from wirework.brokers import DeadLetterStore
from wirework.envelope import decode_wire
from wirework.service import Context, Service


class Invoice(BaseModel):
    invoice_id: str
    amount_cents: int


async def main(url: str) -> None:
    negative_amounts_work = False  # the bug
    issued: asyncio.Queue[str] = asyncio.Queue()
    async with connect(url) as broker:
        assert isinstance(broker, DeadLetterStore)  # every shipped broker keeps dead letters
        billing = Service("billing", broker=broker)

        @billing.consume("billing.invoices", retry=RetryPolicy(max_attempts=3, base_delay=0.05))
        async def issue(invoice: Invoice, ctx: Context) -> None:
            if invoice.amount_cents < 0 and not negative_amounts_work:
                print(f"{invoice.invoice_id} failed on attempt {ctx.attempt}")
                raise ValueError(f"amount {invoice.amount_cents} is negative")
            print(f"{invoice.invoice_id} issued on attempt {ctx.attempt}")
            await issued.put(invoice.invoice_id)

        async with billing, Service("shop", broker=broker) as shop, asyncio.timeout(10):
            for n, cents in enumerate([1200, -300, 4500], start=1):
                invoice = Invoice(invoice_id=f"inv-{n}", amount_cents=cents)
                await shop.send("billing.invoices", invoice)
            while not (dead := await broker.dead_letters()):  # noqa: ASYNC110 - no event for it
                await asyncio.sleep(0.05)
            [record] = dead
            poison = decode_wire(record.message).decode(Invoice)
            print(f"{poison.invoice_id} dead-lettered: {record.reason}, {record.attempts} attempts")

            negative_amounts_work = True  # the fix is deployed
            print(f"fix deployed; replayed {await broker.replay([record.id])} dead letter")
            done = sorted([await issued.get() for _ in range(3)])
            print(f"issued {', '.join(done)}; {len(await broker.dead_letters())} dead letters left")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(os.environ.get("WIREWORK_BROKER") or f"sqlite:///{tmp}/wirework.db"))
