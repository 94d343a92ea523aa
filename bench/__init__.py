"""Benchmarks that print figures against the design targets (not tests: nothing here asserts on timing)."""
