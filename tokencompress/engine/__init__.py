"""Runs a compressor pipeline inside a decoder: slots, masks, caches, scores."""

from .runtime import Engine

__all__ = ["Engine"]
