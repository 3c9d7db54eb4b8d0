"""wirework's test suite; a package so fault tests can start helpers with ``python -m``."""
