"""Helpers for testing hotwire apps: controllable sources and sinks, and local clusters."""

from hotwire.testing.sources import *  # noqa: F403
