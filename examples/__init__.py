"""Runnable examples: the numbered walk-throughs, and ``examples.shop`` (``make demo``)."""
