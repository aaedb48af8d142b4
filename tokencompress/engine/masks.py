"""Attention masks for shortened sequences and per-layer caches, built from logical positions."""

from __future__ import annotations

import torch
from torch import Tensor


def allowed_keys(query_order: Tensor, key_order: Tensor, key_ok: Tensor, num_cached: int) -> Tensor:
    """(B, q, k) bool: causal by logical position, only real unpadded keys, and every query sees itself.

    Queries are the last q keys (cache entries come first). Letting each query see its own key keeps rows of
    padding and filler slots from being fully masked, which would give NaN under sdpa and poison later layers.
    """
    allowed = (key_order[:, None, :] <= query_order[:, :, None]) & key_ok[:, None, :]
    num_queries = query_order.shape[1]
    own = torch.arange(num_queries, device=allowed.device)
    allowed[:, own, own + num_cached] = True
    return allowed


def to_implementation(allowed: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """The 4-D mask in the form each attention backend expects: bool for sdpa, additive float for eager."""
    mask = allowed[:, None]
    if implementation == "sdpa":
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
