"""Shared fixtures: tiny random LLaVA models (4 decoder layers, 16 visual tokens per image) built from configs, and
one torch thread for the whole session."""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch

from tokencompress.tiny import tiny_llava

NUM_LAYERS = 4
# benchmarks/ (the training script) is imported by tests; appended, not prepended, so that the installed
# package's metadata (its entry points) comes before anything a build left in the repository root
sys.path.append(str(Path(__file__).resolve().parents[1]))


@functools.cache
def _pristine(implementation: str, seed: int) -> torch.nn.Module:
    return tiny_llava(layers=NUM_LAYERS, attn_implementation=implementation, seed=seed)


def fresh_model(implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A new, never compressed tiny LLaVA; the same seed gives the same weights under every implementation."""
    return copy.deepcopy(_pristine(implementation, seed))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The models are tiny: one thread is much faster than several (~50x when the machine has other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
