"""The ``wirework`` command: look into a broker and repair it from a shell.

This is the only package that imports typer and rich, so ``import wirework``
stays free of the CLI stack (install it with the ``cli`` extra). Human output
is rich tables on a terminal; every listing command also has ``--json``, the
stable interface for scripts.
"""
