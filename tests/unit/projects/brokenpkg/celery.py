import missing_dependency_of_brokenpkg  # noqa: F401
