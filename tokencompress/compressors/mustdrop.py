"""MustDrop: multi-stage vision token dropping, across a visual token's whole life.

Liu, Shi, Hong, Hu, Yin, Zhang, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language
Model", 2024. https://arxiv.org/abs/2411.10803 (code: https://github.com/liuting20/MustDrop)

This file holds the prefill stage (the dual-attention filter) and the decode stage (output-aware cache); the
vision-encoder stage (3 x 3 window merging, CLS-attention key tokens) is not implemented yet: key tokens are taken
by the attention they receive at the first filter layer, the rule METHODS.md gives for encoders without CLS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ops import keep_counts, top_k_mask
from ..view import VisualView
from .base import MultiStageCompressor, check_keep, register

AUTHORS_LAYERS = (2, 6, 10, 14)  # of 32, 0-based: the layers whose attention filters
AUTHORS_DEPTH = 32


def filter_schedule(num_layers: int) -> list[int]:
    """The authors' filter layers scaled to the model's depth, each at most L - 2 (dropping acts after it)."""
    scaled = [math.floor(layer * num_layers / AUTHORS_DEPTH + 0.5) for layer in AUTHORS_LAYERS]
    return sorted({min(layer, num_layers - 2) for layer in scaled})


@register("mustdrop")
@dataclass
class MustDrop(MultiStageCompressor):
    """Prefill: at each filter layer, the attention of the text after the images to each visual token (mean over
    heads) gives a global score (column sum) and an individual score (column max); a token is dropped from the
    next layer on only if global < global_threshold x the sum of global scores over the sample's visual tokens
    AND individual < individual_threshold. Key tokens (the top `key_ratio` of visual tokens at the first filter)
    are never dropped. With `keep` (a ratio of each stage's input or a count), each stage instead keeps exactly
    `keep` tokens: the key tokens, then the highest margin max(global / (global_threshold x sum), individual /
    individual_threshold), the quantity the thresholds compare with 1. Decode (`decode_stage`): when prefill
    ends, every layer from the first filter layer on (never layer 0, whose cache length transformers reads as the
    conversation's length) drops from its cache the visual tokens a later stage dropped.

    filter_layers: 0-based layers whose attention filters (None: the authors' 2, 6, 10, 14 of 32, scaled).
    Authors' thresholds on TextVQA: ~192 tokens 0.001/0.001, ~128 0.0012/0.001, ~64 0.011/0.01.
    """

    filter_layers: Sequence[int] | None = None
    global_threshold: float = 0.001
    individual_threshold: float = 0.001
    keep: float | int | None = None
    key_ratio: float = 0.08
    decode_stage: bool = True

    def __post_init__(self) -> None:
        if self.filter_layers is not None:
            layers = list(self.filter_layers)
            if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
                raise ValueError(
                    f"MustDrop: filter_layers must be a non-empty list of ints, got {self.filter_layers!r}"
                )
            if layers != sorted(set(layers)) or layers[0] < 0:
                raise ValueError(f"MustDrop: filter_layers={layers} must be increasing and >= 0")
            self.filter_layers = tuple(layers)
        for name in ("global_threshold", "individual_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"MustDrop: {name} must be in [0, 1], got {value!r}")
        if self.keep is not None:
            check_keep("MustDrop", self.keep)
        ratio = self.key_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"MustDrop: key_ratio must be in [0, 1], got {ratio!r}")
        if not isinstance(self.decode_stage, bool):
            raise TypeError(f"MustDrop: decode_stage must be True or False, got {self.decode_stage!r}")

    def check_model(self, num_layers: int) -> None:
        self.resolve_schedule(num_layers, "filter_layers", self.filter_layers, filter_schedule)

    def scoring_layers(self) -> dict[int, int]:
        return {layer + 1: layer for layer in self.after}

    def scoring_query(self) -> str:
        return "text_rows"

    def trims_caches_from(self) -> int | None:
        return max(self.after[0], 1) if self.decode_stage else None

    def check_inputs(self, tokens: Any) -> None:
        if isinstance(self.keep, int):
            counts = tokens.counts()
            smallest = int(counts[counts > 0].min()) if bool((counts > 0).any()) else 0
            if smallest and self.keep > smallest:
                raise ValueError(
                    f"MustDrop: keep={self.keep} tokens is more than the {smallest} visual tokens of a sample in "
                    "this batch; pass a count <= that or a ratio in (0, 1]"
                )

    def select(self, view: VisualView) -> Tensor:
        rows = torch.where(view.score_queries[..., None], view.scores, 0.0)
        global_score, individual = rows.sum(1), rows.amax(1)
        visual = view.is_visual
        total = torch.where(visual, global_score, 0.0).sum(1, keepdim=True)
        margin = torch.maximum(
            global_score / (self.global_threshold * total).clamp(min=torch.finfo(total.dtype).tiny),
            individual / max(self.individual_threshold, torch.finfo(individual.dtype).tiny),
        )
        # The first filter picks the key tokens (by logical position); no later stage drops them.
        if "keys" not in view.state:
            count = keep_counts(view.counts(), float(self.key_ratio))
            view.state["keys"] = set_of(view.position, top_k_mask(global_score, visual, count))
        protected = visual & member_of(view.position, view.state["keys"])
        if self.keep is None:
            kept = (global_score >= self.global_threshold * total) | (individual >= self.individual_threshold)
            return visual & (kept | protected)
        # A budget counts the key tokens: they take their places first, the highest margins fill the rest.
        count = torch.maximum(keep_counts(view.counts(), self.keep), protected.sum(1))
        return top_k_mask(torch.where(protected, torch.inf, margin), visual, count)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["filter_layers"] = None if self.filter_layers is None else list(self.filter_layers)
        return data


def set_of(position: Tensor, mask: Tensor) -> Tensor:
    """(B, P) bool over logical positions: True where `mask` marks a slot at that position."""
    table = torch.zeros(position.shape[0], int(position.max()) + 1, dtype=torch.bool, device=position.device)
    rows = torch.arange(position.shape[0], device=position.device)[:, None].expand_as(position)
    table[rows[mask], position[mask]] = True
    return table


def member_of(position: Tensor, table: Tensor) -> Tensor:
    """(B, n) bool: whether each slot's logical position is marked in `table` (B, P)."""
    inside = position < table.shape[1]
    return inside & table.gather(1, position.clamp(max=table.shape[1] - 1))
