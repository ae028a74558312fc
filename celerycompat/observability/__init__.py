"""Observability: Prometheus metrics, health probes and JSON log lines.

All of it is off unless asked for (``--metrics-port``, ``--log-format
json``), so a ccworker started with a ``celery worker`` command line
behaves, and logs, as that worker did. The pieces, one concern each:

* `metrics` -- metric families and the Prometheus text format (pure);
* `health` -- the liveness and readiness rules (pure);
* `worker_metrics` -- the consumer's hooks and the worker's families;
* `server` -- the HTTP endpoint on a daemon thread;
* `jsonlog` -- the JSON formatter swapped into Celery's log handlers;
* `settings` -- the ccworker-only flags, as `WorkerOptions` carries them;
* `service` -- `Observability`, what the worker holds: built from the
  options, started before the pool (a port that is taken stops the start
  early), fed by the consumer, stopped at exit.

Importing this package imports nothing else: `settings` is read by the
command line before the worker exists.
"""
