"""Pure tensor functions shared by compressors and the engine: easy to test against hand computations."""

from __future__ import annotations

import torch
from torch import Tensor


def keep_counts(num_visual: Tensor, keep: float | int) -> Tensor:
    """Per-sample number of visual tokens to keep: ceil(N x keep) for a ratio, the count itself otherwise."""
    if isinstance(keep, float):
        # A relative margin absorbs float error (0.3 x 10 = 3.0000000000000004 must keep 3, not 4) and still
        # keeps one token for any positive ratio.
        return torch.ceil(num_visual.double() * keep * (1 - 1e-12)).long()
    return torch.minimum(num_visual, torch.full_like(num_visual, keep))


def top_k_mask(scores: Tensor, candidates: Tensor, counts: Tensor) -> Tensor:
    """Mark, per row, the `counts[b]` highest-scoring candidate columns (ties go to the earlier column).

    scores: (B, n) float; candidates: (B, n) bool; counts: (B,) long. Returns a (B, n) bool mask.
    """
    # Candidates first, then by descending score; stable sorts send ties (and -inf scores) to earlier columns.
    by_score = torch.argsort(scores.float(), dim=1, descending=True, stable=True)
    by_candidate = torch.argsort((~candidates).gather(1, by_score).int(), dim=1, stable=True)
    order = by_score.gather(1, by_candidate)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return candidates & (rank < counts[:, None])


def compact_columns(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Columns of the kept entries of each row, in order, left-aligned and padded to the longest row.

    Returns (columns, real): columns (B, n') long indexes the input columns; real (B, n') is False where a row
    is shorter than n' (those columns point at an arbitrary unkept entry and must be ignored).
    """
    batch, n = keep.shape
    arange = torch.arange(n, device=keep.device).expand(batch, n)
    counts = keep.sum(1)
    width = int(counts.max()) if batch else 0
    sort_key = torch.where(keep, arange, arange + n)
    columns = torch.argsort(sort_key, dim=1)[:, :width]
    real = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    return columns, real


def gather_rows(x: Tensor, columns: Tensor) -> Tensor:
    """x (B, n, ...) gathered along dim 1 at columns (B, n'); x may have batch 1 (broadcast)."""
    if x.shape[0] != columns.shape[0]:
        x = x.expand(columns.shape[0], *x.shape[1:])
    index = columns.reshape(*columns.shape, *([1] * (x.dim() - 2))).expand(*columns.shape, *x.shape[2:])
    return x.gather(1, index)


def group_mean(values: Tensor, group: Tensor, width: int) -> Tensor:
    """(B, width, C) the mean of the rows of `values` (B, n, C) in each group of `group` (B, n) (-1: in none),
    accumulated in float32 and returned in `values`' dtype; empty groups are zeros."""
    member = group >= 0
    index = group.clamp(min=0)
    sums = torch.zeros(*group.shape[:1], width, values.shape[-1], dtype=torch.float32, device=values.device)
    sums.scatter_add_(
        1,
        index[..., None].expand(-1, -1, values.shape[-1]),
        torch.where(member[..., None], values.float(), 0),
    )
    sizes = torch.zeros(*group.shape[:1], width, device=values.device).scatter_add_(1, index, member.float())
    return (sums / sizes.clamp(min=1)[..., None]).to(values.dtype)
