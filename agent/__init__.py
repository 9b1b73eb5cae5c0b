"""Rejoinder agent."""
