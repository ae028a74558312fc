"""``python -m celerycompat`` and the ``ccworker`` console script.

Both start here so that ``-P gevent`` can monkey-patch the process before
the CLI, the app, kombu or redis are imported (as ``celery``'s own
``__main__`` does): see `celerycompat.concurrency_patch`.
"""

from celerycompat.concurrency_patch import maybe_patch_concurrency


def main() -> None:
    """Patch for the requested pool if it needs it, then run the ``ccworker`` CLI."""
    maybe_patch_concurrency()
    from celerycompat.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
