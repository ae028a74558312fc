"""The project the benchmarks run: no-op tasks, configured from the environment."""
