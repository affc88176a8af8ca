"""The routing network of the paper (MATH.md §5): M input domains, one shared hidden pathway,
M output domains, trained on K of the M output domains per input domain.

Nodes ``in_i`` (n_items... input features), ``h1``, ``h2`` (hidden), ``out_j`` (features); edges
``in_i -> h1``, one shared ``h1 -> h2``, ``h2 -> out_j``. A sample is one (input domain i, output
domain j, item) triple: node gates open ``in_i`` and ``out_j`` only. The sample weights make
fastrace's loss ``Σ_n w_n ½|y − h|²`` equal the paper's: the sum over trained pairs of the mean
squared error over the items × features entries of each pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .._memory import refuse_if_no_room
from ..data import Dataset, real_array
from ..errors import ConfigError
from ..init import as_generator
from ..network import Network

# Yᵀ of MATH.md §5: 7 features (rows) × 4 items (columns)
REFERENCE_TARGETS = np.array([[6, 6, 6, 6], [4, 4, 0, 0], [0, 0, 4, 4], [3, 0, 0, 0],
                              [0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 0, 3]], dtype=np.float64)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def routing_gate(M: int, K: int, gate: str = "k_plus_minus", permute: bool = False,
                 seed=None) -> np.ndarray:
    """(M, M) boolean matrix: row = input domain, column = output domain, True = trained."""
    if not (_is_int(M) and M >= 1):
        raise ConfigError(f"routing: M must be a positive integer, got {M!r}")
    if not (_is_int(K) and 1 <= K <= M):
        raise ConfigError(f"routing: K must be an integer in 1..M={M}, got {K!r}")
    if not isinstance(permute, (bool, np.bool_)):
        raise ConfigError(f"routing: permute must be True or False, got {permute!r}")
    if gate == "k_plus":
        shifts = range(0, K)
    elif gate == "k_plus_minus":
        shifts = range(-((K - 1) // 2), K // 2 + 1)
    else:
        raise ConfigError(f"routing: gate must be 'k_plus' or 'k_plus_minus', got {gate!r}")
    refuse_if_no_room(M * M, "use fewer domains M", f"the {M} x {M} gate")
    trained = np.zeros((M, M), dtype=bool)
    for i in range(M):
        for d in shifts:
            trained[i, (i + d) % M] = True
    if permute:
        trained = trained[:, as_generator(seed).permutation(M)]
    return trained


@dataclass
class RoutingTask:
    """The routing network, its training data and what is needed to evaluate it.

    ``trained`` (M, M) bool; ``items`` (n_features_in, n_items) inputs as columns; ``targets``
    (n_out, n_items) targets as columns; ``data`` the training set (trained pairs only);
    ``all_pairs`` a data set over every (i, j) pair with the same weighting (built when first
    used: its memory grows as M³).
    """

    network: Network
    data: Dataset
    trained: np.ndarray
    items: np.ndarray
    targets: np.ndarray
    M: int
    K: int
    hidden: int
    sample_pairs: np.ndarray = field(repr=False)

    @cached_property
    def all_pairs(self) -> Dataset:
        pairs = np.argwhere(np.ones((self.M, self.M), dtype=bool))
        return _pairs_dataset(self.M, pairs, self.items, self.targets)

    @property
    def n_out(self) -> int:
        return self.targets.shape[0]

    @property
    def n_items(self) -> int:
        return self.items.shape[1]

    def inputs(self) -> list[str]:
        return [f"in_{i}" for i in range(self.M)]

    def outputs(self) -> list[str]:
        return [f"out_{j}" for j in range(self.M)]

    def pair_outputs(self, weights: dict[str, np.ndarray]) -> np.ndarray:
        """Network output for every pair and item: (M, M, n_out, n_items)."""
        Wh = np.asarray(weights["h1->h2"])
        lead = Wh.shape[:-2]
        out = np.empty(lead + (self.M, self.M, self.n_out, self.n_items))
        for i in range(self.M):
            h2 = Wh @ (np.asarray(weights[f"in_{i}->h1"]) @ self.items)
            for j in range(self.M):
                out[..., i, j, :, :] = np.asarray(weights[f"h2->out_{j}"]) @ h2
        return out

    def pair_errors(self, weights: dict[str, np.ndarray]) -> np.ndarray:
        """Per-pair error ``½ |Y − Ŷ_ij|²_F`` (MATH.md §5): (..., M, M)."""
        diff = self.pair_outputs(weights) - self.targets
        return 0.5 * np.sum(diff * diff, axis=(-2, -1))

    def trained_error(self, weights) -> np.ndarray:
        """Mean per-pair error over trained pairs."""
        return self.pair_errors(weights)[..., self.trained].mean(axis=-1)

    def untrained_error(self, weights) -> np.ndarray:
        """Mean per-pair error over untrained (held-out) pairs; NaN when K = M."""
        err = self.pair_errors(weights)[..., ~self.trained]
        return err.mean(axis=-1) if err.shape[-1] else np.full(err.shape[:-1], np.nan)


def _pairs_dataset(M, pairs, items, targets):
    n_items = items.shape[1]
    P = len(pairs) * n_items
    # M input and M output arrays of P rows, 2M gates, each built here and copied by Dataset
    refuse_if_no_room(16 * M * P * (items.shape[0] + targets.shape[0] + 2),
                      "use fewer domains M or trained pairs K",
                      f"the arrays of the routing data set (M = {M})")
    inputs = {f"in_{i}": np.zeros((P, items.shape[0])) for i in range(M)}
    outs = {f"out_{j}": np.zeros((P, targets.shape[0])) for j in range(M)}
    node_gates = {**{f"in_{i}": np.zeros(P) for i in range(M)},
                  **{f"out_{j}": np.zeros(P) for j in range(M)}}
    n = 0
    for i, j in pairs:
        rows = slice(n, n + n_items)
        inputs[f"in_{i}"][rows] = items.T
        outs[f"out_{j}"][rows] = targets.T
        node_gates[f"in_{i}"][rows] = 1.0
        node_gates[f"out_{j}"][rows] = 1.0
        n += n_items
    # Σ_pairs mean over (items × features) of squared error == Σ_n w ½|y − h|²
    weights = np.full(P, 2.0 / (n_items * targets.shape[0]))
    return Dataset(inputs, outs, node_gates=node_gates, weights=weights)


def routing(M: int = 7, K: int = 4, gate: str = "k_plus_minus", items: np.ndarray | None = None,
            hidden: int = 64, targets: np.ndarray | None = None, permute: bool = False,
            seed=None) -> RoutingTask:
    """Build the routing network and its data (MATH.md §5; defaults: the reference setup).

    items: (n_features_in, n_items), inputs as columns (default I_4); targets:
    (n_out, n_items), targets as columns (default the 7 × 4 reference matrix).
    """
    trained = routing_gate(M, K, gate, permute, seed)
    targets = REFERENCE_TARGETS if targets is None else _real("targets", targets)
    if targets.ndim != 2:
        raise ConfigError(f"routing: targets must be (n_out, n_items), got shape {targets.shape}")
    items = np.eye(targets.shape[1]) if items is None else _real("items", items)
    if items.ndim != 2 or items.shape[1] != targets.shape[1]:
        raise ConfigError(f"routing: items must be (n_features, n_items={targets.shape[1]}), "
                          f"got shape {items.shape}")
    if not (_is_int(hidden) and hidden >= 1):
        raise ConfigError(f"routing: hidden must be a positive integer, got {hidden!r}")
    net = Network()
    for i in range(M):
        net.add_node(f"in_{i}", items.shape[0], role="input")
    net.add_node("h1", hidden).add_node("h2", hidden)
    for j in range(M):
        net.add_node(f"out_{j}", targets.shape[0], role="output")
    for i in range(M):
        net.add_edge(f"in_{i}", "h1")
    net.add_edge("h1", "h2")
    for j in range(M):
        net.add_edge("h2", f"out_{j}")
    pairs = np.argwhere(trained)
    return RoutingTask(net, _pairs_dataset(M, pairs, items, targets), trained, items, targets,
                       int(M), int(K), int(hidden), pairs)


def _real(name: str, value) -> np.ndarray:
    try:
        return real_array(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"routing: {name} {exc}") from None
