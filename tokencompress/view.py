"""What a compressor sees: the visual tokens of each sample, never the architecture around them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class VisualTokens:
    """Where the visual tokens are in one forward's input (B, L), as the adapter found them.

    image_index: (B, L) long, the grid each token belongs to (an image, a sub-image such as an any-res base
        view or crop grid, or a video frame), numbered per sample in sequence order; -1 for text.
    grid_row, grid_col: (B, L) long, the token's cell on its grid, -1 off the grid (text, CLS).
    grid_shape: per sample, per grid, (rows, cols); an empty list where the adapter completes the grids later
        from the text model's inputs (`complete_visual_tokens`).
    structural: (B, L) bool or None, tokens the image carries that are not content (any-res row newlines):
        compressors never see them as visual and the engine always keeps them, like text.
    """

    image_index: Tensor
    grid_row: Tensor
    grid_col: Tensor
    grid_shape: list[list[tuple[int, int]]]
    structural: Tensor | None = None

    @property
    def is_visual(self) -> Tensor:
        return self.image_index >= 0

    def counts(self) -> Tensor:
        """(B,) number of visual tokens per sample."""
        return self.is_visual.sum(1)


@dataclass(frozen=True)
class VisualView:
    """The tokens entering decoder layer `layer`, one column per slot of the current (maybe shortened) sequence.

    is_visual marks the visual tokens a compressor may act on (real, unpadded slots only); image_index,
    grid_row, grid_col and grid_shape describe the grids as they are now (after any earlier pooling, a pooled
    token sits on the pooled grid); position is each slot's logical input position; scores (B, n) holds the
    attention each slot received at the compressor's scoring layer, when it asked for them; routing (B,) is the
    column of each sample's routing token (the `<ROUTER>` token or the last prompt token); score_queries (B, q)
    marks the real query rows when `scores` holds one row per query (B, q, n); state is the compressor's scratch
    space for this forward, shared by its stages (e.g. tokens an early stage protects from later ones); encoder
    says which slots copy one merged encoder token, when the compressor asked the encoder to merge windows;
    input_norm is the layer's own input normalisation (what its attention reads), for routers that read it.
    """

    layer: int
    hidden_states: Tensor
    is_visual: Tensor
    image_index: Tensor
    grid_row: Tensor
    grid_col: Tensor
    position: Tensor
    grid_shape: list[list[tuple[int, int]]]
    routing: Tensor
    scores: Tensor | None = None
    score_queries: Tensor | None = None
    state: dict = field(default_factory=dict)
    encoder: EncoderCopies | None = None
    input_norm: Callable[[Tensor], Tensor] | None = None

    def counts(self) -> Tensor:
        return self.is_visual.sum(1)

    def routing_states(self) -> Tensor:
        """(B, hidden) hidden state of each sample's routing token."""
        return self.hidden_states[torch.arange(len(self.routing), device=self.routing.device), self.routing]


@dataclass(frozen=True)
class Merge:
    """A compressor's decision to replace groups of visual slots by one new token each (pooling, merging).

    group: (B, n) long, the group of each visual slot, numbered 0..G_b-1 per sample; -1 drops the slot.
    values: (B, G, hidden) the new token of each group (rows past a sample's own G_b are ignored).
    image_index, grid_row, grid_col: (B, G) where each new token sits; grid_shape: per sample, per grid, the
    grid's (rows, cols) after the merge. info: per-sample tensors the engine reports in the forward's stats
    (e.g. the expert each sample chose); aux_loss: a scalar added to the training loss, or None; extra_flops: the
    compressor's own matmul FLOPs for this decision (e.g. a router), counted in the analytic FLOPs.
    """

    group: Tensor
    values: Tensor
    image_index: Tensor
    grid_row: Tensor
    grid_col: Tensor
    grid_shape: list[list[tuple[int, int]]]
    info: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Tensor | None = None
    extra_flops: int = 0


@dataclass(frozen=True)
class EncoderWindows:
    """A compressor's request to shorten the vision encoder (MustDrop's vision stage): after its first layer,
    `window` x `window` patch windows whose mean pairwise cosine similarity is at least `threshold` become their
    mean; at its last layer the top `key_ratio` of the (merged) tokens by CLS attention become key tokens."""

    window: int = 3
    threshold: float = 0.8
    key_ratio: float = 0.08


@dataclass(frozen=True)
class EncoderCopies:
    """What the vision encoder did to the tokens of this forward, per slot of the current sequence.

    copy_of: (B, n) long, the encoder token each visual slot's feature copies, unique per sample (slots of one
    merged window share it); -1 where the encoder did not shorten the slot's image. key: (B, n) bool, slots whose
    encoder token is a key token.
    """

    copy_of: Tensor
    key: Tensor


@dataclass(frozen=True)
class Route:
    """A compressor's decision that only some visual slots run through this one layer (mixture of depths): the
    others skip it unchanged and are all back at the next layer; the layer's KV cache holds only what ran.

    routed: (B, n) bool over the current slots (non-visual slots always run). mlp_scale: (B, n) factor on each
    running slot's MLP output (the router's gradient path), or None. info, aux_loss, extra_flops: as in Merge.
    """

    routed: Tensor
    mlp_scale: Tensor | None = None
    info: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Tensor | None = None
    extra_flops: int = 0
