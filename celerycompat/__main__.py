"""``python -m celerycompat`` is the same as the ``ccworker`` command."""

from celerycompat.cli import main

if __name__ == "__main__":
    main()
