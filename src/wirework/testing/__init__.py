"""Public test helpers for code built on wirework.

* ``wirework.testing.conformance``: the broker conformance suite as plain async
  functions, so a third-party backend proves it keeps the broker contract
  (``wirework.brokers.base``) with the same checks as the shipped backends.
* ``wirework.testing.ledger``: the client-observed ledger of fault tests and
  the checker that judges it (RELIABILITY.md §2.0).

Nothing is imported here, so ``import wirework.testing`` stays cheap: each
module imports what it needs when it is imported itself.
"""
