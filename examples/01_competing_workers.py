"""01 · Competing workers: two instances of one service share a queue; each job runs once.

Both instances consume ``thumbnails.resize`` in one group, so the broker hands
each job to one of them; with ``prefetch=1`` a busy worker takes no more.
Run: ``python examples/01_competing_workers.py`` (SQLite in a temp directory, or $WIREWORK_BROKER).
"""

import asyncio
import os
import tempfile
from collections import Counter

from pydantic import BaseModel

from wirework import Broker, connect
from wirework.service import Service

JOBS = 6


class Resize(BaseModel):
    image: str


def worker(
    name: str, broker: Broker, done: list[tuple[str, str]], all_done: asyncio.Event
) -> Service:
    service = Service("thumbnails", broker=broker)  # one name: one group, shared jobs

    @service.consume("thumbnails.resize", prefetch=1)
    async def resize(job: Resize) -> None:
        await asyncio.sleep(0.05)  # the work itself
        done.append((name, job.image))
        print(f"{name} resized {job.image}")
        if len(done) == JOBS:
            all_done.set()

    return service


async def main(url: str) -> None:
    done: list[tuple[str, str]] = []
    all_done = asyncio.Event()
    async with connect(url) as broker:
        worker_a, worker_b = (worker(n, broker, done, all_done) for n in ("worker-a", "worker-b"))
        async with worker_a, worker_b, Service("uploads", broker=broker) as uploads:
            for n in range(1, JOBS + 1):
                await uploads.send("thumbnails.resize", Resize(image=f"photo-{n}.jpg"))
            async with asyncio.timeout(10):
                await all_done.wait()
    twice = sum(times > 1 for times in Counter(image for _, image in done).values())
    shares = ", ".join(f"{w} did {n}" for w, n in sorted(Counter(w for w, _ in done).items()))
    print(f"{JOBS} jobs sent, {len(done)} done, {twice} twice: {shares}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(os.environ.get("WIREWORK_BROKER") or f"sqlite:///{tmp}/wirework.db"))
