"""An independent reference for MustDrop's vision stage, written without tokencompress.

Encoder side (`clip_by_hand`): a CLIP/SigLIP-style vision model run by hand on one image (batch 1, so no padding):
embeddings, pre-layernorm, layer 0; the mean pairwise cosine similarity of every non-overlapping window of the
patch grid (raster order, cells past the last whole window in no window) computed pair by pair with explicit
loops; each window at or above the threshold becomes the mean of its members at its first (top-left) cell; the
remaining layers run on that short sequence (CLS first); at the last layer's input the CLS query row's softmax
attention, head by head, ranks the merged tokens (ties to the earlier token) and the top ceil(key_ratio x M) are
the key tokens. Every layer's output is re-expanded to one row per patch.

Decoder side (`MergeReference`): a variant of `pooling_reference.PoolingReference` whose stages are arbitrary
groups of input positions (merged: mean of the members' hidden states, at the first member's slot, position ids
the floor of the members' mean per axis) or sets of input positions to remove (a filter that dropped them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from pooling_reference import Grid, PoolingReference, Sample, Stage
from torch import Tensor, nn


def windows_of(rows: int, cols: int, window: int = 3) -> list[list[int]]:
    """The raster-order whole windows of a rows x cols grid, each its cells (raster index) row-major."""
    out = []
    for wr in range(rows // window):
        for wc in range(cols // window):
            out.append(
                [(wr * window + i) * cols + wc * window + j for i in range(window) for j in range(window)]
            )
    return out


def mean_pairwise_cosine(vectors: Sequence[Tensor]) -> float:
    """Mean cosine similarity over the unordered pairs of distinct members, in float64, pair by pair."""
    total, pairs = 0.0, 0
    for a in range(len(vectors)):
        for b in range(a + 1, len(vectors)):
            x, y = vectors[a].double(), vectors[b].double()
            total += float((x * y).sum() / (x.norm() * y.norm()))
            pairs += 1
    return total / pairs


def grid_similarities(cells: Tensor, rows: int, cols: int, window: int = 3) -> list[float]:
    """cells: (rows x cols, C) in raster order -> each window's mean pairwise cosine similarity."""
    return [mean_pairwise_cosine([cells[c] for c in w]) for w in windows_of(rows, cols, window)]


def ceil_ratio(count: int, ratio: float) -> int:
    return math.ceil(Fraction(str(ratio)) * count)


@dataclass
class EncoderByHand:
    """One image through the encoder. similarities: per window; merged: the merged windows (cells); tokens: per
    short-sequence token (CLS excluded) its member cells, first cell first; keys: the key tokens' first cells;
    outputs[i]: layer i's output re-expanded to (1 + P, C) (CLS first); received: CLS attention per token."""

    similarities: list[float]
    merged: list[list[int]]
    tokens: list[list[int]]
    keys: set[int]
    outputs: list[Tensor] = field(default_factory=list)
    received: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.tokens)

    def copies(self) -> list[list[int]]:
        """The merged windows' cells (the groups of patches that carry one token)."""
        return [t for t in self.tokens if len(t) > 1]


def clip_by_hand(
    vision: nn.Module, pixels: Tensor, threshold: float, key_ratio: float = 0.08, window: int = 3
) -> EncoderByHand:
    """`vision`: a transformers CLIPVisionModel (embeddings, pre_layrnorm, encoder.layers); pixels (3, H, W)."""
    inner = getattr(vision, "vision_model", vision)
    layers = inner.encoder.layers
    with torch.no_grad():
        hidden = inner.pre_layrnorm(
            inner.embeddings(pixels[None].to(inner.embeddings.patch_embedding.weight))
        )
        hidden = layers[0](hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        patches = hidden[0, 1:]
        side = math.isqrt(patches.shape[0])
        assert side * side == patches.shape[0]
        similarities = grid_similarities(patches, side, side, window)
        merged = [
            w for w, s in zip(windows_of(side, side, window), similarities, strict=True) if s >= threshold
        ]
        in_window = {cell: w for w in merged for cell in w}
        tokens = []
        for cell in range(side * side):
            if cell not in in_window:
                tokens.append([cell])
            elif in_window[cell][0] == cell:
                tokens.append(in_window[cell])
        rows = [hidden[0, 0]]
        for members in tokens:
            rows.append(torch.stack([patches[c].float() for c in members]).mean(0).to(hidden.dtype))
        short = torch.stack(rows)[None]
        token_of = {cell: i for i, members in enumerate(tokens) for cell in members}

        def expand(states: Tensor) -> Tensor:
            return torch.stack([states[0, 0]] + [states[0, 1 + token_of[c]] for c in range(side * side)])

        outputs = [expand(short)]
        received: list[float] = []
        for index in range(1, len(layers)):
            if index == len(layers) - 1:
                received = cls_attention(layers[index], short)
            short = layers[index](short, None)
            short = short[0] if isinstance(short, tuple) else short
            outputs.append(expand(short))
        count = ceil_ratio(len(tokens), key_ratio) if received else 0
        ranked = sorted(range(len(tokens)), key=lambda i: (-received[i], i))[:count]
        keys = {tokens[i][0] for i in ranked}
    return EncoderByHand(similarities, merged, tokens, keys, outputs, received)


def cls_attention(layer: nn.Module, hidden: Tensor) -> list[float]:
    """The CLS query's softmax attention to every other token of `hidden` (1, n, C), mean over heads, computed head
    by head from the layer's own projections."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)[0]
    query, keys = attention.q_proj(normed[0]), attention.k_proj(normed)
    heads, dim = attention.num_heads, attention.head_dim
    total = torch.zeros(normed.shape[0], dtype=torch.float64)
    for h in range(heads):
        q = query[h * dim : (h + 1) * dim].double()
        k = keys[:, h * dim : (h + 1) * dim].double()
        total += torch.softmax((k @ q) * attention.scale, dim=0)
    return (total / heads)[1:].tolist()


# -- the decoder side -------------------------------------------------------------------------------------------


@dataclass
class GroupStage(Stage):
    """Before decoder layer `layer`: per sample, groups of input positions that become one token each (merge), or
    input positions whose tokens leave the sequence (drop)."""

    groups: Sequence[Sequence[Sequence[int]]] | None = None
    drop: Sequence[set[int]] | None = None


def merge_stage(layer: int, groups: Sequence[Sequence[Sequence[int]]]) -> GroupStage:
    return GroupStage(layer=layer, kernels=[(1, 1)] * len(groups), groups=groups)


def drop_stage(layer: int, drop: Sequence[set[int]]) -> GroupStage:
    return GroupStage(layer=layer, kernels=[(1, 1)] * len(drop), drop=drop)


class MergeReference(PoolingReference):
    """PoolingReference with arbitrary merged groups (mean, first member's slot, floor-mean ids) and drops."""

    def _pool(self, b: int, sample: Sample, stage: GroupStage) -> Sample:
        if stage.drop is not None:
            keep = [s for s, first in enumerate(sample.first) if first not in stage.drop[b]]
            return Sample(
                [sample.origin[s] for s in keep],
                [sample.real[s] for s in keep],
                [sample.ids[s] for s in keep],
                [sample.cell[s] for s in keep],
                sample.grids,
                sample.hidden[keep],
                [sample.first[s] for s in keep],
            )
        slot_of = {first: s for s, first in enumerate(sample.first)}
        leader: dict[int, list[int]] = {}  # first member's slot -> member slots
        followers: set[int] = set()
        for group in stage.groups[b]:
            slots = sorted(slot_of[p] for p in group)
            leader[slots[0]] = slots
            followers.update(slots[1:])
        origin, real, ids, cell, rows, first = [], [], [], [], [], []
        for slot in range(len(sample.first)):
            if slot in followers:
                continue
            if slot in leader:
                members = leader[slot]
                axes = list(zip(*(sample.ids[s] for s in members), strict=True))
                value = sample.hidden[members].float().mean(0).to(sample.hidden.dtype)
                origin.append(-1)
                if self.positions == "first":
                    ids.append(sample.ids[members[0]])
                else:
                    ids.append(tuple(sum(axis) // len(members) for axis in axes))
            else:
                value = sample.hidden[slot]
                origin.append(sample.origin[slot])
                ids.append(sample.ids[slot])
            real.append(sample.real[slot])
            cell.append(sample.cell[slot])
            rows.append(value)
            first.append(sample.first[slot])
        grids: list[Grid] = sample.grids
        return Sample(origin, real, ids, cell, grids, torch.stack(rows), first)
