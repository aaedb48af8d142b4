"""Importance scores without eager attention: recompute only the query rows a method needs.

The attention a visual token receives is recomputed at the scoring layer from a few query rows against that
layer's real keys (cached ones included), with the model's own projections, q/k norms and rotary embedding. It
costs O(queries x keys) and works the same under eager and sdpa, where `output_attentions` is unavailable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def query_rows(mode: str, key_ok: Tensor, is_visual: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """Which slots act as queries, and their weights, per row.

    mode "last": the last real token of each row (the authors' FastV code). mode "text" (and "text_rows"): every
    real text token after the last visual token of the row, equally weighted (the FastV paper's "attention from all tokens"
    restricted to the instruction); rows with no text after the image fall back to the last token.
    Returns (columns (B, nq) long, weights (B, nq) float summing to 1 per row).
    """
    batch, n = key_ok.shape
    arange = torch.arange(n, device=key_ok.device).expand(batch, n)
    last = torch.where(key_ok, order, -1).argmax(1, keepdim=True)
    if mode == "last":
        return last, torch.ones(batch, 1, device=key_ok.device)
    last_visual = torch.where(is_visual & key_ok, order, -1).amax(1, keepdim=True)
    text = key_ok & ~is_visual & (order > last_visual)
    text = text | (~text.any(1, keepdim=True) & (arange == last))
    width = int(text.sum(1).max())
    columns = torch.argsort(torch.where(text, arange, arange + n), dim=1)[:, :width]
    weights = text.gather(1, columns).float()
    columns = torch.where(weights > 0, columns, last)  # pad short rows with a real query of weight 0
    return columns, weights / weights.sum(1, keepdim=True)


def attention_received(
    queries: Tensor,
    keys: Tensor,
    allowed: Tensor,
    weights: Tensor,
    scaling: float,
) -> Tensor:
    """Mean over heads (and weighted over query rows) of softmax attention each key receives.

    queries (B, H, q, d) and keys (B, Hkv, k, d), both after rotary embedding; grouped-query attention is
    handled by repeating key heads. allowed (B, q, k) bool; weights (B, q). Returns (B, k) float32.
    """
    groups = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    logits = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~allowed[:, None], -math.inf)
    probs = torch.softmax(logits, dim=-1).mean(1)
    # A zero-weight row contributes nothing, even if it is fully masked (NaN after softmax).
    return torch.where(weights[..., None] > 0, probs * weights[..., None], 0.0).sum(1)


def attention_rows(queries: Tensor, keys: Tensor, allowed: Tensor, weights: Tensor, scaling: float) -> Tensor:
    """(B, q, k) float32: each query row's softmax attention over the keys, mean over heads; rows of weight 0
    (padding of short rows) are zero."""
    groups = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    logits = torch.matmul(queries.float(), keys.float().transpose(-1, -2)) * scaling
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], -math.inf), dim=-1).mean(1)
    return torch.where(weights[..., None] > 0, probs, 0.0)


def scoring_flops(batch: int, num_queries: int, num_keys: int, hidden: int, heads: int, head_dim: int) -> int:
    """Matmul FLOPs of recomputing `num_queries` query rows and their scores (what FlopCounterMode counts)."""
    projection = 2 * batch * num_queries * hidden * heads * head_dim
    return projection + 2 * batch * heads * num_queries * num_keys * head_dim


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Standard (LLaMA) rotary embedding; x (B, H, n, d), cos/sin (B, n, d)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
