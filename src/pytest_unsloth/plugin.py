"""pytest-unsloth hooks."""
