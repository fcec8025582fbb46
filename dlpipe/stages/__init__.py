"""Implementations of the built-in stages (these modules may import TensorFlow)."""
