"""Nexmark on hotwire: an event generator, queries Q0-Q8 and their plain-Python references."""
