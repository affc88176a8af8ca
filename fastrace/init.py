"""Initial weights: orthogonal (with gain) and Gaussian (with std), seeded.

Every initialiser returns {edge name: (dim target, dim source) float64 array} and draws edges in
the network's edge order from one generator, so the same seed gives the same weights.
Aligned initialisations (assumption A2) come from a reduction: ``Reduction.aligned_init``.
"""

from __future__ import annotations

import numpy as np

from .data import real_array
from .errors import ConfigError, WeightsError
from .network import Network

Seed = int | np.random.Generator | np.random.SeedSequence | None


def as_generator(seed: Seed) -> np.random.Generator:
    """A numpy Generator from an int >= 0, a SeedSequence, a Generator or None."""
    if isinstance(seed, np.random.Generator):
        return seed
    if not isinstance(seed, (bool, np.bool_)):  # numpy would take True for 1
        try:
            return np.random.default_rng(seed)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"seed must be a non-negative int, a numpy SeedSequence or Generator, "
                      f"or None, got {seed!r}")


def _real_scalar(name: str, value) -> float:
    """``value`` as a float, or a WeightsError naming ``name`` (complex, str, arrays...)."""
    try:
        arr = real_array(value)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{name}: not a real number: {exc}") from None
    if arr.ndim != 0:
        raise WeightsError(f"{name}: must be a number, got shape {arr.shape}")
    return float(arr)


def random_orthogonal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal rows or columns (whichever are fewer), Haar-random."""
    n, k = max(rows, cols), min(rows, cols)
    q, r = np.linalg.qr(rng.standard_normal((n, k)))
    q *= np.sign(np.diag(r))  # makes the distribution uniform (Haar)
    return q if rows >= cols else q.T


def orthogonal(net: Network, gain: float = 1.0, seed: Seed = None) -> dict[str, np.ndarray]:
    """Each weight a random (semi-)orthogonal matrix times ``gain``: all singular values = gain."""
    gain = _real_scalar("orthogonal: gain", gain)
    if not np.isfinite(gain):
        raise WeightsError(f"orthogonal: gain must be finite, got {gain}")
    rng = as_generator(seed)
    return {e: gain * random_orthogonal(*net.weight_shape(e), rng) for e in net.validate().edges}


def gaussian(net: Network, std: float = 1.0, seed: Seed = None) -> dict[str, np.ndarray]:
    """Each weight entry i.i.d. normal with standard deviation ``std``."""
    std = _real_scalar("gaussian: std", std)
    if not np.isfinite(std) or std < 0:
        raise WeightsError(f"gaussian: std must be finite and non-negative, got {std}")
    rng = as_generator(seed)
    return {e: std * rng.standard_normal(net.weight_shape(e)) for e in net.validate().edges}
