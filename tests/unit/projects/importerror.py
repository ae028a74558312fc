"""A module whose import fails on a missing dependency."""
import definitely_not_installed_dependency  # noqa: F401
