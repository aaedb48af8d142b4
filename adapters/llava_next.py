"""LLaVA-NeXT and LLaVA-OneVision: any-res images (a base view plus an unpadded grid of crops with a newline
token ending each row) and, for OneVision, videos of pooled frames.

Each image's layout is read from the model's own packing (`pack_image_features`), so unpadding, OneVision's
down-scaling of large crop grids and newline placement are exactly the model's: in a forward, by packing tiny
stand-in features (zeros, newline = ones) for the given `image_sizes`; inside `generate`, which encodes images
first and drops their sizes, from the packed features themselves (newline rows equal `image_newline`).
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any

import torch
from torch import Tensor, nn

from tokencompress.view import VisualTokens

from .base import Adapter, check_media_runs

FAMILIES = ("llava_next", "llava_onevision")


class LlavaNextAdapter(Adapter):
    """Grids: an image is its base view (side x side) and, for any-res images, its crop grid (rows x cols after
    unpadding); a video frame is one pooled grid. Newline tokens are structural: kept, never pooled or scored."""

    families = "LLaVA-NeXT, LLaVA-OneVision (LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        return (
            getattr(config, "model_type", None) in FAMILIES
            and all(
                hasattr(inner, part) for part in ("vision_tower", "multi_modal_projector", "language_model")
            )
            and hasattr(inner, "image_newline")
            and hasattr(model, "lm_head")
        )

    @property
    def side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def visual_tokens(self, inputs: dict[str, Any]) -> VisualTokens | None:
        config = self.model.config
        layouts: list[tuple[Tensor, list[Tensor]]] = []  # (placeholder mask, per-media newline masks)
        for kind in ("image", "video"):
            token_id = getattr(config, f"{kind}_token_id", None)
            newlines = self._image_newlines(inputs) if kind == "image" else self._video_newlines(inputs)
            if token_id is None or newlines is None:
                continue
            placeholder = self.placeholders(inputs, token_id)
            sizes = [len(n) for n in newlines]
            if int(placeholder.sum()) != sum(sizes):
                raise ValueError(
                    f"the prompt has {int(placeholder.sum())} {kind} placeholder tokens (id {token_id}) but the "
                    f"{len(sizes)} {kind}(s) given take {sizes} tokens ({sum(sizes)} in all)"
                )
            check_media_runs(placeholder, sizes, kind)
            layouts.append((placeholder, newlines, kind))
        if not layouts:
            return None
        return self._assemble(layouts)

    # -- where the newlines are, per image or video --------------------------------------------------------
    def _image_newlines(self, inputs: dict[str, Any]) -> list[Tensor] | None:
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            return [
                _rows_equal(features, self.model.model.image_newline) for features in encoded.pooler_output
            ]
        if inputs.get("pixel_values") is None:
            return None
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("images were given without image_sizes (any-res layouts need each image's size)")
        module = sys.modules[type(self.model.model).__module__]
        config = self.model.config
        patches = [
            module.image_size_to_num_patches(
                size, config.image_grid_pinpoints, config.vision_config.image_size
            )
            for size in sizes
        ]
        per_sample = inputs.get("batch_num_images")
        if (
            per_sample is not None
        ):  # OneVision: images of multi-image samples are not patched (base view only)
            single = [int(n) == 1 for n in per_sample for _ in range(int(n))]
            patches = [count if alone else 1 for count, alone in zip(patches, single, strict=True)]
        stand_in = [torch.zeros(n, self.side * self.side, 1) for n in patches]
        pack = self.model.model.pack_image_features
        options = {"image_newline": torch.ones(1)}
        accepted = inspect.signature(pack).parameters
        if "vision_feature_select_strategy" in accepted:
            options["vision_feature_select_strategy"] = (
                inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
            )
        if "vision_aspect_ratio" in accepted:
            options["vision_aspect_ratio"] = config.vision_aspect_ratio
        packed, _ = pack(stand_in, sizes.cpu(), **options)
        return [features[:, 0] == 1 for features in packed]

    def _video_newlines(self, inputs: dict[str, Any]) -> list[Tensor] | None:
        if not hasattr(self.model.model, "apply_pooling"):
            return None
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("video")
        if encoded is not None:
            return [
                _rows_equal(features, self.model.model.image_newline) for features in encoded.pooler_output
            ]
        pixels = inputs.get("pixel_values_videos")
        if pixels is None:
            return None
        per_frame = self._pooled_side() ** 2
        length = pixels.shape[1] * per_frame + 1  # frames of pooled tokens, then one newline
        newline = torch.zeros(length, dtype=torch.bool)
        newline[-1] = True
        return [newline] * pixels.shape[0]

    def _pooled_side(self) -> int:
        stand_in = torch.zeros(1, self.side * self.side, 1)
        return math.isqrt(self.model.model.apply_pooling(stand_in).shape[1])

    # -- per-token view -------------------------------------------------------------------------------------
    def _assemble(self, layouts: list[tuple[Tensor, list[Tensor], str]]) -> VisualTokens:
        """Number grids per sample in sequence order and give every token its grid, row and column."""
        shape = layouts[0][0].shape
        grid = torch.full(shape, -1, dtype=torch.long)
        row, col = torch.full_like(grid, -1), torch.full_like(grid, -1)
        structural = torch.zeros(shape, dtype=torch.bool)
        starts = []  # (first flat position, flat positions, grid, row, col, grid shapes) per image or video
        for placeholder, newlines, kind in layouts:
            flat = placeholder.cpu().flatten().nonzero()[:, 0]
            offset = 0
            for newline in newlines:
                if kind == "image":
                    local_grid, r, c, shapes = _image_layout(newline.cpu(), self.side)
                else:
                    local_grid, r, c, shapes = _video_layout(newline.cpu(), self._pooled_side())
                positions = flat[offset : offset + len(newline)]
                offset += len(newline)
                starts.append((int(positions[0]), positions, local_grid, r, c, shapes))
        counters = [0] * shape[0]
        grid_shape: list[list[tuple[int, int]]] = [[] for _ in range(shape[0])]
        for first, positions, local_grid, r, c, shapes in sorted(starts, key=lambda item: item[0]):
            sample = first // shape[1]
            columns = positions % shape[1]
            content = local_grid >= 0
            grid[sample, columns] = torch.where(content, local_grid + counters[sample], -1)
            row[sample, columns], col[sample, columns] = r, c
            structural[sample, columns] = ~content
            counters[sample] += len(shapes)
            grid_shape[sample].extend(shapes)
        device = layouts[0][0].device
        return VisualTokens(
            grid.to(device), row.to(device), col.to(device), grid_shape, structural.to(device)
        )


def _rows_equal(features: Tensor, vector: Tensor) -> Tensor:
    return (features == vector.to(features.dtype)).all(-1).cpu()


def _image_layout(newline: Tensor, side: int) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, int]]]:
    """Grid (0 base view, 1 crop grid, -1 newline), row and column of each token of one packed image."""
    n = len(newline)
    grid = torch.zeros(n, dtype=torch.long)
    position = torch.arange(n)
    row, col = position // side, position % side
    base = min(side * side, n)
    shapes = [(side, side)]
    if n > base + 1:  # any-res: the crop grid follows the base view, each row ending in a newline
        crops = newline[base:]
        line = torch.cat([torch.zeros(1, dtype=torch.long), crops.long().cumsum(0)[:-1]])
        start_of_line = torch.zeros(int(line.max()) + 1, dtype=torch.long).scatter_reduce(
            0, line, torch.arange(len(crops)), "amin", include_self=False
        )
        grid[base:] = 1
        row[base:], col[base:] = line, torch.arange(len(crops)) - start_of_line[line]
        shapes.append((int(line.max()) + 1, int((~crops).sum()) // (int(line.max()) + 1)))
    grid[newline] = -1
    row[newline], col[newline] = -1, -1
    return grid, row, col, shapes


def _video_layout(newline: Tensor, side: int) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, int]]]:
    """OneVision video: frames of a side x side pooled grid in raster order, then one newline."""
    content = ~newline
    index = torch.arange(int(content.sum()))
    frame, within = index // (side * side), index % (side * side)
    grid, row, col = (torch.full((len(newline),), -1, dtype=torch.long) for _ in range(3))
    grid[content], row[content], col[content] = frame, within // side, within % side
    return grid, row, col, [(side, side)] * (int(frame.max()) + 1)
