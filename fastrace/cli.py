"""The ``fastrace`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    import fastrace as fr

    net = fr.Network()
    net.add_node("x", 4).add_node("h", 16).add_node("y", 3)
    net.add_edge("x", "h").add_edge("h", "y").add_edge("x", "y", name="skip")
    rng = np.random.default_rng(args.seed)
    P = 64
    gate = rng.integers(0, 2, P).astype(float)
    data = fr.Dataset({"x": rng.standard_normal((P, 4))}, {"y": rng.standard_normal((P, 3))},
                      edge_gates={"skip": gate})
    W = fr.init.orthogonal(net, gain=0.5, seed=args.seed)
    start = time.perf_counter()
    L, G = fr.loss_and_gradient(net, data, W)
    took = time.perf_counter() - start
    norm = float(np.sqrt(sum(np.sum(g * g) for g in G.values())))
    print(f"network: {net}")
    print(f"data: P={P} samples in {data.contexts(net).count} gate contexts")
    print(f"loss = {L:.6f}   |gradient| = {norm:.6f}   ({took * 1e3:.2f} ms)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastrace", description="Learning dynamics of gated deep linear networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a small gated network, print its loss and gradient")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import FastraceError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FastraceError as exc:
        print(f"fastrace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
