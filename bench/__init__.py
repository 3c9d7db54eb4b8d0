"""Benchmarks of the SQLite broker, each figure beside its floor: ``python -m bench``.

The floor of a figure is the same SQL work done with plain ``sqlite3`` in the
same run (same pragmas, same statements per message, same commits), so the
ratio wirework / floor says what the broker adds on top of SQLite itself.
``python -m bench --quick`` is a reduced smoke run.
"""
