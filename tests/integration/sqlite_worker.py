"""A consumer process for the cross-process SQLite tests.

Usage: python sqlite_worker.py DB TOPIC GROUP OUT_FILE [POLL_INTERVAL]
Writes one line per handled message id to OUT_FILE (flushed), prints "ready"
once subscribed, and runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import TextIO

from pydantic import BaseModel

from wirework.brokers import Subscription, connect
from wirework.brokers.sqlite import SqliteBroker
from wirework.consumer import Consumer, Route
from wirework.envelope import Envelope


class Item(BaseModel):
    n: int


async def main(db: str, topic: str, group: str, out: TextIO, poll: float) -> None:
    async with connect(f"sqlite:///{db}", poll_interval=poll) as broker:
        if not isinstance(broker, SqliteBroker):
            raise SystemExit("this worker is for the SQLite broker")

        async def handle(item: Item, event: Envelope) -> None:
            out.write(f"{item.n}\n")

        consumer = Consumer(
            broker,
            Subscription(topic=topic, group=group, prefetch=4, start="earliest"),
            routes=[Route("item", Item, handle)],
            concurrency=2,
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(
            signal.SIGTERM, lambda: asyncio.ensure_future(consumer.stop(grace=2))
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(consumer.run())
            while broker.commit_counts[0] == 0:  # the group exists once something committed
                await asyncio.sleep(0.01)
            print("ready", flush=True)


if __name__ == "__main__":
    db, topic, group, out_path = sys.argv[1:5]
    poll = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    with open(out_path, "a", buffering=1) as out:
        asyncio.run(main(db, topic, group, out, poll))
