"""The reference shop: every wirework pattern in one small, runnable system.

``python -m examples.shop`` (``make demo``) runs it on the embedded SQLite
broker, or on ``WIREWORK_BROKER``. Each service lives in its own module as it
would in its own repository; the demo runs them side by side, each on its own
broker connection, as separate processes would.
"""
