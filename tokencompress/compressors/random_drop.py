"""Random pruning: the baseline every token-dropping method must beat at the same budget."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..view import VisualView
from .base import TokenDropper, check_keep, check_layer, register, seeded_uniform


@register("random")
@dataclass
class RandomDrop(TokenDropper):
    """Keep a uniformly random `keep` of each sample's visual tokens before `layer`; reproducible by `seed`.

    Same budget rule as FastV (ratio -> ceil(N x keep), or an int count), so the two compare like for like.
    """

    layer: int = 2
    keep: float | int = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        check_layer("RandomDrop", self.layer)
        check_keep("RandomDrop", self.keep)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"RandomDrop: seed must be an int, got {self.seed!r}")

    def score(self, view: VisualView) -> Tensor:
        # Indexed by each token's rank among its sample's visual tokens, so a prompt gets the same kept set at
        # any batch row and padding (the beams of one sample must agree).
        rank = (view.is_visual.long().cumsum(1) - 1).clamp(min=0)
        uniform = seeded_uniform(int(rank.max()) + 1, self.seed, rank.device)
        return uniform[rank]
