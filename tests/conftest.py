"""Shared test helpers: random gated DAGs and data sets."""

from __future__ import annotations

import os

import numpy as np

import fastrace as fr

os.environ.setdefault("MPLBACKEND", "Agg")


def random_dag(rng: np.random.Generator, n_inputs: int = 2, n_hidden: int = 3,
               max_dim: int = 4, extra_edges: int = 3) -> fr.Network:
    """A random connected DAG: inputs first, each later node fed by 1-2 earlier nodes, plus
    random skip connections; sinks become outputs (at least one)."""
    names = [f"x{i}" for i in range(n_inputs)] + [f"h{i}" for i in range(n_hidden)] + ["y0"]
    net = fr.Network()
    for name in names:
        net.add_node(name, int(rng.integers(1, max_dim + 1)))
    n = len(names)
    edges = set()
    for j in range(n_inputs, n):
        for i in rng.choice(j, size=min(j, int(rng.integers(1, 3))), replace=False):
            edges.add((int(i), j))
    for i in range(n_inputs):  # every input feeds something
        if not any(a == i for a, _ in edges):
            edges.add((i, int(rng.integers(n_inputs, n))))
    for _ in range(extra_edges):
        i = int(rng.integers(0, n - 1))
        j = int(rng.integers(max(i + 1, n_inputs), n))
        edges.add((i, j))
    for i, j in sorted(edges):
        net.add_edge(names[i], names[j])
    return net.validate()


def random_data(rng: np.random.Generator, net: fr.Network, n_samples: int = 12,
                gates: str = "binary", n_patterns: int | None = None) -> fr.Dataset:
    """Random inputs/targets with random node and edge gates ("binary", "real" or "none").

    With ``n_patterns`` the gates take only that many distinct patterns (repeated contexts)."""
    inputs = {u: rng.standard_normal((n_samples, net.dim(u))) for u in net.inputs}
    targets = {w: rng.standard_normal((n_samples, net.dim(w))) for w in net.outputs}
    if gates == "none":
        return fr.Dataset(inputs, targets)
    n_pat = n_patterns or n_samples
    which = rng.integers(0, n_pat, n_samples)

    def draw(count):
        if gates == "binary":
            pats = (rng.random((n_pat, count)) < 0.75).astype(float)
        else:
            pats = rng.uniform(-1.5, 1.5, (n_pat, count))
        return pats[which]

    gn = draw(len(net.nodes))
    ge = draw(len(net.edges))
    weights = rng.uniform(0.1, 1.0, n_samples)
    return fr.Dataset(inputs, targets,
                      node_gates={v: gn[:, i] for i, v in enumerate(net.nodes)},
                      edge_gates={e: ge[:, i] for i, e in enumerate(net.edges)},
                      weights=weights / weights.sum())
