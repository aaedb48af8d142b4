"""Bookkeeping of which tokens the hidden states (and each layer's KV cache) hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops import compact_columns


@dataclass(eq=False)
class Slots:
    """The tokens in the current hidden states: one row per sample, one column per slot.

    index: (B, n) position of each slot's token in this forward's input (0..L-1).
    real:  (B, n) False for filler slots that only pad rows of a ragged batch up to a common length.
    plain: True while the sequence is the unmodified input (index == arange(L), every slot real).
    """

    index: Tensor
    real: Tensor
    plain: bool = False

    @classmethod
    def full(cls, batch: int, length: int, device: torch.device) -> Slots:
        index = torch.arange(length, device=device).expand(batch, length)
        return cls(index, torch.ones(batch, length, dtype=torch.bool, device=device), plain=True)

    def select(self, keep: Tensor) -> tuple[Slots, Tensor]:
        """Keep the slots marked in `keep` (B, n), in order. Returns the new slots and the gathered columns."""
        columns, real = compact_columns(keep & self.real)
        return Slots(self.index.gather(1, columns), real), columns

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
