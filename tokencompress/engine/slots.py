"""Bookkeeping of which tokens the hidden states (and each layer's KV cache) hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import compact_columns
from ..view import VisualTokens


@dataclass(eq=False)
class Slots:
    """The tokens in the current hidden states: one row per sample, one column per slot.

    index:  (B, n) each slot's logical position: the input position (0..L-1) of its token, or for a pooled token
            the first input position of its group. Slots are in increasing index order.
    real:   (B, n) False for filler slots that only pad rows of a ragged batch up to a common length.
    anchor: (B, n) the input position whose rotary embedding (and position id) the slot uses: its own for an
            input token, the adapter's choice for a pooled one (the mean position of its group, rounded down).
    image_index, grid_row, grid_col, grid_shape: the grid of each slot as it is now (see VisualTokens).
    plain:  True while the sequence is the unmodified input (index == arange(L), every slot real).
    """

    index: Tensor
    real: Tensor
    anchor: Tensor
    image_index: Tensor
    grid_row: Tensor
    grid_col: Tensor
    grid_shape: list[list[tuple[int, int]]]
    plain: bool = False

    @classmethod
    def full(cls, batch: int, length: int, device: torch.device, tokens: VisualTokens | None) -> Slots:
        index = torch.arange(length, device=device).expand(batch, length)
        if tokens is None:
            none = torch.full((1, 1), -1, dtype=torch.long, device=device).expand(batch, length)
            grids: tuple[Tensor, Tensor, Tensor] = (none, none, none)
            shapes: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
        else:
            grids, shapes = (tokens.image_index, tokens.grid_row, tokens.grid_col), tokens.grid_shape
        real = torch.ones(batch, length, dtype=torch.bool, device=device)
        return cls(index, real, index, *grids, shapes, plain=True)

    @property
    def is_visual(self) -> Tensor:
        return self.image_index >= 0

    def select(self, keep: Tensor) -> tuple[Slots, Tensor]:
        """Keep the slots marked in `keep` (B, n), in order. Returns the new slots and the gathered columns."""
        columns, real = compact_columns(keep & self.real)
        fields = (self.index, self.anchor, self.image_index, self.grid_row, self.grid_col)
        index, anchor, image_index, row, col = (t.gather(1, columns) for t in fields)
        return Slots(index, real, anchor, image_index, row, col, self.grid_shape), columns

    def __len__(self) -> int:
        return self.index.shape[1]


@dataclass(eq=False)
class KeyRecord:
    """What one layer's KV cache holds: the logical position of each cached entry, and which are real."""

    order: Tensor
    real: Tensor
    plain: bool

    @classmethod
    def contiguous(cls, batch: int, length: int, device: torch.device) -> KeyRecord:
        order = torch.arange(length, device=device).expand(batch, length)
        return cls(order, torch.ones(batch, length, dtype=torch.bool, device=device), plain=True)

    def extend(self, slots: Slots, past: int) -> KeyRecord:
        return KeyRecord(
            torch.cat([self.order, slots.index + past], dim=1),
            torch.cat([self.real, slots.real], dim=1),
            plain=self.plain and slots.plain,
        )

    def __len__(self) -> int:
        return self.order.shape[1]


@dataclass(eq=False)
class CacheBook:
    """Per-cache record of every layer's entries plus the logical (uncompressed) length seen so far.

    Kept by the engine beside a cache object, never on it. Beam search reorders cache rows only among the beams
    of one sample, which share their prefill and append only real tokens afterwards, so the records need no
    reordering; a cache edited outside the engine is detected by length and reported.
    """

    records: dict[int, KeyRecord]
    logical_length: int = 0
