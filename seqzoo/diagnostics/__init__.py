"""Checks of a mixer's behaviour beyond its maths (used by tests and benchmarks alike)."""
