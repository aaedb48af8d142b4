"""FastV: prune visual tokens after an early layer by the attention they receive.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024. https://arxiv.org/abs/2403.06764
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..view import VisualView
from .base import TokenDropper, check_keep, check_layer, register

QUERIES = ("last", "text")


@register("fastv")
@dataclass
class FastV(TokenDropper):
    """Keep the top `keep` visual tokens by attention received at layer `layer - 1`; drop the rest before `layer`.

    keep: a ratio in (0, 1] (ceil(N x keep) tokens per sample) or an int count. query: "last" scores by the last
    prompt token's attention (the authors' code), "text" by the mean over the text tokens after the image (the
    paper's wording). Scores are softmax over all keys, mean over heads, recomputed without eager attention.
    """

    layer: int = 2
    keep: float | int = 0.5
    query: str = "last"

    def __post_init__(self) -> None:
        check_layer("FastV", self.layer)
        check_keep("FastV", self.keep)
        if self.query not in QUERIES:
            raise ValueError(f"FastV: query={self.query!r} is not one of {QUERIES}")

    def scoring_layer(self) -> int:
        return self.layer - 1

    def scoring_query(self) -> str:
        return self.query

    def score(self, view: VisualView) -> Tensor:
        return view.scores
