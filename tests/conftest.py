"""Shared fixtures for the whole suite (engine-specific ones live beside their tests)."""
