"""Rejoinder kernels."""
