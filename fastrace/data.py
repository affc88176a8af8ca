"""Data sets for gated networks: per-sample inputs, targets, gates and weights, and contexts.

Every per-sample array is sample-first: inputs ``(P, dim(u))``, targets ``(P, dim(w))``, gates
``(P,)``. Gates default to 1 and may be real-valued; sample weights default to ``1/P``.
A *context* is a distinct gate pattern: samples that share all their node and edge gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping

import numpy as np

from .errors import DataError
from .network import Network

_KINDS = {"c": "complex", "U": "str", "S": "bytes", "O": "object", "M": "datetime",
          "m": "timedelta", "V": "structured"}


def real_numbers(value: object) -> np.ndarray:
    """``value`` as an array in its own dtype (not copied if it is one). TypeError unless it
    holds real numbers (bool, integer or float): complex values would lose their imaginary
    part, strings would be parsed, objects could be anything."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        kind = _KINDS.get(arr.dtype.kind, "non-numeric")
        raise TypeError(f"holds {kind} values (dtype {arr.dtype}), not real numbers")
    return arr


def real_array(value: object) -> np.ndarray:
    """``value`` as a float64 array of real numbers (not copied if it is one); TypeError or
    ValueError otherwise (see ``real_numbers``)."""
    return real_numbers(value).astype(np.float64, copy=False)


def _real(name: str, value) -> np.ndarray:
    """``real_numbers(value)``, or a DataError naming ``name``."""
    try:
        return real_numbers(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: cannot be read as a float array: {exc}") from None


def _as_float_array(name: str, value, ndim: int) -> np.ndarray:
    """``value`` as a read-only float64 copy with ``ndim`` dimensions (a 1-d array is one column
    when ``ndim`` is 2), or a DataError naming ``name``."""
    arr = _real(name, value)
    if ndim == 2 and arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != ndim:
        raise DataError(f"{name}: expected a {ndim}-d array, got shape {arr.shape}")
    # a copy of our own (the one copy of the data set), read-only: the contexts, moments and
    # engines cached on the Dataset stay true to its arrays
    arr = arr.astype(np.float64, order="C")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise DataError(f"{name}: contains NaN or inf (first at index {tuple(int(i) for i in bad)})")
    arr.flags.writeable = False
    return arr


def _distinct_rows(patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a (P, n) array: (index of each distinct row's first occurrence, in
    lexicographic order of the rows; index (P,) of each row's distinct row).

    Columns are coded as small integers (0/1 gates directly) and combined into one integer key
    when the codes fit in 63 bits, so millions of samples group in a fraction of a second;
    otherwise rows are compared whole.
    """
    P, n = patterns.shape
    key = np.zeros(P, dtype=np.int64)
    capacity = 1
    for j in range(n):
        col = patterns[:, j]
        lo, hi = col.min(), col.max()
        if lo == hi:
            continue
        if lo == 0.0 and hi == 1.0 and np.all((col == 0.0) | (col == 1.0)):
            codes, radix = col.astype(np.int64), 2
        else:
            values, codes = np.unique(col, return_inverse=True)
            codes, radix = codes.reshape(-1).astype(np.int64), values.size
        if capacity > (2**62) // radix:
            _, first, inverse = np.unique(patterns, axis=0, return_index=True,
                                          return_inverse=True)
            return first, inverse.reshape(-1)
        key = key * radix + codes
        capacity *= radix
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


@dataclass(frozen=True)
class Contexts:
    """Samples grouped by distinct gate pattern.

    ``node_gates`` (n_contexts, n_nodes) and ``edge_gates`` (n_contexts, n_edges) in the network's
    node and edge order; ``index`` (P,) maps each sample to its context; ``weight`` (n_contexts,)
    is the total sample weight of each context.
    """

    node_gates: np.ndarray
    edge_gates: np.ndarray
    index: np.ndarray
    weight: np.ndarray

    @property
    def count(self) -> int:
        return self.node_gates.shape[0]


class Dataset:
    """Inputs, targets, gates and sample weights of a gated network's training data.

    Parameters
    ----------
    inputs : {input node: (P, dim)} arrays
    targets : {output node: (P, dim)} arrays
    node_gates : {node: (P,) array or scalar}, optional; missing nodes have gate 1
    edge_gates : {edge: (P,) array or scalar}, optional; missing edges have gate 1
    weights : (P,) non-negative sample weights, default ``1/P``

    Every value must be a real number (bool, integer or float; not complex, str or object).
    The arrays are copied and read-only: changing the caller's arrays afterwards changes
    nothing, and the contexts, moments and engines cached on the data set stay valid. For other
    data, build another Dataset.
    """

    def __init__(self, inputs: Mapping[str, object], targets: Mapping[str, object],
                 node_gates: Mapping[str, object] | None = None,
                 edge_gates: Mapping[str, object] | None = None,
                 weights: object | None = None) -> None:
        for name, value in (("inputs", inputs), ("targets", targets),
                            ("node_gates", node_gates), ("edge_gates", edge_gates)):
            if value is not None and not isinstance(value, Mapping):
                raise DataError(f"{name}: expected a mapping {{node or edge name: array}}, got "
                                f"{type(value).__name__}")
        if not inputs:
            raise DataError("inputs: at least one input node is needed")
        if not targets:
            raise DataError("targets: at least one output node is needed")
        self.inputs = {k: _as_float_array(f"inputs[{k!r}]", v, 2) for k, v in inputs.items()}
        self.targets = {k: _as_float_array(f"targets[{k!r}]", v, 2) for k, v in targets.items()}
        sizes = {f"inputs[{k!r}]": v.shape[0] for k, v in self.inputs.items()}
        sizes.update({f"targets[{k!r}]": v.shape[0] for k, v in self.targets.items()})
        n = next(iter(sizes.values()))
        for name, size in sizes.items():
            if size != n:
                raise DataError(f"{name}: has {size} samples but {next(iter(sizes))} has {n}")
        if n == 0:
            raise DataError("the data set has no samples")
        self.n_samples = n
        self.node_gates = {k: self._gate(f"node_gates[{k!r}]", v)
                           for k, v in (node_gates or {}).items()}
        self.edge_gates = {k: self._gate(f"edge_gates[{k!r}]", v)
                           for k, v in (edge_gates or {}).items()}
        if weights is None:
            self.weights = np.full(n, 1.0 / n)
            self.weights.flags.writeable = False
        else:
            w = _as_float_array("weights", weights, 1)
            if w.shape != (n,):
                raise DataError(f"weights: expected shape ({n},), got {w.shape}")
            if np.any(w < 0):
                raise DataError(f"weights: negative sample weight at index {int(np.argmax(w < 0))}")
            if not np.any(w > 0):  # the loss and its gradient would be 0 whatever the data
                raise DataError("weights: every sample weight is 0")
            self.weights = w
        self._cache: dict[tuple, object] = {}

    def _arrays(self) -> list[np.ndarray]:
        return [*self.inputs.values(), *self.targets.values(), *self.node_gates.values(),
                *self.edge_gates.values(), self.weights]

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without the cache (engines hold thread-local state; the
        copy rebuilds what it needs)."""
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state: dict) -> None:
        """Unpickled and deep-copied arrays are fresh and writable: make them read-only again."""
        self.__dict__.update(state)
        self._cache = {}
        for arr in self._arrays():
            arr.flags.writeable = False

    def _gate(self, name: str, value) -> np.ndarray:
        arr = _real(name, value)
        if arr.ndim == 0:  # a scalar: the same gate for every sample
            arr = np.broadcast_to(arr, (self.n_samples,))
        arr = _as_float_array(name, arr, 1)
        if arr.shape != (self.n_samples,):
            raise DataError(f"{name}: expected shape ({self.n_samples},), got {arr.shape}")
        return arr

    # ------------------------------------------------------------------ checks against a network
    def check(self, net: Network) -> Dataset:
        """Raise DataError unless this data set fits ``net`` (nodes, edges and dimensions)."""
        key = ("check", net.signature())
        if key in self._cache:
            return self
        net.validate()
        for u in net.inputs:
            if u not in self.inputs:
                raise DataError(f"inputs: missing input node {u!r}")
        for w in net.outputs:
            if w not in self.targets:
                raise DataError(f"targets: missing output node {w!r}")
        for u, x in self.inputs.items():
            if u not in net.inputs:
                why = "unknown node" if u not in net.nodes else "not an input node (it has incoming edges)"
                raise DataError(f"inputs[{u!r}]: {why}")
            if x.shape[1] != net.dim(u):
                raise DataError(f"inputs[{u!r}]: node has dimension {net.dim(u)}, "
                                f"array has {x.shape[1]} columns")
        for w, y in self.targets.items():
            if w not in net.outputs:
                why = ("unknown node" if w not in net.nodes
                       else "not an output node (it has outgoing edges)")
                raise DataError(f"targets[{w!r}]: {why}")
            if y.shape[1] != net.dim(w):
                raise DataError(f"targets[{w!r}]: node has dimension {net.dim(w)}, "
                                f"array has {y.shape[1]} columns")
        for v in self.node_gates:
            if v not in net.nodes:
                raise DataError(f"node_gates[{v!r}]: unknown node")
        for e in self.edge_gates:
            if e not in net.edges:
                raise DataError(f"edge_gates[{e!r}]: unknown edge")
        self._cache[key] = True
        return self

    # ------------------------------------------------------------------ gates and contexts
    def gate_matrix(self, net: Network) -> tuple[np.ndarray, np.ndarray]:
        """Node gates (P, n_nodes) and edge gates (P, n_edges) in the network's order."""
        self.check(net)
        ones = np.ones(self.n_samples)
        g_nodes = np.stack([self.node_gates.get(v, ones) for v in net.nodes], axis=1)
        g_edges = np.stack([self.edge_gates.get(e, ones) for e in net.edges], axis=1)
        return g_nodes, g_edges

    def contexts(self, net: Network) -> Contexts:
        """Group samples by distinct gate pattern (computed once per network architecture)."""
        key = ("contexts", net.signature())
        cached = self._cache.get(key)
        if cached is None:
            g_nodes, g_edges = self.gate_matrix(net)
            patterns = np.concatenate([g_nodes, g_edges], axis=1) + 0.0  # -0.0 -> 0.0
            first, index = _distinct_rows(patterns)
            unique = patterns[first]
            weight = np.bincount(index, weights=self.weights, minlength=unique.shape[0])
            n_nodes = g_nodes.shape[1]
            cached = Contexts(np.ascontiguousarray(unique[:, :n_nodes]),
                              np.ascontiguousarray(unique[:, n_nodes:]), index, weight)
            for arr in (cached.node_gates, cached.edge_gates, cached.index, cached.weight):
                arr.flags.writeable = False  # shared by every user of the cache
            self._cache[key] = cached
        return cached  # type: ignore[return-value]

    def stacked_inputs(self, net: Network) -> np.ndarray:
        """All input nodes side by side, (P, Σ dim(u)) in ``net.inputs`` order."""
        self.check(net)
        return np.concatenate([self.inputs[u] for u in net.inputs], axis=1)

    def stacked_targets(self, net: Network) -> np.ndarray:
        """All output nodes side by side, (P, Σ dim(w)) in ``net.outputs`` order."""
        self.check(net)
        return np.concatenate([self.targets[w] for w in net.outputs], axis=1)

    def subset(self, index) -> Dataset:
        """The samples selected by ``index``, a 1-d array of integers (repeats allowed) or of
        P booleans (weights kept as they are, not renormalised)."""
        idx, n = np.asarray(index), self.n_samples
        if idx.ndim != 1:
            raise DataError(f"subset: index must be 1-d, got shape {idx.shape}")
        if idx.size == 0:
            raise DataError("subset: no samples selected")
        if idx.dtype.kind == "b":
            if idx.shape != (n,):
                raise DataError(f"subset: a boolean index needs {n} entries, got {idx.size}")
        elif idx.dtype.kind in "iu":
            bad = (idx < -n) | (idx >= n)
            if np.any(bad):
                raise DataError(f"subset: index {idx[np.argmax(bad)]} is out of range for "
                                f"{n} samples")
        else:
            raise DataError(f"subset: index must hold integers or booleans, got dtype {idx.dtype}")
        return Dataset({k: v[idx] for k, v in self.inputs.items()},
                       {k: v[idx] for k, v in self.targets.items()},
                       {k: v[idx] for k, v in self.node_gates.items()},
                       {k: v[idx] for k, v in self.edge_gates.items()},
                       self.weights[idx])

    def __repr__(self) -> str:
        return (f"Dataset(P={self.n_samples}, inputs={list(self.inputs)}, "
                f"targets={list(self.targets)})")
