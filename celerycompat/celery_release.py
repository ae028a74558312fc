"""The Celery release the project brings, and the settings it lacks.

ccworker under Celery X behaves as ``celery worker`` X. The first thing that
differs between releases is the settings table: each minor release from 5.3
to 5.7 added settings (``celery/app/defaults.py``), and ``app.conf.<name>``
of a setting the installed release does not define raises ``AttributeError``
(while ``app.conf.get(name)`` quietly returns ``None``). A worker feature that
reads such a setting must run, on the older release, as that release's
worker does, which is what the release did before the setting existed.

:func:`setting` is the one place the worker reads a setting that not every
supported release has. On a release that defines it, it is ``app.conf``'s
value. On one that does not, it is :data:`BEFORE_SETTING`'s value: the
behaviour of that release, whatever the project wrote into ``app.conf``
under that name (Celery X ignores a setting it does not know, and so does
ccworker under X).

It is also where a Celery helper that not every release has gets its
fallback: what that release's worker does in its place
(:func:`get_actual_ignore_result`).
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, timezone
from typing import Any, Callable

#: The releases the version matrix tests (tests/matrix.py), oldest first;
#: the newest patch of each minor. A release outside [first, last minor] is
#: started all the same, with one warning (:func:`support_warning`).
TESTED = ("5.2.7", "5.3.6", "5.4.0", "5.5.3", "5.6.3", "5.7.0")

#: For each setting some supported release lacks: the value that gives that
#: release's behaviour, and the release that added it (for the docs and
#: ``ccworker check``).
BEFORE_SETTING: dict[str, tuple[Any, str]] = {
    # Before 5.3 retrying the first connection followed broker_connection_retry;
    # None is how the consumer reads "not set" on 5.3+ as well.
    "broker_connection_retry_on_startup": (None, "5.3"),
    "worker_enable_prefetch_count_reduction": (True, "5.4"),
    # Before 5.5 no worker looked for quorum queues: global QoS was always used.
    "worker_detect_quorum_queues": (False, "5.5"),
    "worker_soft_shutdown_timeout": (0.0, "5.5"),
    "worker_enable_soft_shutdown_on_idle": (False, "5.5"),
    "worker_disable_prefetch": (False, "5.6"),
    "worker_eta_task_limit": (None, "5.6"),
    "worker_pool_start_method": ("fork", "5.7"),
}


def parse_version(text: str) -> tuple[int, ...]:
    """``"5.5.0rc4"`` -> ``(5, 5, 0)``: the numeric release, pre-release tags dropped."""
    numbers = []
    for part in text.split(".")[:3]:
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


@functools.lru_cache(maxsize=1)
def celery_version() -> tuple[int, ...]:
    """The installed Celery's release, e.g. ``(5, 2, 7)`` (read once: rules
    that depend on it are asked per task)."""
    import celery

    return parse_version(celery.__version__)


def has_setting(name: str) -> bool:
    """Whether the installed Celery defines the setting ``name``."""
    from celery.app.defaults import DEFAULTS

    return name in DEFAULTS


def setting(conf: Any, name: str) -> Any:
    """The value of setting ``name`` as the installed release's worker sees it.

    ``conf`` is ``app.conf``. A setting the release defines is read from it;
    one it lacks (a key of :data:`BEFORE_SETTING`) is that release's behaviour.

    Raises:
        KeyError: ``name`` is neither defined by the release nor in
            :data:`BEFORE_SETTING` (a programming error: every setting newer than
            5.2 that ccworker reads must be listed there).
    """
    if has_setting(name):
        return conf.get(name)
    return BEFORE_SETTING[name][0]


def redelivered_default() -> bool | None:
    """What a task's ``delivery_info['redelivered']`` is when the transport did
    not say: Celery 5.3's Request made it False; 5.2's left it None."""
    return None if celery_version() < (5, 3) else False


def rpc_replies_carry_meta() -> bool:
    """Whether ``rpc://`` replies are the full result meta (Celery 5.7's
    ``_to_result`` builds them with ``_get_result_meta``). Before 5.7 a reply
    is a five-field dict (``task_id`` first, no ``date_done``); ccworker's
    native RPC store writes the 5.7 form, so there Celery's own backend sends."""
    return celery_version() >= (5, 7)


def process_init_sender(hostname: str) -> str | None:
    """The ``sender`` of ``worker_process_init`` (solo, each prefork child):
    the node name since Celery 5.7, None before."""
    return hostname if celery_version() >= (5, 7) else None


def result_clock(app: Any) -> Callable[[], datetime]:
    """What stamps a result's ``date_done`` (``Backend._get_result_meta``):
    a naive UTC time before 5.4 (``datetime.utcnow()``, no ``+00:00`` in the
    stored text), an aware UTC time on 5.4, ``app.now()`` (aware, in the
    app's timezone) since 5.5."""
    version = celery_version()
    if version < (5, 4):
        return _naive_utc_now
    if version < (5, 5):
        return _aware_utc_now
    return _app_now(app)


def _app_now(app: Any) -> Callable[[], datetime]:
    """``app.now()`` as Celery 5.5-5.7 compute it (the time in UTC made aware
    with Celery's UTC zone, then in the app's timezone), without the DST
    ambiguity check ``make_aware`` runs on every call, which for UTC never
    finds one: the same value in 0.3 us instead of 4.5, once per task. A
    project's own ``now`` (a ``Celery`` subclass overriding it, or one set on
    the app) is called as it is."""
    from celery import Celery
    from celery.utils.time import timezone as celery_zones

    if getattr(app.now, "__func__", None) is not Celery.now:
        return app.now  # a subclass's, or one set on the app itself
    utc, zone = celery_zones.utc, app.timezone
    return lambda: datetime.now(utc).astimezone(zone)


def _naive_utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _aware_utc_now() -> datetime:
    return datetime.now(timezone.utc)


def result_stamps() -> str:
    """Which canvas stamps an extended result (``result_extended``) carries:
    ``"none"`` on 5.2 (no stamping), ``"all"`` from 5.3 to 5.6 (every stamp
    of the request), ``"named"`` since 5.7 (those in ``stamped_headers``)."""
    version = celery_version()
    if version < (5, 3):
        return "none"
    return "all" if version < (5, 7) else "named"


def reject_fails_task() -> bool:
    """Whether ``Reject(requeue=False)`` records a terminal FAILURE (stored
    result, ``task_failure``, ``task-failed``) besides rejecting the message:
    since 5.7 (Celery #4222). Before, the task stays PENDING (or STARTED)."""
    return celery_version() >= (5, 7)


def cancels_on_cold_shutdown() -> bool:
    """Whether a cold shutdown cancels the running tasks, each with a
    ``task-cancelled`` event (``cancel_all_unacked_requests`` in 5.5,
    ``cancel_active_requests`` since 5.6: B37). Before 5.5 the pool is
    terminated and its prefork pool reports each killed run as a lost
    worker instead (``task-failed``); ccworker returns those messages to
    the queue and sends no event for them."""
    return celery_version() >= (5, 5)


def request_hook_rules() -> tuple[bool, bool, bool]:
    """How the release's ``celery.worker.request.Request`` hooks go on to
    ``acknowledge``/``reject`` (``consumer/project_requests.py`` repeats it):

    * ``unwraps``: ``on_failure`` unwraps billiard's ``ExceptionWithTraceback``
      before it looks at the exception's type (5.3+; 5.2 sees the wrapper);
    * ``timeout_requeues``: an ``acks_late`` task's ``TimeLimitExceeded`` is
      rejected with requeue when its acks flag is off (5.5+);
    * ``split_flags``: ``acks_on_timeout``/``acks_on_failure`` replace
      ``acks_on_failure_or_timeout``, and the hard limit's ``on_timeout``
      rejects with requeue when it does not ack (5.7).
    """
    version = celery_version()
    return version >= (5, 3), version >= (5, 5), version >= (5, 7)


def revoke_stores() -> str | None:
    """What ``revoke`` writes to the result backend (``celery/worker/control.py``).

    ``None`` before 5.6: nothing (a revoked task's REVOKED is stored when a
    worker discards it). ``"every id"`` on 5.6: REVOKED for every id, running
    ones included. ``"not started"`` from 5.7: only ids not running here
    whose stored state is not final and not started by another worker.
    """
    if celery_version() < (5, 6):
        return None
    return "every id" if celery_version() < (5, 7) else "not started"


def control_replies_are_57() -> bool:
    """Whether the installed release's control replies have 5.7's shapes.

    Before 5.7: ``query_task`` knows only active and reserved requests (one
    held for its ETA is not found; 5.7 says ``scheduled``); ``hello`` replies
    with the revoked set's ``_data`` (``{id: [stamp, id]}``; 5.7: a list of
    ids); ``enable_events``/``disable_events``/``heartbeat`` on a worker
    without an event dispatcher fail with an AttributeError (5.7: a
    ``nok('event dispatcher unavailable')`` reply, or nothing).
    """
    return celery_version() >= (5, 7)


def control_replies_are_53() -> bool:
    """Whether the release's replies have the shapes 5.3 gave them. Before
    (5.2): ``revoke`` says ``tasks <id>, <id> flagged as revoked`` (5.3+:
    the repr of the id set), and the ``pool`` of ``inspect stats`` has no
    ``implementation`` entry."""
    return celery_version() >= (5, 3)


def worker_option_names() -> frozenset[str]:
    """The parameter names of the installed release's ``celery worker`` command."""
    from celery.bin.worker import worker

    return frozenset(param.name for param in worker.params)


def support_warning(version: tuple[int, ...]) -> str | None:
    """One line for a Celery release outside the tested range, else ``None``."""
    first, last = parse_version(TESTED[0]), parse_version(TESTED[-1])
    if version[:2] < first[:2] or version[:2] > last[:2]:
        return (f"celery {'.'.join(map(str, version))} is outside the releases ccworker "
                f"is tested with ({TESTED[0]} to {TESTED[-1]}.x): it may not behave "
                f"as that release's own worker")
    return None


def _task_ignore_result(task: Any, request: Any) -> bool:
    """A release without ``get_actual_ignore_result`` (5.2 to 5.4 at least):
    its tracer reads only the task's own ``ignore_result``, never the request's
    (``apply_async(ignore_result=True)``)."""
    return bool(task.ignore_result)


try:
    from celery.app.task import get_actual_ignore_result
except ImportError:
    get_actual_ignore_result = _task_ignore_result
