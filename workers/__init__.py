"""Worker entry points: processes that run without the operator key."""
