"""Helpers shared by the tests: ledger workers, process harness, TCP fault proxy, the
client-side ledger workload of the server backends, and the check that a server answers."""
