"""Rejoinder streaming."""
