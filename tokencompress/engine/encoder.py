"""The engine inside a vision encoder: merge near-identical patch windows after its first layer, pick key tokens
by the CLS token's attention at its last layer, count its FLOPs, and give the model full-length features back.

The encoder runs its remaining layers on the shorter sequence (that is the saving). Its output is re-expanded to
one row per patch (every patch of a merged window carries the merged token) so the model's own feature
selection, projector and placeholder count stay as they are; the record of which patches are copies of one
token goes to the decoder side, which merges the copies into one token after decoder layer 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..ops import group_mean, keep_counts, top_k_mask
from ..view import EncoderWindows
from ..window_merge import window_groups, window_similarity


@dataclass(frozen=True)
class VisionEncoder:
    """A ViT the engine may shorten, as an adapter exposes it.

    tower: the module whose output (a ModelOutput with last_hidden_state and hidden_states) the model reads;
    layers: its transformer blocks (pre-norm, `layer_norm1`, `self_attn` with q_proj/k_proj/head_dim/scale), each
    called as layer(hidden_states, attention_mask, ...); has_cls: a CLS token precedes a square grid of patches.
    """

    tower: nn.Module
    layers: nn.ModuleList
    has_cls: bool
    hidden: int
    intermediate: int

    def layer_flops(self, rows: int, tokens: int) -> int:
        """One encoder layer on `rows` sequences of `tokens`: q, k, v, out projections, the MLP's two matrices,
        attention scores and values (matrix multiplications only, 2 x multiply-adds, as in accounting)."""
        h = self.hidden
        return 2 * rows * tokens * (4 * h * h + 2 * h * self.intermediate) + 4 * rows * tokens * tokens * h


@dataclass
class EncoderRecord:
    """One encoder call: copy_of (rows, P) the merged token each patch carries (0..M_r - 1 per row, raster order
    of each token's first patch); key (rows, P) whether that token is a key token (None when none were picked)."""

    copy_of: Tensor
    key: Tensor | None


@dataclass
class EncoderCall:
    """What one call of the tower carries from layer to layer."""

    rows: int = 0
    full: int = 0  # tokens per row entering layer 0
    expand: Tensor | None = None  # (rows, full) index of each full-length row's token in the short sequence
    mask: Tensor | None = None  # additive (rows, 1, 1, n') key mask while rows differ in length
    short_ok: Tensor | None = None  # (rows, n') real tokens of the short sequence
    copy_of: Tensor | None = None
    key: Tensor | None = None
    flops: int = 0
    baseline_flops: int = 0
    before_merge: tuple[Tensor, ...] = ()  # layer 0's input and output, full length


@dataclass
class EncoderHooks:
    """Hooks one vision encoder. Counting always; merging and key tokens when `windows` is given."""

    encoder: VisionEncoder
    windows: EncoderWindows | None
    records: list[EncoderRecord] = field(default_factory=list)  # taken by the next prefill
    flops: list[tuple[int, int]] = field(default_factory=list)  # (flops, baseline) per call, taken likewise
    handles: list[Any] = field(default_factory=list)
    call: EncoderCall | None = None

    def attach(self) -> None:
        encoder = self.encoder
        self.handles.append(encoder.tower.register_forward_pre_hook(self._open))
        self.handles.append(encoder.tower.register_forward_hook(self._close))
        for index, layer in enumerate(encoder.layers):
            self.handles.append(
                layer.register_forward_pre_hook(
                    lambda m, a, k, i=index: self._before(i, a, k), with_kwargs=True
                )
            )
        if self.windows is not None:
            self.handles.append(encoder.layers[0].register_forward_hook(self._merge))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def take(self) -> tuple[list[EncoderRecord], int, int]:
        """The records and (FLOPs, baseline FLOPs) of every encoder call since the last take."""
        records, flops = self.records, self.flops
        self.records, self.flops = [], []
        return records, sum(f for f, _ in flops), sum(b for _, b in flops)

    def clear(self) -> None:
        self.take()

    # -- hooks ----------------------------------------------------------------------------------------------
    def _open(self, module: nn.Module, args: tuple) -> None:
        self.call = EncoderCall()

    def _before(self, index: int, args: tuple, kwargs: dict) -> tuple | None:
        call = self.call
        if call is None:  # the layers run outside the tower's own forward (a model using its internals)
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        rows, tokens = hidden.shape[:2]
        if index == 0:
            call.rows, call.full = rows, tokens
            call.before_merge = (hidden,)
        call.flops += self.encoder.layer_flops(rows, tokens)
        call.baseline_flops += self.encoder.layer_flops(rows, call.full)
        if index == len(self.encoder.layers) - 1 and call.short_ok is not None and self.windows.key_ratio > 0:
            call.key = self._key_tokens(self.encoder.layers[index], hidden, call)
        if call.mask is None:
            return None
        given = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if given is not None:
            raise RuntimeError("the vision encoder received an attention mask; merged windows need their own")
        if len(args) > 1:
            return (args[0], call.mask, *args[2:]), kwargs
        kwargs["attention_mask"] = call.mask
        return args, kwargs

    def _merge(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """After layer 0: each 3 x 3 window of patches whose mean pairwise cosine similarity reaches the threshold
        becomes their mean, placed at the window's first patch; raster order is kept, rows padded to the longest."""
        call = self.call
        if call is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        lead = int(self.encoder.has_cls)
        patches = hidden[:, lead:]
        side, window = math.isqrt(patches.shape[1]), self.windows.window
        if side * side != patches.shape[1]:  # not a square grid of patches: leave this call as it is
            return None
        with torch.no_grad():  # the choice carries no gradient; the merged means do
            similarity = window_similarity(patches, side, side, window)
            groups = window_groups(similarity >= self.windows.threshold, side, side, window)  # (rows, P)
        counts = groups.amax(1) + 1
        width = int(counts.max())
        merged = group_mean(patches, groups, width)
        short = torch.cat([hidden[:, :lead], merged], dim=1)
        call.before_merge = (*call.before_merge, hidden)
        ok = torch.arange(width, device=hidden.device)[None, :] < counts[:, None]
        call.short_ok = torch.cat([torch.ones_like(ok[:, :lead]), ok], dim=1)
        call.copy_of = groups
        call.expand = torch.cat([torch.zeros_like(groups[:, :lead]), groups + lead], dim=1)
        if not bool(call.short_ok.all()):
            blocked = torch.finfo(hidden.dtype).min
            call.mask = torch.where(call.short_ok, 0.0, blocked).to(hidden.dtype)[:, None, None, :]
        if isinstance(output, tuple):
            return (short, *output[1:])
        return short

    @torch.no_grad()
    def _key_tokens(self, layer: nn.Module, hidden: Tensor, call: EncoderCall) -> Tensor:
        """(rows, P): patches whose merged token is among the top `key_ratio` of the row's merged tokens by the
        CLS query's attention (mean over heads) at this layer, recomputed from its input: one query row, no
        attention maps from the encoder."""
        attention = layer.self_attn
        normed = layer.layer_norm1(hidden)
        query = attention.q_proj(normed[:, :1]).unflatten(-1, (-1, attention.head_dim)).transpose(1, 2)
        keys = attention.k_proj(normed).unflatten(-1, (-1, attention.head_dim)).transpose(1, 2)
        logits = (query.float() @ keys.float().transpose(-1, -2))[:, :, 0] * attention.scale  # (rows, H, n')
        logits = logits.masked_fill(~call.short_ok[:, None, :], float("-inf"))
        received = logits.softmax(-1).mean(1)[:, 1:]  # CLS -> patches
        candidates = call.short_ok[:, 1:]
        chosen = top_k_mask(
            received, candidates, keep_counts(candidates.sum(1), float(self.windows.key_ratio))
        )
        rows, tokens, width = hidden.shape
        call.flops += 2 * rows * (tokens + 1) * width * width + 2 * rows * tokens * width  # k, q, CLS row
        return chosen.gather(1, call.copy_of)

    def _close(self, module: nn.Module, args: tuple, output: Any) -> None:
        call, self.call = self.call, None
        if call is None or call.rows == 0:
            return
        self.flops.append((call.flops, call.baseline_flops))
        if call.expand is None:
            return
        expand, short = call.expand, call.short_ok.shape[1]

        def expanded(states: Tensor) -> Tensor:
            # States of the short sequence: as long as it (which may equal the full length when a row of the
            # batch merged nothing) and not one of the two full-length states before the merge.
            if not isinstance(states, Tensor) or states.dim() != 3 or states.shape[1] != short:
                return states
            if any(states is before for before in call.before_merge):
                return states
            return states.gather(1, expand[..., None].expand(-1, -1, states.shape[-1]))

        if getattr(output, "last_hidden_state", None) is not None:
            output.last_hidden_state = expanded(output.last_hidden_state)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(expanded(states) for states in output.hidden_states)
        self.records.append(EncoderRecord(call.copy_of, call.key))


def clip_style_encoder(tower: Any) -> VisionEncoder | None:
    """The VisionEncoder of a transformers CLIP/SigLIP-style vision model (embeddings + encoder.layers), or None."""
    inner = getattr(tower, "vision_model", tower)
    layers = getattr(getattr(inner, "encoder", None), "layers", None)
    config = getattr(tower, "config", None)
    if not isinstance(tower, nn.Module) or layers is None or config is None or not len(layers):
        return None
    first = layers[0]
    if not all(hasattr(first, part) for part in ("layer_norm1", "self_attn")):
        return None
    has_cls = hasattr(getattr(inner, "embeddings", None), "class_embedding")
    return VisionEncoder(
        tower=tower,
        layers=layers,
        has_cls=has_cls,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
    )
