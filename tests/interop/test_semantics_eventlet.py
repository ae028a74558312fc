"""The task-semantics scenarios (issue 3) on the eventlet pool, beside
``celery worker -P eventlet`` (issue 15: every pool agrees with Celery's
worker on the same pool); test_eventlet.py runs the foundation scenarios
on twenty green threads.

Only the pool differs from the solo runs: each scenario is the imported
test function itself, and this module's ``WORKER_DEFAULTS`` gives both
workers the pool. One slot (``-c 1``), so the order in which tasks sent
together run is defined, for Celery against itself as for ccworker.
"""

from __future__ import annotations

import pytest
from pool_scenarios import SEMANTICS, scenarios_named

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

WORKER_DEFAULTS = {"pool": "eventlet", "concurrency": 1}

globals().update(scenarios_named(SEMANTICS))
