"""Public test helpers for code built on wirework.

* ``ServiceHarness`` (``wirework.testing.harness``): run services in-process
  on the memory broker and a manual clock, with their dependencies swapped and
  what they publish captured; tests of a whole flow take milliseconds.
* ``wirework.testing.pytest_plugin``: the ``wirework_clock``,
  ``memory_broker`` and ``service_harness`` fixtures, registered with pytest
  when wirework is installed.
* ``wirework.testing.conformance``: the broker conformance suite as plain async
  functions, so a third-party backend proves it keeps the broker contract
  (``wirework.brokers.base``) with the same checks as the shipped backends.
* ``wirework.testing.ledger``: the client-observed ledger of fault tests and
  the checker that judges it (RELIABILITY.md §2.0).

Only the harness is imported here; the conformance suite and the ledger are
reached through their modules.
"""

from wirework.testing.harness import HarnessFactory as HarnessFactory
from wirework.testing.harness import NotSettledError as NotSettledError
from wirework.testing.harness import Published as Published
from wirework.testing.harness import ServiceHarness as ServiceHarness

__all__ = ["HarnessFactory", "NotSettledError", "Published", "ServiceHarness"]
