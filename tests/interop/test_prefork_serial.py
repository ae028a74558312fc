"""Foundation scenarios that observe the order of tasks sent together, on
``-P prefork -c 1`` (with more children that order is not defined, for
Celery against itself either). See test_prefork.py for the rest.

``test_ignore_result`` is not re-run on prefork: it records the parent's
``task_received`` and the child's task signals in one list, whose
interleaving is a race between two processes in Celery as in ccworker.
"""

from __future__ import annotations

import pytest
from test_foundation_differential import test_rpc_results  # noqa: F401

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

WORKER_DEFAULTS = {"pool": "prefork", "concurrency": 1}
