"""Pooling visual tokens over their 2-D grids with kernel = stride: which tokens form a group, and the pooled
values. Pure tensor code over a VisualView, shared by every pooling compressor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .view import VisualView

POOLING_MODES = ("max", "avg", "conv")


@dataclass(frozen=True)
class GridGroups:
    """The groups of one pooling step.

    group: (B, n) the group of each visual slot, -1 for tokens past the floored grid (dropped, as floor-mode
        pooling does); an off-grid visual token (e.g. a CLS token) is a group of its own.
    cell: (B, n) each slot's place inside its kernel window, row-major; pooled: (B, n) the slot's grid is
        pooled with a kernel larger than 1 x 1.
    image_index, grid_row, grid_col: (B, G) each group's grid and cell on the pooled grid.
    grid_shape: per sample, per grid, the pooled (rows, cols); counts: (B,) groups per sample.
    """

    group: Tensor
    cell: Tensor
    pooled: Tensor
    image_index: Tensor
    grid_row: Tensor
    grid_col: Tensor
    grid_shape: list[list[tuple[int, int]]]
    counts: Tensor

    @property
    def width(self) -> int:
        return self.image_index.shape[1]


def grid_groups(view: VisualView, kernels: list[tuple[int, int]], min_grid_tokens: int = 16) -> GridGroups:
    """Group each sample's visual tokens by `kernels[b]` = (rows, cols) windows on their grids.

    A grid with fewer than `min_grid_tokens` cells, or smaller than the kernel, is left as it is. Odd sizes
    are floored: the last row or column that does not fill a window is dropped.
    """
    batch = view.is_visual.shape[0]
    device = view.is_visual.device
    most = max([len(shapes) for shapes in view.grid_shape] + [1])
    table = torch.ones(
        5, batch, most, dtype=torch.long
    )  # kernel rows, kernel cols, pooled rows, cols, offset
    pooled_shapes: list[list[tuple[int, int]]] = []
    for b, shapes in enumerate(view.grid_shape):
        pooled_shapes.append([])
        offset = 0
        for g, (rows, cols) in enumerate(shapes):
            kh, kw = kernels[b]
            if rows * cols < min_grid_tokens or rows < kh or cols < kw:
                kh, kw = 1, 1
            table[:, b, g] = torch.tensor([kh, kw, rows // kh, cols // kw, offset])
            pooled_shapes[b].append((rows // kh, cols // kw))
            offset += (rows // kh) * (cols // kw)
    table = table.to(device)
    totals = (table[2] * table[3]).sum(1)
    kh, kw, pooled_rows, pooled_cols, offset = (t.gather(1, view.image_index.clamp(min=0)) for t in table)

    on_grid = view.is_visual & (view.grid_row >= 0) & (view.grid_col >= 0)
    row, col = view.grid_row.clamp(min=0) // kh, view.grid_col.clamp(min=0) // kw
    inside = on_grid & (row < pooled_rows) & (col < pooled_cols)
    off_grid = view.is_visual & ~on_grid
    off_rank = off_grid.long().cumsum(1) - 1
    group = torch.where(inside, offset + row * pooled_cols + col, -1)
    group = torch.where(off_grid, totals[:, None] + off_rank, group)
    counts = totals + off_grid.sum(1)
    width = int(counts.max()) if batch else 0

    member = group >= 0
    slot = torch.where(member, group, width)  # non-members scatter into a spare column, cut off below

    def per_group(values: Tensor) -> Tensor:
        out = torch.full((batch, width + 1), -1, dtype=torch.long, device=device)
        return out.scatter_(1, slot, torch.where(member, values, -1))[:, :width]

    cell = torch.where(inside, (view.grid_row % kh) * kw + view.grid_col % kw, 0)
    return GridGroups(
        group=group,
        cell=cell,
        pooled=inside & (kh * kw > 1),
        image_index=per_group(view.image_index),
        grid_row=per_group(torch.where(inside, row, -1)),
        grid_col=per_group(torch.where(inside, col, -1)),
        grid_shape=pooled_shapes,
        counts=counts,
    )


def pool(hidden: Tensor, groups: GridGroups, mode: str, weights: Tensor | None = None) -> Tensor:
    """(B, G, hidden) the pooled value of each group: max, mean, or a depthwise kernel (`weights` (B, n, hidden),
    each slot's kernel weight for its cell) summed over the window; tokens of unpooled grids pass through."""
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode {mode!r} is not one of {POOLING_MODES}")
    batch, _, size = hidden.shape
    width = groups.width
    slot = torch.where(groups.group >= 0, groups.group, width)[..., None].expand(-1, -1, size)
    values, reduce = hidden, {"max": "amax", "avg": "mean", "conv": "sum"}[mode]
    if mode == "conv":
        values = torch.where(groups.pooled[..., None], hidden * weights, hidden)
    out = hidden.new_zeros(batch, width + 1, size)
    return out.scatter_reduce(1, slot, values, reduce, include_self=False)[:, :width]
