"""The architecture of a gated deep linear network: nodes, edges, inputs, outputs and paths.

A network is a directed acyclic graph. Node ``v`` is a layer of ``dim`` units; edge ``e`` carries a
weight matrix of shape ``(dim(target), dim(source))``. Input nodes have no incoming edges, output
nodes no outgoing ones (MATH.md section 1). A path is a tuple of edge names from an input node to an
output node, ordered input first.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from collections.abc import Iterator, Sequence

from .errors import NetworkError, PathExplosionError

DEFAULT_PATH_LIMIT = 100_000


@dataclass(frozen=True)
class Edge:
    """A directed edge ``source -> target`` carrying a ``(dim(target), dim(source))`` weight."""

    name: str
    source: str
    target: str


@dataclass(frozen=True)
class Path:
    """An input-to-output path: its edges in order (input side first) and its end nodes."""

    edges: tuple[str, ...]
    source: str
    target: str

    def __len__(self) -> int:
        return len(self.edges)

    def split(self, edge: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The antecedent part (before ``edge``) and subsequent part (after ``edge``) of the path."""
        try:
            i = self.edges.index(edge)
        except ValueError:
            raise NetworkError(f"edge {edge!r} is not on path {self.edges}") from None
        return self.edges[:i], self.edges[i + 1:]


class Network:
    """A gated deep linear network architecture (a DAG of linear layers).

    Nodes and edges keep the order in which they were added; every array fastrace returns that is
    indexed by node or edge follows that order. Input and output nodes are inferred from the graph
    unless declared with ``add_node(..., role="input" | "output")``.
    """

    def __init__(self) -> None:
        self._dims: dict[str, int] = {}
        self._roles: dict[str, str | None] = {}
        self._edges: dict[str, Edge] = {}
        self._out: dict[str, list[str]] = {}
        self._in: dict[str, list[str]] = {}
        self._cache: dict[str, object] = {}

    # ------------------------------------------------------------------ building
    def add_node(self, name: str, dim: int, role: str | None = None) -> Network:
        """Add a node of ``dim`` units; ``role`` may declare it an "input" or "output" node."""
        if not isinstance(name, str) or not name:
            raise NetworkError(f"node name must be a non-empty string, got {name!r}")
        if name in self._dims:
            raise NetworkError(f"duplicate node name {name!r}")
        try:
            if isinstance(dim, bool):
                raise TypeError
            dim = operator.index(dim)
        except TypeError:
            raise NetworkError(
                f"node {name!r}: dimension must be a positive integer, got {dim!r}") from None
        if dim <= 0:
            raise NetworkError(f"node {name!r}: dimension must be a positive integer, got {dim}")
        if role not in (None, "input", "output"):
            raise NetworkError(f"node {name!r}: role must be 'input', 'output' or None, got {role!r}")
        self._dims[name] = dim
        self._roles[name] = role
        self._out[name] = []
        self._in[name] = []
        self._cache.clear()
        return self

    def add_edge(self, source: str, target: str, name: str | None = None) -> Network:
        """Add the edge ``source -> target`` (named ``"source->target"`` unless ``name`` is given)."""
        for node in (source, target):
            if not isinstance(node, str) or node not in self._dims:
                raise NetworkError(f"edge {source!r} -> {target!r}: unknown node {node!r}")
        if name is None:
            name = f"{source}->{target}"
        if not isinstance(name, str) or not name:
            raise NetworkError(f"edge name must be a non-empty string, got {name!r}")
        if name in self._edges:
            raise NetworkError(f"duplicate edge name {name!r}")
        if source == target or self._reaches(target, source):
            raise NetworkError(f"edge {name!r} ({source} -> {target}) would create a cycle")
        if self._roles[source] == "output":
            raise NetworkError(f"edge {name!r} leaves {source!r}, which is declared an output node")
        if self._roles[target] == "input":
            raise NetworkError(f"edge {name!r} enters {target!r}, which is declared an input node")
        self._edges[name] = Edge(name, source, target)
        self._out[source].append(name)
        self._in[target].append(name)
        self._cache.clear()
        return self

    def _reaches(self, start: str, goal: str) -> bool:
        stack, seen = [start], {start}
        while stack:
            node = stack.pop()
            if node == goal:
                return True
            for e in self._out[node]:
                nxt = self._edges[e].target
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return False

    # ------------------------------------------------------------------ structure
    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._dims)

    @property
    def edges(self) -> tuple[str, ...]:
        return tuple(self._edges)

    def dim(self, node: str) -> int:
        """Number of units of ``node``."""
        try:
            return self._dims[node]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise NetworkError(f"unknown node {node!r}") from None

    def edge(self, name: str) -> Edge:
        """The edge called ``name``."""
        try:
            return self._edges[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise NetworkError(f"unknown edge {name!r}") from None

    def weight_shape(self, edge: str) -> tuple[int, int]:
        """Shape ``(dim(target), dim(source))`` of the weight of ``edge``."""
        e = self.edge(edge)
        return self._dims[e.target], self._dims[e.source]

    def in_edges(self, node: str) -> tuple[str, ...]:
        self.dim(node)
        return tuple(self._in[node])

    def out_edges(self, node: str) -> tuple[str, ...]:
        self.dim(node)
        return tuple(self._out[node])

    @property
    def inputs(self) -> tuple[str, ...]:
        """Input nodes (no incoming edges), in node order."""
        self.validate()
        return tuple(v for v in self._dims if not self._in[v])

    @property
    def outputs(self) -> tuple[str, ...]:
        """Output nodes (no outgoing edges), in node order."""
        self.validate()
        return tuple(v for v in self._dims if not self._out[v])

    @property
    def hidden(self) -> tuple[str, ...]:
        """Nodes that are neither inputs nor outputs."""
        self.validate()
        return tuple(v for v in self._dims if self._in[v] and self._out[v])

    @property
    def order(self) -> tuple[str, ...]:
        """Nodes in a topological order (sources first; ties broken by insertion order)."""
        self.validate()
        return self._cache["order"]  # type: ignore[return-value]

    @property
    def edge_order(self) -> tuple[str, ...]:
        """Edges sorted so that every edge comes after all edges into its source node."""
        self.validate()
        return self._cache["edge_order"]  # type: ignore[return-value]

    def validate(self) -> Network:
        """Check the whole graph; raise NetworkError naming the first problem found."""
        if "order" in self._cache:
            return self
        if not self._dims:
            raise NetworkError("the network has no nodes")
        if not self._edges:
            raise NetworkError("the network has no edges")
        for v, role in self._roles.items():
            if not self._in[v] and not self._out[v]:
                raise NetworkError(f"node {v!r} is not connected to any edge")
            if role == "input" and self._in[v]:
                raise NetworkError(f"node {v!r} is declared an input but has incoming edges")
            if role == "output" and self._out[v]:
                raise NetworkError(f"node {v!r} is declared an output but has outgoing edges")
        declared_in = {v for v, r in self._roles.items() if r == "input"}
        declared_out = {v for v, r in self._roles.items() if r == "output"}
        for v in self._dims:
            if declared_in and not self._in[v] and v not in declared_in:
                raise NetworkError(
                    f"node {v!r} has no incoming edges but is not among the declared inputs "
                    f"{sorted(declared_in)}")
            if declared_out and not self._out[v] and v not in declared_out:
                raise NetworkError(
                    f"node {v!r} has no path to an output node: it has no outgoing edges and is "
                    f"not among the declared outputs {sorted(declared_out)}")
        # Kahn's algorithm; a cycle cannot be built through add_edge, but check anyway.
        indeg = {v: len(self._in[v]) for v in self._dims}
        ready = [v for v in self._dims if indeg[v] == 0]
        order: list[str] = []
        while ready:
            v = ready.pop(0)
            order.append(v)
            for e in self._out[v]:
                t = self._edges[e].target
                indeg[t] -= 1
                if indeg[t] == 0:
                    ready.append(t)
        if len(order) != len(self._dims):
            stuck = [v for v in self._dims if indeg[v] > 0]
            raise NetworkError(f"the network has a cycle through nodes {stuck}")
        # In a connected DAG every node reaches a sink; a sink is an output unless outputs were
        # declared, which the loop above checks, so every node has a path to an output.
        position = {v: i for i, v in enumerate(order)}
        self._cache["order"] = tuple(order)
        self._cache["edge_order"] = tuple(
            sorted(self._edges, key=lambda e: (position[self._edges[e].target],
                                               position[self._edges[e].source])))
        return self

    # ------------------------------------------------------------------ paths
    def count_paths(self) -> int:
        """Number of input-to-output paths, counted without enumerating them (exact integer)."""
        order = self.order
        outputs = set(self.outputs)
        to_output = {v: (1 if v in outputs else 0) for v in order}
        for v in reversed(order):
            for e in self._out[v]:
                to_output[v] += to_output[self._edges[e].target]
        return sum(to_output[u] for u in self.inputs)

    def paths(self, limit: int = DEFAULT_PATH_LIMIT) -> tuple[Path, ...]:
        """All input-to-output paths, inputs in node order, depth first.

        Raises PathExplosionError (before enumerating anything) when there are more than ``limit``.
        """
        key = "paths"
        cached = self._cache.get(key)
        if cached is not None and len(cached) <= limit:  # type: ignore[arg-type]
            return cached  # type: ignore[return-value]
        n = self.count_paths()
        if n > limit:
            raise PathExplosionError(
                f"the network has {n} input-to-output paths, more than the limit of {limit}; "
                "use the forward/backward gradient (fr.gradient) instead of the path form, or "
                "raise `limit` if you really need them all")
        found: list[Path] = []
        for u in self.inputs:
            for chain in self._walk(u):
                found.append(Path(tuple(chain), u, self._edges[chain[-1]].target))
        result = tuple(found)
        self._cache[key] = result
        return result

    def _walk(self, node: str) -> Iterator[list[str]]:
        """The edge chains from ``node`` to the outputs, depth first in edge order (with an
        explicit stack: a network may be deeper than Python's recursion limit)."""
        chain: list[str] = []
        stack = [iter(self._out[node])]
        while stack:
            e = next(stack[-1], None)
            if e is None:
                stack.pop()
                if chain:
                    chain.pop()
                continue
            target = self._edges[e].target
            if not self._out[target]:
                yield [*chain, e]
            else:
                chain.append(e)
                stack.append(iter(self._out[target]))

    def paths_through(self, edge: str, limit: int = DEFAULT_PATH_LIMIT) -> tuple[Path, ...]:
        """P(e): every input-to-output path through ``edge``."""
        self.edge(edge)
        return tuple(p for p in self.paths(limit) if edge in p.edges)

    def paths_to(self, output: str, limit: int = DEFAULT_PATH_LIMIT) -> tuple[Path, ...]:
        """Every path ending at output node ``output`` (T(p) for any p ending there)."""
        if output not in self.outputs:
            raise NetworkError(f"{output!r} is not an output node of the network")
        return tuple(p for p in self.paths(limit) if p.target == output)

    # ------------------------------------------------------------------ description
    def signature(self) -> tuple:
        """A hashable description of the architecture (changes whenever the graph changes)."""
        return (tuple(self._dims.items()),
                tuple((e.name, e.source, e.target) for e in self._edges.values()),
                tuple(self._roles.items()))

    def to_json(self) -> str:
        """The architecture as a JSON string (as stored in HDF5 files)."""
        return json.dumps({
            "nodes": [{"name": v, "dim": d, "role": self._roles[v]} for v, d in self._dims.items()],
            "edges": [{"name": e.name, "source": e.source, "target": e.target}
                      for e in self._edges.values()],
        })

    @classmethod
    def from_json(cls, text: str) -> Network:
        """Rebuild a network from ``to_json`` output."""
        spec = json.loads(text)
        net = cls()
        for node in spec["nodes"]:
            net.add_node(node["name"], node["dim"], node.get("role"))
        for edge in spec["edges"]:
            net.add_edge(edge["source"], edge["target"], edge["name"])
        return net

    @classmethod
    def chain(cls, dims: Sequence[int], names: Sequence[str] | None = None) -> Network:
        """A single chain ``dims[0] -> dims[1] -> ...`` (a plain deep linear network)."""
        names = list(names) if names is not None else [f"h{i}" for i in range(len(dims))]
        if len(names) != len(dims) or len(dims) < 2:
            raise NetworkError("chain needs at least two dimensions and one name per dimension")
        net = cls()
        for name, d in zip(names, dims):
            net.add_node(name, d)
        for a, b in zip(names[:-1], names[1:]):
            net.add_edge(a, b)
        return net

    def __repr__(self) -> str:
        nodes = ", ".join(f"{v}:{d}" for v, d in self._dims.items())
        edges = ", ".join(self._edges)
        return f"Network(nodes=[{nodes}], edges=[{edges}])"
