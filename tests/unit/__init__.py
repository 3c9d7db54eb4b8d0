"""Unit tests: no processes, no servers."""
