"""Shared helpers: tiny random LLaVA models (4 decoder layers, 16 visual tokens per image) built from configs."""

from __future__ import annotations

import copy
import functools

import torch

from tokencompress.tiny import tiny_llava

NUM_LAYERS = 4


@functools.cache
def _pristine(implementation: str, seed: int) -> torch.nn.Module:
    return tiny_llava(layers=NUM_LAYERS, attn_implementation=implementation, seed=seed)


def fresh_model(implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A new, never compressed tiny LLaVA; the same seed gives the same weights under every implementation."""
    return copy.deepcopy(_pristine(implementation, seed))
