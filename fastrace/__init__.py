"""fastrace: learning dynamics of gated deep linear networks and the neural race reduction.

The light core (network, data, statistics, loss and gradient) is imported eagerly; modules that
pull in numba, scipy or h5py load on first use, so ``import fastrace`` stays fast and never
compiles anything.
"""

from __future__ import annotations

import importlib
from pathlib import Path as _Path

from . import init
from .data import Contexts, Dataset
from .errors import (
    ConfigError,
    DataError,
    DivergenceError,
    FastraceError,
    IntegrationError,
    NetworkError,
    PathExplosionError,
    ReductionError,
    StoreError,
    WeightsError,
)
from .gradient import (
    conserved_quantities,
    forward,
    gradient,
    loss,
    loss_and_gradient,
    path_gradient,
)
from .network import Edge, Network, Path
from .reduce import ReducedSolution, Reduction, reduce
from .simulate import Trajectory, resume, simulate
from .stats import GatedMoments, PathCorrelations, gated_moments, path_correlations

__version__ = "0.1.0"

# name -> module that defines it; loaded on first attribute access
_LAZY = {
    "RaceSystem": "system",
    "RaceSolution": "integrate",
    "integrate_system": "integrate",
    "exact": None,
    "store": None,
    "tasks": None,
    "analysis": None,
    "integrate": None,
    "experiments": None,
    "config": None,
    "sweep": None,
    "load_experiment": "config",
    "run_experiment": "config",
    "plot": None,
    "engine": None,
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
        value = module if _LAZY[name] is None else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def get_include() -> str:
    """Directory holding ``race.h``, the C API of the race core (like ``numpy.get_include()``)."""
    here = _Path(__file__).resolve().parent
    installed = here / "include"
    if (installed / "race.h").is_file():
        return str(installed)
    source = here.parent / "csrc"  # editable install: the header stays in the source tree
    if (source / "race.h").is_file():
        return str(source)
    raise FileNotFoundError("race.h not found next to the fastrace package")


__all__ = [
    "ConfigError", "Contexts", "DataError", "Dataset", "DivergenceError", "Edge",
    "FastraceError", "GatedMoments", "IntegrationError", "Network", "NetworkError", "Path",
    "PathCorrelations", "PathExplosionError", "ReducedSolution", "Reduction", "ReductionError",
    "StoreError", "Trajectory", "WeightsError", "reduce", "resume", "simulate",
    "conserved_quantities", "forward", "gated_moments", "get_include", "gradient", "init", "loss",
    "loss_and_gradient", "path_correlations", "path_gradient", *_LAZY,
]
