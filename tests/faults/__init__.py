"""Real-fault tests (RELIABILITY.md §2.0): killed processes, crash points, locked files."""
