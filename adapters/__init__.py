"""Per-family adapters, found by model structure. A new family: one file with an Adapter subclass, listed here."""

from __future__ import annotations

from torch import nn

from .base import Adapter
from .llava import LlavaAdapter
from .llava_codebase import LlavaCodebaseAdapter
from .llava_next import LlavaNextAdapter
from .qwen_vl import QwenVLAdapter

ADAPTERS: list[type[Adapter]] = [LlavaAdapter, LlavaNextAdapter, QwenVLAdapter, LlavaCodebaseAdapter]


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for this model, or an error naming the supported families."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    supported = "; ".join(a.families for a in ADAPTERS)
    raise TypeError(
        f"tokencompress has no adapter for {type(model).__name__} (model_type={model_type!r}). Supported: {supported}"
    )


__all__ = [
    "ADAPTERS",
    "Adapter",
    "LlavaAdapter",
    "LlavaCodebaseAdapter",
    "LlavaNextAdapter",
    "QwenVLAdapter",
    "find_adapter",
]
