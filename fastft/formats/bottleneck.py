"""The activations a bottleneck adapter may use between its down and up projections, and their validator."""

from __future__ import annotations

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation
