"""Thin route modules: parse, call ``serving`` or the store, shape the response."""
