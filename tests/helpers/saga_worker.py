"""An orchestrator process for the saga fault tests: ``python -m tests.helpers.saga_worker``.

Runs an ``Orchestrator`` with the ledger saga (``tests.helpers.saga_ledger``)
over ``--store`` until SIGTERM; the participant logs each call in
``<name>.<pid>.ledger`` in ``--ledger`` (``invoked``, ``enter``, ``leave``,
``handled``) and writes effects into the store. Crash points come from
``FAULT_POINT`` / ``FAULT_EVERY``. It records ``started`` once running.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from tests.helpers.saga_ledger import Participant, build_saga
from wirework.saga import Orchestrator
from wirework.store import connect_store
from wirework.testing.ledger import SUFFIX, LedgerFile


async def orchestrate(args: argparse.Namespace) -> int:
    store = connect_store(args.store)
    path = Path(args.ledger) / f"{args.name}.{os.getpid()}{SUFFIX}"
    with LedgerFile(path) as ledger:
        participant = Participant(store, ledger, process=f"{args.name}.{os.getpid()}")
        orchestrator = Orchestrator(
            store,
            [build_saga(participant)],
            lease_timeout=args.lease,
            poll_interval=args.poll,
            max_sagas=args.max_sagas,
        )
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        async with asyncio.TaskGroup() as group:
            group.create_task(orchestrator.run())
            ledger.record("started", "-")
            await stopping.wait()
            await orchestrator.stop()
        ledger.record("stopped", "-")
    await store.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.saga_worker")
    parser.add_argument("--store", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--max-sagas", type=int, default=20)
    return asyncio.run(orchestrate(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
