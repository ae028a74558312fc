"""Scenarios a test module re-runs on another pool.

``globals().update(scenarios_named(SEMANTICS))`` in a test module adds them
to it (pytest collects a module's globals named ``test_*``).

Each one is the imported test function itself; the importing module's
``WORKER_DEFAULTS`` give both workers its pool, so only the pool differs
from the original run. Not a test module (its name is not ``test_*``), so
nothing here runs twice.

``FOUNDATION``: the foundation scenarios that do not observe the order in
which tasks sent together run (with several slots that order is not
defined, for Celery against itself either). ``SEMANTICS``: the task
semantics of issue 3 (retries, ETA, expiry, reject/ignore, acks, links,
canvas).
"""

from test_foundation_differential import (
    test_add,
    test_big_results,
    test_echo_every_json_type,
    test_failures,
    test_invalid_json_body,
    test_kombu_json_types,
    test_kwargs,
    test_pickle_to_json_only_worker,
    test_request_context,
    test_result_extended,
    test_track_started,
    test_unknown_task,
)
from test_foundation_wire import (
    test_acks_late,
    test_acks_on_failure_setting_off,
    test_autoretry,
    test_chain,
    test_chord,
    test_eta_countdown,
    test_expires,
    test_group,
    test_link_callbacks,
    test_link_error,
    test_reject_and_ignore,
    test_retry,
    test_retry_meta_while_waiting,
)
from test_task_semantics import (
    test_builtin_canvas_tasks,
    test_reject_requeue,
    test_replace,
    test_retry_message_as_published,
    test_retry_variants,
)

FOUNDATION = [
    test_add, test_big_results, test_echo_every_json_type, test_failures,
    test_invalid_json_body, test_kombu_json_types, test_kwargs,
    test_pickle_to_json_only_worker, test_request_context, test_result_extended,
    test_track_started, test_unknown_task,
]
SEMANTICS = [
    test_acks_late, test_acks_on_failure_setting_off, test_autoretry, test_chain, test_chord,
    test_eta_countdown, test_expires, test_group, test_link_callbacks, test_link_error,
    test_reject_and_ignore, test_retry, test_retry_meta_while_waiting,
    test_builtin_canvas_tasks, test_reject_requeue, test_replace,
    test_retry_message_as_published, test_retry_variants,
]


def scenarios_named(scenarios: list) -> dict:
    """``{name: function}``, for ``globals().update(...)``."""
    return {function.__name__: function for function in scenarios}
