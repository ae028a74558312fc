"""celeryev events: the dispatcher and the worker heartbeat (wire contract E)."""
