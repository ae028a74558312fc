"""Loaded through ``--config altconfig``."""
worker_prefetch_multiplier = 9
task_default_queue = "from-altconfig"
