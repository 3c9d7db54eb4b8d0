"""The curated public API stays honest, and importing it stays cheap."""

from __future__ import annotations

import subprocess
import sys

import wirework


def test_all_is_sorted_and_complete() -> None:
    """Every name in __all__ exists, __all__ is sorted, and no public re-export is missing."""
    assert wirework.__all__ == sorted(wirework.__all__)
    for name in wirework.__all__:
        assert hasattr(wirework, name), name
    public = {n for n in vars(wirework) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(wirework.__all__)


def test_import_loads_no_backend_or_cli() -> None:
    """`import wirework` imports no broker backend module and no CLI stack."""
    code = (
        "import sys, wirework\n"
        "names = ('typer', 'rich', 'wirework.brokers.sqlite', 'wirework.brokers.memory',"
        " 'redis', 'aio_pika', 'nats', 'asyncpg', 'grpc')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
