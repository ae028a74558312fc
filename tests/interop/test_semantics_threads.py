"""The task-semantics scenarios (issue 3) on the threads pool (issue 4:
every pool agrees with ``celery worker`` on the same pool), and the
foundation scenarios too: test_foundation_differential runs them on solo,
and only its ``test_threads_pool`` used threads.

Only the pool differs from the solo runs: each scenario is the imported test
function itself, and this module's ``WORKER_DEFAULTS`` gives both workers the
pool. One slot (``-c 1``), so the order in which tasks sent together run
is defined, for Celery against itself as for ccworker.
"""

from __future__ import annotations

import pytest
from pool_scenarios import FOUNDATION, SEMANTICS, scenarios_named
from test_foundation_differential import (  # noqa: F401
    test_hook_and_signal_order,
    test_ignore_result,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

WORKER_DEFAULTS = {"pool": "threads", "concurrency": 1}

globals().update(scenarios_named(FOUNDATION + SEMANTICS))


def test_system_exit_keeps_the_thread(broker, run_differential):
    """A task raising SystemExit on ``-P threads -c 1``: Celery's one thread
    goes on serving. ccworker's thread used to end with it, leaving no thread
    to run the next task (which then never ran)."""

    def scenario(app, observe):
        # Neither stores anything for it (Celery's WorkerLostError callback
        # finds no result to write): a short wait, then the next task.
        observe.get_and_meta(observe.send("die", ("sysexit",)), "exit", timeout=3)
        observe.get_and_meta(observe.send("add", (1, 2)), "after")

    celery_obs, cc_obs = run_differential(scenario, broker, project="proj_prefork")
    assert celery_obs["after"]["value"] == 3
    assert celery_obs == cc_obs
