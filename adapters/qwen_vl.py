"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: M-RoPE positions, variable grids, several images and videos, deepstack.

Visual tokens are runs of `image_token_id` / `video_token_id`. How many tokens each image or video has comes from
`image_grid_thw` / `video_grid_thw` (t x h x w patches / merge^2), or, inside `generate` (which encodes images first
and drops the grids), from the encoded features. Grid coordinates come from the model's own M-RoPE ids, the
(temporal, height, width) positions RoPE actually uses: a token's row and column are its height and width ids
minus those of its image's first token. A video contributes one grid per temporal patch (frame).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokencompress.view import VisualTokens

from .base import Adapter, check_media_runs

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class QwenVLAdapter(Adapter):
    families = "Qwen2-VL, Qwen2.5-VL, Qwen3-VL (Qwen2VL/Qwen2_5_VL/Qwen3VLForConditionalGeneration)"
    positions_on_grid = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        return (
            getattr(config, "model_type", None) in FAMILIES
            and all(hasattr(inner, part) for part in ("visual", "language_model"))
            and hasattr(model, "lm_head")
        )

    # -- visual tokens ----------------------------------------------------------------------------------
    def visual_tokens(self, inputs: dict[str, Any]) -> VisualTokens | None:
        """Which tokens are visual and which image/video each belongs to; grids are completed later."""
        config = self.model.config
        media, lengths = [], []
        for kind, token_id in (("image", config.image_token_id), ("video", config.video_token_id)):
            sizes = self._sizes(kind, inputs)
            placeholder = self.placeholders(inputs, token_id)
            if sizes is None:
                continue  # without pixels or features the model embeds these ids as text
            found = int(placeholder.sum())
            if found != sum(sizes):
                raise ValueError(
                    f"the prompt has {found} {kind} placeholder tokens (id {token_id}) but {kind}_grid_thw / the "
                    f"{kind} features describe {len(sizes)} {kind}(s) of {sizes} tokens ({sum(sizes)} in all)"
                )
            media.append(placeholder)
            lengths.append(sizes)
        if not media:
            return None
        # Each kind fills its placeholders in row-major order (masked_scatter); number media in that order.
        media_id = torch.full(media[0].shape, -1, dtype=torch.long, device=media[0].device)
        offset = 0
        for placeholder, sizes in zip(media, lengths, strict=True):
            ids = torch.repeat_interleave(
                torch.arange(len(sizes), device=placeholder.device) + offset,
                torch.tensor(sizes, device=placeholder.device),
            )
            media_id[placeholder] = ids
            check_media_runs(placeholder, sizes, kind)
            offset += len(sizes)
        unknown = torch.full_like(media_id, -1)
        return VisualTokens(media_id, unknown, unknown, [])

    def _sizes(self, kind: str, inputs: dict[str, Any]) -> list[int] | None:
        merge = self.model.model.visual.spatial_merge_size
        pixels = inputs.get("pixel_values" if kind == "image" else "pixel_values_videos")
        grid = inputs.get(f"{kind}_grid_thw")
        if pixels is not None:
            if grid is None:
                raise ValueError(f"{kind}s were given without {kind}_grid_thw")
            return (grid.prod(-1) // merge**2).tolist()
        encoded = (inputs.get("mm_encoder_outputs") or {}).get(kind)
        if encoded is not None:
            return [len(features) for features in encoded.pooler_output]
        return None

    def complete_visual_tokens(
        self, tokens: VisualTokens | None, text_inputs: dict[str, Any]
    ) -> VisualTokens | None:
        """Grid coordinates from the M-RoPE ids the text model received; one grid per image or video frame."""
        if tokens is None:
            return None
        positions = text_inputs.get("position_ids")
        if positions is None or positions.dim() != 3:
            raise ValueError(
                "Qwen-VL visual tokens need the model's M-RoPE position ids (3 or 4 x batch x length); pass "
                "mm_token_type_ids and the grids as the processor returns them"
            )
        t, h, w = (row.expand(tokens.image_index.shape[0], -1) for row in positions[-3:])
        visual = tokens.is_visual
        media = tokens.image_index[visual]  # in row-major (sequence) order
        t, h, w = t[visual], h[visual], w[visual]
        # A new grid starts where the media or its temporal id changes (a video: one grid per frame).
        order = torch.argsort(media, stable=True)
        media_sorted, t_sorted = media[order], t[order]
        starts = torch.ones_like(media_sorted, dtype=torch.bool)
        starts[1:] = (media_sorted[1:] != media_sorted[:-1]) | (t_sorted[1:] != t_sorted[:-1])
        grid = torch.empty_like(media)
        grid[order] = starts.long().cumsum(0) - 1
        grid = _renumber_by_first_appearance(grid)
        count = int(grid.max()) + 1
        # Relative to each grid's first row and column: Qwen3-VL offsets every video frame like an image.
        row = h - _group_min(h, grid)
        col = w - _group_min(w, grid)
        rows = torch.zeros(count, dtype=torch.long, device=grid.device).scatter_reduce(
            0, grid, row + 1, "amax"
        )
        cols = torch.zeros(count, dtype=torch.long, device=grid.device).scatter_reduce(
            0, grid, col + 1, "amax"
        )
        sample = visual.nonzero()[:, 0]
        first_grid = torch.full((visual.shape[0],), count, dtype=torch.long, device=grid.device)
        first_grid = first_grid.scatter_reduce(0, sample, grid, "amin")
        image_index = torch.full_like(tokens.image_index, -1)
        image_index[visual] = grid - first_grid[sample]
        grid_row, grid_col = torch.full_like(image_index, -1), torch.full_like(image_index, -1)
        grid_row[visual], grid_col[visual] = row, col
        shapes: list[list[tuple[int, int]]] = [[] for _ in range(visual.shape[0])]
        owner = torch.zeros(count, dtype=torch.long, device=grid.device).scatter_reduce(
            0, grid, sample, "amax"
        )
        for b, r, c in zip(owner.tolist(), rows.tolist(), cols.tolist(), strict=True):
            shapes[b].append((r, c))
        return VisualTokens(image_index, grid_row, grid_col, shapes)

    # -- deepstack (Qwen3-VL) ---------------------------------------------------------------------------
    def take_layer_additions(self, text_inputs: dict[str, Any]) -> dict[int, tuple[Tensor, Tensor]]:
        """Qwen3-VL adds deepstack features to the outputs of its first layers at the visual positions; the
        engine takes them over (so they follow the kept tokens) and the model's own injection is switched off."""
        embeds = text_inputs.get("deepstack_visual_embeds")
        mask = text_inputs.get("visual_pos_masks")
        if embeds is None or mask is None:
            return {}
        text_inputs["deepstack_visual_embeds"] = None
        text_inputs["visual_pos_masks"] = None
        return {layer: (mask, values) for layer, values in enumerate(embeds)}

    def addition_layers(self) -> list[int]:
        vision = self.model.config.vision_config
        return list(range(len(getattr(vision, "deepstack_visual_indexes", []) or [])))


def _renumber_by_first_appearance(groups: Tensor) -> Tensor:
    """Relabel group ids 0..G-1 in the order their first element appears."""
    position = torch.arange(len(groups), device=groups.device)
    size = int(groups.max()) + 1
    first = torch.full((size,), len(groups), device=groups.device).scatter_reduce(0, groups, position, "amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(size, device=groups.device)
    return rank[groups]


def _group_min(values: Tensor, groups: Tensor) -> Tensor:
    """The minimum of `values` over each group, broadcast back to every element."""
    size = int(groups.max()) + 1
    big = torch.iinfo(values.dtype).max
    minimum = torch.full((size,), big, dtype=values.dtype, device=values.device)
    return minimum.scatter_reduce(0, groups, values, "amin")[groups]
