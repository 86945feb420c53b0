"""Particle methods. For now: the standard test functions (``anyorder.cbo.functions``) that the
consensus-based optimizer and the bench's function tasks share."""

from anyorder.cbo import functions

__all__ = ["functions"]
