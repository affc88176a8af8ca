"""The ``FastraceError`` family: every error fastrace raises for bad input or a failed run."""

from __future__ import annotations


class FastraceError(Exception):
    """Base class of every error fastrace raises on purpose."""


class NetworkError(FastraceError, ValueError):
    """The network graph is invalid (cycle, unknown node, duplicate name, bad dimension, ...)."""


class DataError(FastraceError, ValueError):
    """A data set does not fit its network (shapes, missing nodes, NaN/inf, negative weights)."""


class WeightsError(FastraceError, ValueError):
    """A weight dictionary does not fit its network (missing edge, wrong shape, NaN/inf)."""


class PathExplosionError(NetworkError):
    """Enumerating the paths of a network would need more paths than the allowed limit."""


class ReductionError(FastraceError):
    """The data do not satisfy the reduction's assumption A1 within the tolerance.

    ``residual`` holds the measured relative off-diagonal residual.
    """

    def __init__(self, message: str, residual: float = float("nan")):
        super().__init__(message)
        self.residual = residual


class DivergenceError(FastraceError, FloatingPointError):
    """A run diverged; ``step``, ``quantity`` and ``value`` say where and how."""

    def __init__(self, message: str, step: int = -1, quantity: str = "", value: float = float("nan")):
        super().__init__(message)
        self.step = step
        self.quantity = quantity
        self.value = value


class IntegrationError(FastraceError):
    """An ODE integration failed (step size underflow, too many steps, non-finite state)."""


class StoreError(FastraceError, OSError):
    """An HDF5 file cannot be written or read as a fastrace file."""


class ConfigError(FastraceError, ValueError):
    """An experiment configuration or command-line argument is invalid."""
