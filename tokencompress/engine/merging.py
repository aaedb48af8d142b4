"""Apply a compressor's Merge decision: groups of visual slots become one token each, in sequence order."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import gather_rows
from ..view import Merge, VisualTokens
from .slots import Slots


def apply_merge(
    slots: Slots, hidden: Tensor, merge: Merge, ok: Tensor, tokens: VisualTokens, on_grid: bool
) -> tuple[Slots, Tensor]:
    """The new slots and hidden states after `merge`; `ok` (B, n) marks real, unpadded slots.

    Non-visual slots stay as they are; visual slots outside every group are dropped; each group becomes one
    slot at the logical position of its first member (distinct per group, so causality stays strict), with
    the rotary embedding of `group_anchors`.
    """
    batch, n = slots.index.shape
    width = merge.values.shape[1]
    visual = ok & slots.is_visual
    member = visual & (merge.group >= 0)
    group = torch.where(member, merge.group, 0)
    if width and bool((group >= width).any()):
        raise RuntimeError(f"a Merge names group {int(group.max())} but gives values for {width} groups")
    size = torch.zeros(batch, width, dtype=torch.long, device=group.device).scatter_add_(
        1, group, member.long()
    )
    present = size > 0
    beyond = n + int(slots.index.max()) + 1 if n else 1
    first = torch.full((batch, width), beyond, dtype=torch.long, device=group.device).scatter_reduce_(
        1, group, torch.where(member, slots.index, beyond), "amin"
    )
    anchor = group_anchors(slots, member, group, size, tokens, on_grid)

    candidate = torch.cat([ok & ~slots.is_visual, present], dim=1)
    order = torch.cat([slots.index, first], dim=1)
    position = torch.arange(order.shape[1], device=order.device).expand_as(order)
    sort_key = torch.where(candidate, order, beyond + position)
    counts = candidate.sum(1)
    columns = torch.argsort(sort_key, dim=1)[:, : int(counts.max())]
    real = torch.arange(columns.shape[1], device=columns.device)[None, :] < counts[:, None]

    def take(old: Tensor, new: Tensor) -> Tensor:
        return torch.cat([old, new], dim=1).gather(1, columns)

    merged = Slots(
        index=take(slots.index, first),
        real=real,
        anchor=take(slots.anchor, anchor),
        image_index=take(slots.image_index, merge.image_index),
        grid_row=take(slots.grid_row, merge.grid_row),
        grid_col=take(slots.grid_col, merge.grid_col),
        grid_shape=merge.grid_shape,
    )
    step = merged.index[:, 1:] - merged.index[:, :-1]
    if bool(((step <= 0) & real[:, 1:]).any()):
        raise RuntimeError("a Merge produced two tokens at one logical position; groups must not overlap")
    values = merge.values.to(hidden.dtype)
    return merged, gather_rows(torch.cat([hidden, values], dim=1), columns)


def group_anchors(
    slots: Slots, member: Tensor, group: Tensor, size: Tensor, tokens: VisualTokens, on_grid: bool
) -> Tensor:
    """(B, G) the input position whose rotary embedding each group's token takes.

    Sequence positions (1-D RoPE): the mean of the members' positions, rounded down; inside one image the
    positions are consecutive, so that position belongs to an input token of the same image. Grid positions
    (M-RoPE, where a token's position is its (t, row, col)): the token at the members' mean row and column,
    rounded down, whose position ids are exactly the per-axis mean of the members' ids, rounded down.
    """
    batch, width = size.shape
    count = size.clamp(min=1)

    def mean(values: Tensor) -> Tensor:
        total = torch.zeros(batch, width, dtype=torch.long, device=values.device)
        return total.scatter_add_(1, group, torch.where(member, values, 0)).div(count, rounding_mode="floor")

    by_sequence = mean(slots.anchor)  # also the member itself for a group of one (e.g. an off-grid CLS token)
    if not on_grid:
        return by_sequence
    image = tokens.image_index.gather(1, slots.anchor)
    row, col = mean(tokens.grid_row.gather(1, slots.anchor)), mean(tokens.grid_col.gather(1, slots.anchor))
    image = torch.zeros_like(size).scatter_(1, group, torch.where(member, image, 0))
    lookup = _cell_lookup(tokens)
    grids, rows, cols = lookup.shape[1:]
    sample = torch.arange(batch, device=size.device)[:, None]
    found = lookup[sample, image.clamp(0, grids - 1), row.clamp(0, rows - 1), col.clamp(0, cols - 1)]
    return torch.where(size > 1, found, by_sequence)


def _cell_lookup(tokens: VisualTokens) -> Tensor:
    """(B, grids, rows, cols) the input position of each grid cell, -1 where there is none."""
    on = (tokens.image_index >= 0) & (tokens.grid_row >= 0) & (tokens.grid_col >= 0)
    batch = on.shape[0]
    sizes = [
        int(t[on].max()) + 1 if bool(on.any()) else 1
        for t in (tokens.image_index, tokens.grid_row, tokens.grid_col)
    ]
    lookup = torch.full((batch, *sizes), -1, dtype=torch.long, device=on.device)
    sample, position = on.nonzero(as_tuple=True)
    lookup[sample, tokens.image_index[on], tokens.grid_row[on], tokens.grid_col[on]] = position
    return lookup
