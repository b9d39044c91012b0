"""Opta-LMX: a declarative control plane for local MLX LLMs."""

__version__ = "0.1.0"
