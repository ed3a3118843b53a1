"""Producers the services make for a moment are freed at once, not at the next garbage collection.

Measured in threads of this process: each librdkafka producer runs several, with connections to
the broker (and, for the fencing producer, a transactional.id that the application's own
producer uses next).
"""

import gc
import os

from supportsim.kafka.app import make_app
from supportsim.kafka.producers import fence_predecessor
from supportsim.settings import ServiceSettings


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_fencing_at_startup_leaves_no_producer_behind(service_env, broker):
    app, _topics = make_app(ServiceSettings(), group="fence-threads", exactly_once=False)
    gc.collect()
    gc.disable()  # what a service does between its (rare) collections
    try:
        before = threads()
        for _ in range(3):
            fence_predecessor(app)
        # no growth: threads left by earlier tests in this process may end meanwhile
        assert threads() <= before
    finally:
        gc.enable()
