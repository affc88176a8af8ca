"""``RaceSystem``: the flat form of a reduced (race) system, shared by the numba and C kernels.

A race system has ``n_edges`` scalar weights ``b_e`` and ``n_paths`` paths; path p is an
ordered list of distinct edges (input to output) with strength ``pi_p = prod_{e in p} b_e``;
``T(p)`` lists the paths that end at the same output as p.  Each singular *mode* m has its own
``s_p`` and ``d_jp``, and evolves on its own (MATH.md section 3):

    db_e/dt = rate_e * sum_{p contains e} (prod_{e' in p, e' != e} b_e') (s_p - sum_{j in T(p)} d_jp pi_j)

Storage (CSR, int64): edges of path p are ``path_edges[path_ptr[p]:path_ptr[p+1]]`` and T(p) is
``target_paths[target_ptr[p]:target_ptr[p+1]]``; ``d[m, k]`` is ``d_jp`` for
``j = target_paths[k]`` with k in row p.  ``rate`` holds per-edge rate factors multiplying each
edge's derivative (for example the K/M², K/M, K/M² of the routing mode equations, MATH.md §4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ._memory import refuse_if_no_room as _refuse_if_no_room
from .data import real_array
from .errors import DataError

try:  # the C core; absent only when the package was not built
    from . import _race
except ImportError:  # pragma: no cover - exercised only in an unbuilt source tree
    _race = None

__all__ = ["RaceSystem"]


def _writable(args: tuple) -> tuple:
    """numba compiles read-only arrays as a type of their own: hand kernels writable arrays
    only, so every call shares one compiled signature per kernel."""
    return tuple(a.copy() if isinstance(a, np.ndarray) and not a.flags.writeable else a
                 for a in args)


def _numba_kernel(name: str, system: RaceSystem, *args):  # pragma: no cover - no C core
    from ._kernels import race as kernels
    st = kernels.pack_structure(system.path_ptr, system.path_edges, system.target_ptr,
                                system.target_paths)
    return getattr(kernels, name)(st, *_writable(args))


def _real(value, name: str) -> np.ndarray:
    """value as a float64 array; DataError for anything but real numbers (numpy would drop an
    imaginary part with only a warning, and read None as NaN)."""
    try:
        return real_array(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be a real array: {exc}") from None


def _int_array(value, name: str, ndim: int = 1) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be a {ndim}-d integer array: {exc}") from None
    if arr.ndim != ndim:
        raise DataError(f"{name} must be a {ndim}-d integer array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or np.any(arr != np.round(arr)) or \
                not np.all(np.abs(arr) < 2.0 ** 63):  # inf, NaN: no int64
            raise DataError(f"{name} must hold integers, got dtype {arr.dtype}")
    out = np.array(arr, dtype=np.int64, order="C")  # a copy: the caller's array stays writable
    out.setflags(write=False)
    return out


def _float_array(value, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = _real(value, name)
    if arr.shape != shape:
        raise DataError(f"{name} must have shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} holds NaN or inf values")
    out = np.array(arr, dtype=np.float64, order="C", copy=True)
    out.setflags(write=False)
    return out


def _check_csr(ptr: np.ndarray, idx: np.ndarray, n_rows: int, n_cols: int, ptr_name: str,
               idx_name: str, what: str) -> None:
    if ptr.shape != (n_rows + 1,):
        raise DataError(f"{ptr_name} must have n_paths + 1 = {n_rows + 1} entries, got {ptr.size}")
    if ptr[0] != 0 or np.any(np.diff(ptr) < 0) or ptr[-1] != idx.size:
        raise DataError(f"{ptr_name} must start at 0, never decrease and end at "
                        f"len({idx_name}) = {idx.size}")
    if idx.size and (idx.min() < 0 or idx.max() >= n_cols):
        raise DataError(f"{idx_name} must hold {what} indices in [0, {n_cols})")
    for p in range(n_rows):
        row = idx[ptr[p]:ptr[p + 1]]
        if np.unique(row).size != row.size:
            raise DataError(f"{idx_name}: row {p} lists a {what} twice")


def _check_nodes(path_ptr: np.ndarray, path_edges: np.ndarray, src: np.ndarray,
                 tgt: np.ndarray) -> None:
    """Every path is a chain of edges from an input node (no edge enters it) to an output node
    (no edge leaves it); else :meth:`RaceSystem.conserved` silently conserves nothing."""
    owner = np.repeat(np.arange(path_ptr.size - 1), np.diff(path_ptr))
    inner = np.flatnonzero(owner[:-1] == owner[1:])  # k and k + 1 on the same path
    bad = inner[tgt[path_edges[inner]] != src[path_edges[inner + 1]]]
    if bad.size:
        k = bad[0]
        raise DataError(f"path {owner[k]}: edge {path_edges[k]} ends at node "
                        f"{tgt[path_edges[k]]} but the next edge {path_edges[k + 1]} leaves node "
                        f"{src[path_edges[k + 1]]}; paths must follow edge_source / edge_target")
    first, last = path_edges[path_ptr[:-1]], path_edges[path_ptr[1:] - 1]
    for ends, nodes, where, what in ((src[first], tgt, "starts", "enters"),
                                     (tgt[last], src, "ends", "leaves")):
        bad = np.flatnonzero(np.isin(ends, nodes))
        if bad.size:
            raise DataError(f"path {bad[0]} {where} at node {ends[bad[0]]}, which an edge "
                            f"{what}: paths must run from an input node to an output node")


@dataclass(frozen=True, eq=False)
class RaceSystem:
    """A reduced system in flat (CSR) form; see the module docstring.

    Fields (arrays are stored read-only, C-contiguous):
    - ``n_edges``: number of scalar edges.
    - ``path_ptr`` (n_paths+1,), ``path_edges`` (nnz,): edges of each path, input first.
    - ``target_ptr`` (n_paths+1,), ``target_paths`` (nnz_t,): T(p) of each path.
    - ``s`` (n_modes, n_paths); ``d`` (n_modes, nnz_t).  A 1-d ``s`` (n_paths,) with a 1-d
      ``d`` (nnz_t,) is one mode.
    - ``rate`` (n_edges,): per-edge rate factors, default ones.
    - ``edge_names``: default ``("e0", "e1", ...)``.
    - ``edge_source``, ``edge_target`` (n_edges,) int node ids, optional; they define the hidden
      nodes of :meth:`conserved`.
    """

    n_edges: int
    path_ptr: np.ndarray
    path_edges: np.ndarray
    target_ptr: np.ndarray
    target_paths: np.ndarray
    s: np.ndarray
    d: np.ndarray
    rate: np.ndarray | None = None
    edge_names: tuple[str, ...] | None = None
    edge_source: np.ndarray | None = None
    edge_target: np.ndarray | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        if isinstance(self.n_edges, bool) or not isinstance(self.n_edges, (int, np.integer)):
            raise DataError(f"n_edges must be an int, got {self.n_edges!r}")
        n_edges = int(self.n_edges)
        if n_edges < 1:
            raise DataError(f"n_edges must be >= 1, got {n_edges}")
        put(self, "n_edges", n_edges)
        path_ptr = _int_array(self.path_ptr, "path_ptr")
        path_edges = _int_array(self.path_edges, "path_edges")
        target_ptr = _int_array(self.target_ptr, "target_ptr")
        target_paths = _int_array(self.target_paths, "target_paths")
        n_paths = path_ptr.size - 1
        if n_paths < 1:
            raise DataError("path_ptr must describe at least one path (n_paths + 1 >= 2 entries)")
        _check_csr(path_ptr, path_edges, n_paths, n_edges, "path_ptr", "path_edges", "edge")
        if np.any(np.diff(path_ptr) == 0):
            raise DataError("path_ptr: every path must have at least one edge")
        _check_csr(target_ptr, target_paths, n_paths, n_paths, "target_ptr", "target_paths",
                   "path")
        for name, value in (("path_ptr", path_ptr), ("path_edges", path_edges),
                            ("target_ptr", target_ptr), ("target_paths", target_paths)):
            put(self, name, value)

        nnz_t = target_paths.size
        s_in, d_in = _real(self.s, "s"), _real(self.d, "d")
        if s_in.ndim == 1 and d_in.ndim == 1:
            s_in, d_in = s_in[None, :], d_in[None, :]
        if s_in.ndim != 2:
            raise DataError(f"s must have shape (n_modes, n_paths={n_paths}), got {s_in.shape}")
        n_modes = s_in.shape[0]
        if n_modes < 1:
            raise DataError("s must hold at least one mode")
        put(self, "s", _float_array(s_in, "s", (n_modes, n_paths)))
        put(self, "d", _float_array(d_in, "d", (n_modes, nnz_t)))
        rate = np.ones(n_edges) if self.rate is None else self.rate
        put(self, "rate", _float_array(rate, "rate", (n_edges,)))

        if self.edge_names is None:
            names = tuple(f"e{i}" for i in range(n_edges))
        else:
            names = tuple(self.edge_names)
            if len(names) != n_edges or not all(isinstance(x, str) for x in names):
                raise DataError(f"edge_names must be {n_edges} strings, got {self.edge_names!r}")
            if len(set(names)) != n_edges:
                raise DataError("edge_names must be unique")
        put(self, "edge_names", names)

        if (self.edge_source is None) != (self.edge_target is None):
            raise DataError("edge_source and edge_target must be given together")
        if self.edge_source is not None:
            src = _int_array(self.edge_source, "edge_source")
            tgt = _int_array(self.edge_target, "edge_target")
            if src.shape != (n_edges,) or tgt.shape != (n_edges,):
                raise DataError(f"edge_source and edge_target must have shape ({n_edges},)")
            _check_nodes(path_ptr, path_edges, src, tgt)
            put(self, "edge_source", src)
            put(self, "edge_target", tgt)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]], s: ArrayLike, d: ArrayLike,
                   rate: ArrayLike | None = None, edge_names: Sequence[str] | None = None,
                   n_edges: int | None = None, edge_source: ArrayLike | None = None,
                   edge_target: ArrayLike | None = None) -> RaceSystem:
        """Build from a list of paths (edge indices, input first).

        ``s`` (n_modes, n_paths) or (n_paths,); ``d`` dense (n_modes, n_paths, n_paths) or
        (n_paths, n_paths) with ``d[m, j, p] = d_jp``.  T(p) = {p} ∪ {j : some mode has
        d[m, j, p] != 0}.  ``n_edges`` defaults to 1 + the largest edge index used.
        """
        try:
            edge_lists = [[int(e) for e in path] for path in paths]
        except (TypeError, ValueError):
            raise DataError("paths must be a sequence of sequences of edge indices") from None
        n_paths = len(edge_lists)
        if n_paths < 1:
            raise DataError("paths must hold at least one path")
        if n_edges is None:
            used = [e for path in edge_lists for e in path]
            n_edges = (max(used) + 1) if used else 0
        s_arr = _real(s, "s")
        d_arr = _real(d, "d")
        if s_arr.ndim == 1:
            s_arr = s_arr[None, :]
        if d_arr.ndim == 2:
            d_arr = d_arr[None, :, :]
        if d_arr.ndim != 3 or d_arr.shape[1:] != (n_paths, n_paths):
            raise DataError(f"d must have shape (n_modes, {n_paths}, {n_paths}), got "
                            f"{np.shape(d)}")
        if s_arr.ndim != 2 or s_arr.shape[0] != d_arr.shape[0]:
            raise DataError(f"s must have shape (n_modes={d_arr.shape[0]}, {n_paths}), got "
                            f"{np.shape(s)}")
        if not np.all(np.isfinite(d_arr)):
            raise DataError("d holds NaN or inf values")
        path_ptr = np.zeros(n_paths + 1, dtype=np.int64)
        path_ptr[1:] = np.cumsum([len(path) for path in edge_lists])
        path_edges = np.array([e for path in edge_lists for e in path], dtype=np.int64)
        coupled = np.any(d_arr != 0.0, axis=0)  # coupled[j, p]
        rows = [sorted({p} | set(np.flatnonzero(coupled[:, p]).tolist())) for p in range(n_paths)]
        target_ptr = np.zeros(n_paths + 1, dtype=np.int64)
        target_ptr[1:] = np.cumsum([len(row) for row in rows])
        target_paths = np.array([j for row in rows for j in row], dtype=np.int64)
        owner = np.repeat(np.arange(n_paths), np.diff(target_ptr))
        d_vals = d_arr[:, target_paths, owner]
        return cls(n_edges=n_edges, path_ptr=path_ptr, path_edges=path_edges,
                   target_ptr=target_ptr, target_paths=target_paths, s=s_arr, d=d_vals,
                   rate=rate, edge_names=None if edge_names is None else tuple(edge_names),
                   edge_source=edge_source, edge_target=edge_target)

    def with_modes(self, s: ArrayLike, d: ArrayLike) -> RaceSystem:
        """A copy with other modes: ``s`` (n_modes, n_paths); ``d`` either CSR values
        (n_modes, nnz_t) or dense (n_modes, n_paths, n_paths), zero outside every T(p)."""
        d_arr = _real(d, "d")
        if d_arr.ndim == 3:
            if d_arr.shape[1:] != (self.n_paths, self.n_paths):
                raise DataError(f"dense d must have shape (n_modes, {self.n_paths}, "
                                f"{self.n_paths}), got {d_arr.shape}")
            mask = np.zeros((self.n_paths, self.n_paths), dtype=bool)
            mask[self.target_paths, self._target_owner] = True
            if np.any(d_arr[:, ~mask] != 0.0):
                raise DataError("d couples paths outside T(p) of this system; build a new "
                                "system with RaceSystem.from_paths instead")
            d_arr = d_arr[:, self.target_paths, self._target_owner]
        return dataclasses.replace(self, s=s, d=d_arr)

    # ---------------------------------------------------------------- shape facts

    @property
    def n_paths(self) -> int:
        return self.path_ptr.size - 1

    @property
    def n_modes(self) -> int:
        return self.s.shape[0]

    @property
    def n_targets(self) -> int:
        """nnz_t, the total length of all T(p)."""
        return self.target_paths.size

    @property
    def paths(self) -> tuple[tuple[int, ...], ...]:
        """Edge indices of every path, input first."""
        return tuple(tuple(self.path_edges[self.path_ptr[p]:self.path_ptr[p + 1]].tolist())
                     for p in range(self.n_paths))

    @property
    def targets(self) -> tuple[tuple[int, ...], ...]:
        """T(p) of every path."""
        return tuple(tuple(self.target_paths[self.target_ptr[p]:self.target_ptr[p + 1]].tolist())
                     for p in range(self.n_paths))

    @property
    def _target_owner(self) -> np.ndarray:
        """p for every entry k of target_paths (the row k lies in)."""
        return np.repeat(np.arange(self.n_paths), np.diff(self.target_ptr))

    def d_dense(self) -> np.ndarray:
        """d as a dense (n_modes, n_paths, n_paths) array, ``d[m, j, p] = d_jp``."""
        out = np.zeros((self.n_modes, self.n_paths, self.n_paths))
        out[:, self.target_paths, self._target_owner] = self.d
        return out

    @property
    def hidden_nodes(self) -> np.ndarray:
        """Node ids that are both an edge target and an edge source (needs edge_source)."""
        if self.edge_source is None:
            raise DataError("this RaceSystem has no edge_source / edge_target node structure")
        return np.intersect1d(self.edge_source, self.edge_target)

    # ---------------------------------------------------------------- evaluation

    def _structure(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.path_ptr, self.path_edges, self.target_ptr, self.target_paths

    def _mode_batch(self, b, what: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """b (..., n_modes, n_edges), or (n_edges,) for every mode -> flat (n_sys, n_edges)."""
        arr = _real(b, f"{what}: b")
        if arr.ndim == 1:
            arr = np.broadcast_to(arr, (self.n_modes, arr.shape[0]))
        if arr.ndim < 2 or arr.shape[-2:] != (self.n_modes, self.n_edges):
            raise DataError(f"{what}: b must have shape (..., n_modes={self.n_modes}, "
                            f"n_edges={self.n_edges}) or ({self.n_edges},), got {np.shape(b)}")
        # C-contiguous and aligned, as the C core reads it (a copy only when needed)
        return np.require(arr.reshape(-1, self.n_edges), requirements="CA"), arr.shape[:-1]

    def path_strengths(self, b: ArrayLike) -> np.ndarray:
        """pi (..., n_paths) of b (..., n_edges)."""
        arr = _real(b, "path_strengths: b")
        if arr.ndim < 1 or arr.shape[-1] != self.n_edges:
            raise DataError(f"path_strengths: b must have shape (..., {self.n_edges}), got "
                            f"{arr.shape}")
        flat = np.require(arr.reshape(-1, self.n_edges), requirements="CA")
        if flat.shape[0] == 0:
            return np.zeros(arr.shape[:-1] + (self.n_paths,))
        if _race is not None:
            pi = _race.path_strengths(*self._structure(), flat)
        else:  # pragma: no cover
            pi = _numba_kernel("path_strengths_batch", self, flat)
        return pi.reshape(arr.shape[:-1] + (self.n_paths,))

    def rhs(self, b: ArrayLike) -> np.ndarray:
        """db/dt (..., n_modes, n_edges) at b (..., n_modes, n_edges); a (n_edges,) b is used
        for every mode."""
        flat, lead = self._mode_batch(b, "rhs")
        if flat.shape[0] == 0:
            return np.zeros(lead + (self.n_edges,))
        if _race is not None:
            out = _race.rhs(*self._structure(), flat, self.s, self.d, self.rate[None, :])
        else:  # pragma: no cover
            out = _numba_kernel("rhs_batch", self, flat, self.s, self.d, self.rate[None, :], 64)
        return out.reshape(lead + (self.n_edges,))

    def jacobian(self, b: ArrayLike) -> np.ndarray:
        """d(db_e/dt)/d(b_f): (..., n_modes, n_edges, n_edges) at b (..., n_modes, n_edges)."""
        flat, lead = self._mode_batch(b, "jacobian")
        if flat.shape[0] == 0:
            return np.zeros(lead + (self.n_edges, self.n_edges))
        # n_edges times the size of b, written page by page: refuse it before the OOM killer
        _refuse_if_no_room(flat.shape[0] * self.n_edges * self.n_edges * 8,
                           "evaluate fewer b at a time", "the Jacobians")
        if _race is not None:
            out = _race.jacobian(*self._structure(), flat, self.s, self.d, self.rate[None, :])
        else:  # pragma: no cover
            out = _numba_kernel("jacobian_batch", self, flat, self.s, self.d,
                                self.rate[None, :], 64)
        return out.reshape(lead + (self.n_edges, self.n_edges))

    def loss(self, b: ArrayLike, s: ArrayLike | None = None) -> np.ndarray:
        """Per-mode loss without its constant, (..., n_modes), at b (..., n_modes, n_edges):
        ``-sum_p s_p pi_p + 1/2 sum_p sum_{j in T(p)} pi_j d_jp pi_p``.

        ``s`` optionally replaces the modes' s: (n_modes, n_paths) or any (..., n_modes,
        n_paths) whose leading shape is a suffix of b's leading shape.
        """
        flat, lead = self._mode_batch(b, "loss")
        if flat.shape[0] == 0:
            return np.zeros(lead)
        s_rows = self.s
        if s is not None:
            s_arr = _real(s, "loss: s")
            s_lead = s_arr.shape[:-1]
            if s_arr.ndim < 2 or s_arr.shape[-2:] != (self.n_modes, self.n_paths) or \
                    len(s_lead) > len(lead) or lead[len(lead) - len(s_lead):] != s_lead:
                raise DataError(f"loss: s must have shape (..., {self.n_modes}, {self.n_paths}) "
                                f"matching b's leading shape {lead}, got {s_arr.shape}")
            s_rows = np.require(s_arr.reshape(-1, self.n_paths), requirements="CA")
        if _race is not None:
            out = _race.loss(*self._structure(), flat, s_rows, self.d)
        else:  # pragma: no cover
            out = _numba_kernel("loss_batch", self, flat, s_rows, self.d, 64)
        return out.reshape(lead)

    def conserved(self, b: ArrayLike) -> np.ndarray:
        """Per hidden node v: ``sum_{e into v} b_e²/rate_e - sum_{e out of v} b_e²/rate_e``,
        shape (..., n_hidden) for b (..., n_edges), nodes ordered as :attr:`hidden_nodes`.

        Constant under the flow of every mode (with unit rates it is MATH.md's scalar law).
        An edge with rate 0 never moves but still feels a gradient, so a node it touches has no
        conserved quantity: NaN there (an edge on no path has no gradient and is left out).
        Needs edge_source / edge_target.
        """
        hidden = self.hidden_nodes
        arr = _real(b, "conserved: b")
        if arr.ndim < 1 or arr.shape[-1] != self.n_edges:
            raise DataError(f"conserved: b must have shape (..., {self.n_edges}), got "
                            f"{arr.shape}")
        weight = np.zeros(self.n_edges)
        moving = self.rate != 0.0
        weight[moving] = 1.0 / self.rate[moving]
        sign = (self.edge_target[None, :] == hidden[:, None]).astype(float) \
            - (self.edge_source[None, :] == hidden[:, None]).astype(float)
        out = (arr * arr) @ (sign * weight[None, :]).T
        frozen = ~moving
        frozen[np.setdiff1d(np.arange(self.n_edges), self.path_edges)] = False
        out[..., np.any(sign[:, frozen] != 0.0, axis=1)] = np.nan
        return out

    def __repr__(self) -> str:
        return (f"RaceSystem(n_edges={self.n_edges}, n_paths={self.n_paths}, "
                f"n_modes={self.n_modes}, n_targets={self.n_targets})")
