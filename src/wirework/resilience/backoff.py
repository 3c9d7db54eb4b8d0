"""Exponential backoff with full jitter: the delay before each retry, as plain arithmetic.

"Full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter"):
the delay before retry ``n`` (0-based) is uniform in
``[0, min(cap, base * 2**n)]``. Spreading each delay over the whole range,
rather than around a nominal value, is what breaks up a burst of clients that
failed together; AWS measured it to do the least total work of the variants.
"""

from __future__ import annotations

import random

# 2**64 times any sensible base is past any cap; stops the float overflowing.
_MAX_DOUBLINGS = 64


def full_jitter(retry: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``retry`` (0 for the first retry).

    Args:
        retry: how many retries came before this one.
        base: the ceiling of the first delay, in seconds.
        cap: no delay is longer than this, in seconds.
        rng: the random source (seeded in tests).

    Returns:
        A delay in ``[0, min(cap, base * 2**retry)]``.
    """
    ceiling = min(cap, base * 2.0 ** min(max(retry, 0), _MAX_DOUBLINGS))
    return rng.uniform(0.0, ceiling)
