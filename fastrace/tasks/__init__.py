"""The paper's tasks as builders of (network, data set) pairs."""

from .routing import RoutingTask, routing, routing_gate

__all__ = ["RoutingTask", "routing", "routing_gate"]
