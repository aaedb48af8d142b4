"""Pyramid pooling: visual tokens pooled again at a few depths, so deeper layers see fewer of them.

The shared schedule and grid checks of DPN and its training-free baseline, StaticPyramid (a fixed pooling
kernel at each stage, no router). DPN: Ai et al., "Dynamic Pyramid Network for Efficient Multimodal Large
Language Model", 2025. https://arxiv.org/abs/2503.20322
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..pooling import grid_groups, pool
from ..view import Merge, VisualTokens, VisualView
from .base import MultiStageCompressor, register

# The authors' DPE layers: after layers 7, 15 and 23 of 32, i.e. after 1/4, 2/4 and 3/4 of the depth.
STAGES = 3


def depth_schedule(num_layers: int, stages: int = STAGES) -> list[int]:
    """The layers after which each stage pools, scaled to the model's depth: floor(L x k / (stages + 1)) - 1."""
    after = [max(0, math.floor(num_layers * k / (stages + 1)) - 1) for k in range(1, stages + 1)]
    return sorted({min(a, num_layers - 2) for a in after})


def normalize_kernel(owner: str, kernel: Any) -> tuple[int, int]:
    if (
        not isinstance(kernel, (list, tuple))
        or len(kernel) != 2
        or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in kernel)
    ):
        raise ValueError(
            f"{owner}: a pooling kernel is (rows, cols) of ints >= 1, e.g. (2, 2); got {kernel!r}"
        )
    return (kernel[0], kernel[1])


def normalize_after_layers(owner: str, after_layers: Any) -> tuple[int, ...] | None:
    if after_layers is None:
        return None
    if isinstance(after_layers, int) and not isinstance(after_layers, bool):
        after_layers = (after_layers,)
    if not isinstance(after_layers, (list, tuple)) or not after_layers:
        raise ValueError(f"{owner}: after_layers is None (scaled to the model) or a non-empty list of ints")
    layers = tuple(after_layers)
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in layers):
        raise TypeError(f"{owner}: after_layers must be ints, got {after_layers!r}")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)) or layers[0] < 0:
        raise ValueError(f"{owner}: after_layers={list(layers)} must be increasing and >= 0")
    return layers


class PyramidCompressor(MultiStageCompressor):
    """Shared by the pooling pyramids: the stage schedule and the grid check.

    Subclasses set `after_layers` (None: scaled to the model) and `min_grid_tokens`.
    """

    after_layers: tuple[int, ...] | None
    min_grid_tokens: int

    def check_model(self, num_layers: int) -> None:
        self.resolve_schedule(num_layers, "after_layers", self.after_layers, depth_schedule)

    def check_inputs(self, tokens: VisualTokens) -> None:
        if not tokens.grid_shape:  # the adapter lays the grids out later, from the text model's inputs
            return
        on_grid = tokens.is_visual & (tokens.grid_row >= 0)
        without = (tokens.counts() > 0) & ~on_grid.any(1)
        if bool(without.any()):
            raise ValueError(
                f"{type(self).__name__} pools visual tokens over their 2-D grid, but the visual tokens of samples "
                f"{without.nonzero()[:, 0].tolist()} have no grid (the adapter could not lay them out)"
            )


@register("static_pyramid")
@dataclass
class StaticPyramid(PyramidCompressor):
    """The training-free baseline of DPN: a fixed pooling kernel at each stage, no router.

    after_layers: pool after these decoder layers (None: after 1/4, 2/4, 3/4 of the depth, the authors' 7, 15,
    23 of 32). kernels: one (rows, cols) kernel for every stage, or one per stage; kernel = stride. pooling:
    "avg" (default: an untrained model sees features of the usual scale) or "max".
    """

    after_layers: Sequence[int] | None = None
    kernels: Sequence[Any] = (2, 2)
    pooling: str = "avg"
    min_grid_tokens: int = 16

    def __post_init__(self) -> None:
        self.after_layers = normalize_after_layers("StaticPyramid", self.after_layers)
        kernels = self.kernels
        if isinstance(kernels, (list, tuple)) and kernels and all(isinstance(k, int) for k in kernels):
            kernels = [kernels]
        if not isinstance(kernels, (list, tuple)) or not kernels:
            raise ValueError(
                "StaticPyramid: kernels is one (rows, cols) kernel or a list of them, one per stage"
            )
        self.kernels = tuple(normalize_kernel("StaticPyramid", k) for k in kernels)
        if (
            len(self.kernels) > 1
            and self.after_layers is not None
            and len(self.kernels) != len(self.after_layers)
        ):
            raise ValueError(
                f"StaticPyramid: {len(self.kernels)} kernels for {len(self.after_layers)} stages; give one kernel "
                "for all stages or one per stage"
            )
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"StaticPyramid: pooling={self.pooling!r} is not 'max' or 'avg' (conv is DPN's)")

    def check_model(self, num_layers: int) -> None:
        super().check_model(num_layers)
        if len(self.kernels) > 1 and len(self.kernels) != len(self.after):
            raise ValueError(
                f"StaticPyramid: {len(self.kernels)} kernels for the {len(self.after)} stages this model "
                "gets; give one kernel for all stages or one per stage"
            )

    def select(self, view: VisualView) -> Merge:
        kernel = self.kernels[self.stage(view) if len(self.kernels) > 1 else 0]
        groups = grid_groups(view, [kernel] * view.is_visual.shape[0], self.min_grid_tokens)
        return merge_of(groups, pool(view.hidden_states, groups, self.pooling))

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["after_layers"] = None if self.after_layers is None else list(self.after_layers)
        data["kernels"] = [list(k) for k in self.kernels]
        return data


def merge_of(groups: Any, values: Tensor, **extra: Any) -> Merge:
    return Merge(
        group=groups.group,
        values=values,
        image_index=groups.image_index,
        grid_row=groups.grid_row,
        grid_col=groups.grid_col,
        grid_shape=groups.grid_shape,
        **extra,
    )
