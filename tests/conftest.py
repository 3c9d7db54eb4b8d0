"""Suite-wide hygiene: each test starts with a young heap.

A full garbage collection walks every tracked object, and the test process
holds the whole import graph (every broker client, OpenTelemetry, grpcio,
Starlette) plus what earlier tests left behind: measured in a conformance run,
a full collection took 40-285 ms and could land inside a timed window of a
later test (DEV-16: 200 request timeouts each firing 56 ms late on Redis, all
at once, in one loaded full-suite run). Collecting and then freezing the
survivors before each test moves them out of the collector's sight
(``gc.freeze``), so a collection during a test walks only what that test made:
the same run's full collections outside the 5,000-request burst test fell to
at most 2 ms, for about 0.1 s of setup over the whole suite.
"""

from __future__ import annotations

import gc

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    gc.collect()
    gc.freeze()
