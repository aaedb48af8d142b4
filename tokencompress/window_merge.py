"""Merging windows of near-identical tokens on a 2-D grid (MustDrop's vision stage): pure tensor code.

A grid is cut into non-overlapping w x w windows in raster order (cells past the last whole window stay out of
every window); a window whose tokens are nearly identical (mean pairwise cosine similarity, self-pairs excluded,
at or above a threshold) becomes one token, the mean of its members.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


def window_similarity(features: Tensor, rows: int, cols: int, window: int = 3) -> Tensor:
    """(n, windows) the mean pairwise cosine similarity of each window's tokens, self-pairs excluded.

    features: (n, rows x cols, C), one grid per row in raster order; windows are numbered in raster order over
    the (rows // window) x (cols // window) whole windows.
    """
    if window < 2:
        raise ValueError(f"a similarity window needs at least 2 x 2 tokens, got {window}")
    n, cells, channels = features.shape
    if cells != rows * cols:
        raise ValueError(f"features hold {cells} tokens per grid, but the grid is {rows} x {cols}")
    whole = features.reshape(n, rows, cols, channels)[:, : rows // window * window, : cols // window * window]
    tokens = rearrange(whole, "n (gh h) (gw w) c -> n (gh gw) (h w) c", h=window, w=window)
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    similarity = unit @ unit.transpose(-1, -2)
    size = window * window
    off_diagonal = similarity.sum((-1, -2)) - similarity.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off_diagonal / (size * (size - 1))


def window_groups(merged: Tensor, rows: int, cols: int, window: int = 3) -> Tensor:
    """(n, rows x cols) group id of each cell: the cells of a merged window share one id, every other cell has its
    own; ids are numbered per grid in raster order of each group's first cell. merged: (n, windows) bool."""
    row = torch.arange(rows, device=merged.device)[:, None].expand(rows, cols)
    col = torch.arange(cols, device=merged.device)[None, :].expand(rows, cols)
    per_row = cols // window
    inside = (row < rows // window * window) & (col < per_row * window)
    window_of = torch.where(inside, (row // window) * per_row + col // window, 0).flatten()
    in_merged = inside.flatten()[None, :] & merged[:, window_of]  # (n, cells)
    first = inside & (row % window == 0) & (col % window == 0)
    # a cell starts a group unless it belongs to a merged window and is not that window's first cell
    starts = ~in_merged | first.flatten()[None, :]
    group_of_start = starts.long().cumsum(1) - 1  # (n, cells): id of each starting cell
    first_cell = ((row // window * window) * cols + col // window * window).flatten()
    first_cell = torch.where(inside.flatten(), first_cell, torch.arange(rows * cols, device=merged.device))
    return torch.where(in_merged, group_of_start[:, first_cell], group_of_start)
