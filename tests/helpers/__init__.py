"""Helpers shared by the fault tests: ledger workers, process harness, TCP fault proxy."""
