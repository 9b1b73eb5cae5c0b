"""Rejoinder engine."""
