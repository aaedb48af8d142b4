"""MustDrop: multi-stage vision token dropping, across a visual token's whole life.

Liu, Shi, Hong, Hu, Yin, Zhang, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language
Model", 2024. https://arxiv.org/abs/2411.10803 (code: https://github.com/liuting20/MustDrop)

Three stages, each switchable: vision (3 x 3 window merging after the encoder's first layer and key tokens by CLS
attention at its last, run by the engine inside the encoder where the adapter exposes a CLS-style ViT; else the
windows are merged on the decoder's visual tokens after its layer 0 and key tokens are chosen at the first filter),
prefill (the dual-attention filter), decode (the output-aware cache).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ops import group_mean, keep_counts, top_k_mask
from ..view import EncoderWindows, Merge, VisualView
from ..window_merge import window_groups, window_similarity
from .base import MultiStageCompressor, check_keep, register

AUTHORS_LAYERS = (2, 6, 10, 14)  # of 32, 0-based: the layers whose attention filters
AUTHORS_DEPTH = 32


def filter_schedule(num_layers: int, first: int = 0) -> list[int]:
    """The authors' filter layers scaled to the model's depth, each in first..L - 2 (dropping acts after it)."""
    scaled = [math.floor(layer * num_layers / AUTHORS_DEPTH + 0.5) for layer in AUTHORS_LAYERS]
    return sorted({min(max(layer, first), num_layers - 2) for layer in scaled})


@register("mustdrop")
@dataclass
class MustDrop(MultiStageCompressor):
    """Vision (`vision_stage`): after the vision encoder's first layer, each `merge_window` x `merge_window` window
    of patches whose mean pairwise cosine similarity is >= `merge_threshold` becomes their mean (one token, at the
    window's mean position); at the encoder's last layer the top `key_ratio` of the merged tokens by CLS attention
    become key tokens, never dropped later. Decoder layer 0 still runs on one copy per patch (transformers needs
    the prompt's placeholder count); the copies become one token after it. Encoders without CLS, or adapters that
    do not expose the encoder: the windows are merged on the decoder's visual tokens after layer 0, and key tokens
    are the top `key_ratio` by the global score at the first filter.

    Prefill (`prefill_stage`): at each filter layer, the attention of the text after the images to each visual token
    (mean over heads) gives a global score (column sum) and an individual score (column max); a token is dropped
    from the next layer on only if global < global_threshold x the sum of global scores over the sample's visual
    tokens AND individual < individual_threshold. With `keep` (a ratio of each stage's input or a count), each stage
    instead keeps exactly `keep` tokens: the key tokens, then the highest margin max(global / (global_threshold x
    sum), individual / individual_threshold), the quantity the thresholds compare with 1. With `budget`, the counts
    per stage are solved per sample so that the layer average of visual tokens, each layer credited with the tokens
    it passes on (the authors' reported figure), equals `budget` (see `budget_counts`).

    Decode (`decode_stage`): when prefill ends, every layer from the first filter layer on (never layer 0, whose
    cache length transformers reads as the conversation's length) drops from its cache the visual tokens a later
    stage dropped.

    filter_layers: 0-based layers whose attention filters (None: the authors' 2, 6, 10, 14 of 32, scaled; at least
    1 with the vision stage, which acts after layer 0). Authors' thresholds on TextVQA: ~192 tokens 0.001/0.001,
    ~128 0.0012/0.001, ~64 0.011/0.01.
    """

    filter_layers: Sequence[int] | None = None
    global_threshold: float = 0.001
    individual_threshold: float = 0.001
    keep: float | int | None = None
    budget: float | None = None
    key_ratio: float = 0.08
    vision_stage: bool = True
    merge_threshold: float = 0.8
    merge_window: int = 3
    prefill_stage: bool = True
    decode_stage: bool = True

    def __post_init__(self) -> None:
        for name in ("vision_stage", "prefill_stage", "decode_stage"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MustDrop: {name} must be True or False, got {getattr(self, name)!r}")
        if not (self.vision_stage or self.prefill_stage):
            raise ValueError(
                "MustDrop: vision_stage and prefill_stage are both off; nothing would be compressed"
            )
        if self.filter_layers is not None:
            layers = list(self.filter_layers)
            if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
                raise ValueError(
                    f"MustDrop: filter_layers must be a non-empty list of ints, got {self.filter_layers!r}"
                )
            if layers != sorted(set(layers)) or layers[0] < 0:
                raise ValueError(f"MustDrop: filter_layers={layers} must be increasing and >= 0")
            if self.vision_stage and self.prefill_stage and layers[0] < 1:
                raise ValueError(
                    f"MustDrop: filter_layers={layers} starts at 0, where the vision stage merges its windows; "
                    "start at 1 or set vision_stage=False"
                )
            self.filter_layers = tuple(layers)
        for name in ("global_threshold", "individual_threshold", "key_ratio", "merge_threshold"):
            value = getattr(self, name)
            low = -1 if name == "merge_threshold" else 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= 1:
                raise ValueError(f"MustDrop: {name} must be in [{low}, 1], got {value!r}")
        if self.keep is not None and self.budget is not None:
            raise ValueError("MustDrop: give keep (tokens per stage) or budget (a layer average), not both")
        if self.keep is not None:
            check_keep("MustDrop", self.keep)
        if self.budget is not None and (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, (int, float))
            or not math.isfinite(self.budget)
            or self.budget <= 0
        ):
            raise ValueError(
                f"MustDrop: budget must be a positive, finite number of tokens, got {self.budget!r}"
            )
        if not self.prefill_stage and (self.keep is not None or self.budget is not None):
            raise ValueError(
                "MustDrop: keep and budget set the prefill stage's counts; they need prefill_stage=True"
            )
        window = self.merge_window
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"MustDrop: merge_window must be an int >= 2, got {window!r}")

    def check_model(self, num_layers: int) -> None:
        first = 1 if self.vision_stage else 0
        self.resolve_schedule(
            num_layers, "filter_layers", self.filter_layers, lambda n: filter_schedule(n, first)
        )
        if not self.prefill_stage:
            self.after = []
        self.num_layers = num_layers

    def acting_layers(self) -> list[int]:
        return ([1] if self.vision_stage else []) + super().acting_layers()

    def encoder_windows(self) -> EncoderWindows | None:
        if not self.vision_stage:
            return None
        return EncoderWindows(self.merge_window, float(self.merge_threshold), float(self.key_ratio))

    def scoring_layers(self) -> dict[int, int]:
        return {layer + 1: layer for layer in self.after}

    def scoring_query(self) -> str:
        return "text_rows"

    def trims_caches_from(self) -> int | None:
        if not self.decode_stage or not self.after:
            return None
        return max(self.after[0], 1)

    def check_inputs(self, tokens: Any) -> None:
        if isinstance(self.keep, int):
            counts = tokens.counts()
            smallest = int(counts[counts > 0].min()) if bool((counts > 0).any()) else 0
            if smallest and self.keep > smallest:
                raise ValueError(
                    f"MustDrop: keep={self.keep} tokens is more than the {smallest} visual tokens of a sample in "
                    "this batch; pass a count <= that or a ratio in (0, 1]"
                )

    def select(self, view: VisualView) -> Tensor | Merge:
        if self.vision_stage and view.layer == 1:
            return self.merge_windows(view)
        return self.filter(view)

    # -- vision stage -----------------------------------------------------------------------------------------
    def merge_windows(self, view: VisualView) -> Merge:
        """The encoder's merged windows (its copies become one token), or windows merged here on the layer-0
        output where the encoder was not shortened; each merged token is the mean of its members."""
        visual = view.is_visual
        if view.encoder is not None:
            token = torch.where(visual, view.encoder.copy_of, -1)
            group = groups_of(token, visual)
            view.state["keys"] = set_of(view.position, first_members(group) & view.encoder.key)
        else:
            group = groups_of(self.window_tokens(view), visual)
        return merge_mean(view, group)

    def window_tokens(self, view: VisualView) -> Tensor:
        """(B, n) per visual slot the id of its merged window (unique per sample), -1 for tokens left alone."""
        token = torch.full_like(view.position, -1)
        hidden = view.hidden_states
        for b, shapes in enumerate(view.grid_shape):
            offset = 0
            for g, (rows, cols) in enumerate(shapes):
                on = view.is_visual[b] & (view.image_index[b] == g)
                cells = view.grid_row[b][on] * cols + view.grid_col[b][on]
                if rows < self.merge_window or cols < self.merge_window or len(cells) != rows * cols:
                    continue  # a grid too small for one window, or not whole (nothing to merge on)
                features = torch.empty(
                    rows * cols, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device
                )
                features[cells] = hidden[b][on]
                similarity = window_similarity(features[None], rows, cols, self.merge_window)
                groups = window_groups(similarity >= self.merge_threshold, rows, cols, self.merge_window)[0]
                token[b, on.nonzero()[:, 0]] = groups[cells] + offset
                offset += rows * cols
        return token

    # -- prefill stage ----------------------------------------------------------------------------------------
    def filter(self, view: VisualView) -> Tensor:
        rows = torch.where(view.score_queries[..., None], view.scores, 0.0)
        global_score, individual = rows.sum(1), rows.amax(1)
        visual = view.is_visual
        total = torch.where(visual, global_score, 0.0).sum(1, keepdim=True)
        margin = torch.maximum(
            global_score / (self.global_threshold * total).clamp(min=torch.finfo(total.dtype).tiny),
            individual / max(self.individual_threshold, torch.finfo(individual.dtype).tiny),
        )
        # The first stage to act picks the key tokens (by logical position); no later stage drops them.
        if "keys" not in view.state:
            count = keep_counts(view.counts(), float(self.key_ratio))
            view.state["keys"] = set_of(view.position, top_k_mask(global_score, visual, count))
        protected = visual & member_of(view.position, view.state["keys"])
        if self.keep is None and self.budget is None:
            kept = (global_score >= self.global_threshold * total) | (individual >= self.individual_threshold)
            return visual & (kept | protected)
        if self.budget is not None:
            if "budget" not in view.state:
                view.state["budget"] = self.budget_counts(view.counts(), protected.sum(1))
            count = view.state["budget"][:, self.stage(view) - int(self.vision_stage)]
            # a budget too small for every key token keeps the keys with the highest margins
            ranked = torch.where(protected, 2.0, 0.0) + margin.clamp(max=1e30) / (1 + margin.clamp(max=1e30))
            return top_k_mask(ranked, visual, count)
        # A budget counts the key tokens: they take their places first, the highest margins fill the rest.
        count = torch.maximum(keep_counts(view.counts(), self.keep), protected.sum(1))
        return top_k_mask(torch.where(protected, torch.inf, margin), visual, count)

    def budget_counts(self, entering: Tensor, keys: Tensor) -> Tensor:
        """(B, stages) tokens to keep at each filter so that the layer average, each layer credited with the
        visual tokens it passes on, equals `budget`: with M tokens entering the first filter (after layer a_1)
        and M_k after stage k, (a_1 M + sum_k (a_{k+1} - a_k) M_k) / L, a_{S+1} = L. The counts decay
        geometrically above the K key tokens, M_k = K + round((M - K) r^k), r in [0, 1] found by bisection. When
        even M_k = K overshoots, every stage keeps the count that meets the budget (fewer than K: key tokens then
        compete by margin)."""
        after, layers = list(self.after), self.num_layers
        weights = torch.tensor(
            [b - a for a, b in zip(after, [*after[1:], layers], strict=True)], dtype=torch.float64
        )
        m, k = entering.double()[:, None], torch.minimum(keys, entering).double()[:, None]
        target = float(self.budget) * layers - after[0] * m[:, 0]
        powers = torch.arange(1, len(after) + 1, dtype=torch.float64)

        def counts(r: Tensor) -> Tensor:
            return k + torch.floor((m - k) * r[:, None] ** powers + 0.5)

        low, high = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(60):  # the largest r whose average stays within the budget
            middle = (low + high) / 2
            fits = (counts(middle) * weights).sum(1) <= target
            low, high = torch.where(fits, middle, low), torch.where(fits, high, middle)
        chosen = counts(low)
        floor_only = (k[:, 0] * weights.sum()) > target  # even the key tokens alone overshoot
        fallback = torch.floor(target / weights.sum()).clamp(min=1)[:, None].expand_as(chosen)
        chosen = torch.where(floor_only[:, None], torch.minimum(fallback, k.clamp(min=1)), chosen)
        return torch.minimum(chosen, m).long().to(entering.device)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["filter_layers"] = None if self.filter_layers is None else list(self.filter_layers)
        return data


def groups_of(token: Tensor, visual: Tensor) -> Tensor:
    """(B, n) group per visual slot, 0.. per sample in order of first member: slots with one non-negative
    `token` id share a group, every other visual slot is its own; -1 off the visual slots."""
    batch, n = token.shape
    column = torch.arange(n, device=token.device).expand(batch, n)
    width = int(token.max()) + 1 if bool((token >= 0).any()) else 1
    first_of_token = torch.full((batch, width), n, dtype=torch.long, device=token.device)
    first_of_token.scatter_reduce_(1, token.clamp(min=0), torch.where(token >= 0, column, n), "amin")
    first = torch.where(token >= 0, first_of_token.gather(1, token.clamp(min=0)), column)
    starts = visual & (first == column)
    number = starts.long().cumsum(1) - 1
    return torch.where(visual, number.gather(1, first), -1)


def first_columns(group: Tensor) -> Tensor:
    """(B, G) the first slot of each group of `group` (B, n) (-1 marks no group)."""
    batch, n = group.shape
    width = int(group.max()) + 1 if bool((group >= 0).any()) else 0
    column = torch.arange(n, device=group.device).expand(batch, n)
    first = torch.full((batch, width), n, dtype=torch.long, device=group.device)
    first.scatter_reduce_(1, group.clamp(min=0), torch.where(group >= 0, column, n), "amin")
    return first.clamp(max=n - 1)


def first_members(group: Tensor) -> Tensor:
    """(B, n) bool: the slots that are the first member of their group."""
    column = torch.arange(group.shape[1], device=group.device).expand_as(group)
    return (group >= 0) & (first_columns(group).gather(1, group.clamp(min=0)) == column)


def merge_mean(view: VisualView, group: Tensor) -> Merge:
    """A Merge of `group` (B, n) whose tokens are their members' mean hidden state, sitting on their first member's
    grid cell; grids keep their shapes (a merged window is one token among its neighbours)."""
    hidden = view.hidden_states
    width = int(group.max()) + 1 if bool((group >= 0).any()) else 0
    first = first_columns(group)

    def at_first(values: Tensor) -> Tensor:
        return values.gather(1, first)

    return Merge(
        group=group,
        values=group_mean(hidden, group, width),
        image_index=at_first(view.image_index),
        grid_row=at_first(view.grid_row),
        grid_col=at_first(view.grid_col),
        grid_shape=view.grid_shape,
    )


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
