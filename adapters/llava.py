"""LLaVA-1.5 (transformers `LlavaForConditionalGeneration`): a CLIP grid spliced at image placeholder tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokencompress.engine.encoder import VisionEncoder, clip_style_encoder
from tokencompress.view import VisualTokens

from .base import Adapter, grid_patches


class LlavaAdapter(Adapter):
    """Each image is a run of `image_token_id` placeholders: the CLIP patch grid in raster order.

    Tokens per image come from the vision config (image_size / patch_size squared) and the feature-select
    strategy ("default" drops CLS; "full" keeps it as an off-grid first token).
    """

    families = "LLaVA-1.5 (LlavaForConditionalGeneration)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        return (
            getattr(config, "model_type", None) == "llava"
            and all(
                hasattr(inner, part) for part in ("vision_tower", "multi_modal_projector", "language_model")
            )
            and hasattr(model, "lm_head")
        )

    def vision_encoder(self) -> VisionEncoder | None:
        return clip_style_encoder(self.model.model.vision_tower)

    def encoder_patches(self, tokens: VisualTokens, encoder_rows: int) -> Tensor | None:
        return grid_patches(tokens, self.grid_side(), encoder_rows)

    def grid_side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    @staticmethod
    def images_given(inputs: dict[str, Any]) -> int | None:
        """How many images this call splices: raw pixels, or features `generate` encoded beforehand."""
        if inputs.get("pixel_values") is not None:
            return inputs["pixel_values"].shape[0]
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            return len(encoded.pooler_output)
        return None

    def visual_tokens(self, inputs: dict[str, Any]) -> VisualTokens | None:
        config = self.model.config
        placeholder = self.placeholders(inputs, config.image_token_id)
        images_given = self.images_given(inputs)
        if images_given is None:
            return (
                None  # without images LLaVA embeds placeholder ids as text (e.g. a decode step emitting one)
            )
        if not bool(placeholder.any()):
            raise ValueError(
                f"{images_given} image(s) were given but the prompt has no image placeholder "
                f"(token id {config.image_token_id})"
            )

        strategy = inputs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        side = self.grid_side()
        has_cls = strategy == "full"
        per_image = side * side + int(has_cls)
        counts = placeholder.sum(1)
        if bool((counts % per_image != 0).any()):
            raise ValueError(
                f"image placeholders per sample {counts.tolist()} are not multiples of the {per_image} tokens one "
                f"image takes ({side}x{side} grid, vision_feature_select_strategy={strategy!r})"
            )
        images = counts // per_image
        if int(images.sum()) != images_given:
            raise ValueError(
                f"the prompt has placeholders for {int(images.sum())} image(s) ({images.tolist()} per sample) but "
                f"{images_given} image(s) were given"
            )

        rank = placeholder.long().cumsum(1) - 1
        offset = rank % per_image - int(has_cls)
        image_index = torch.where(placeholder, rank // per_image, -1)
        on_grid = placeholder & (offset >= 0)
        grid_row = torch.where(on_grid, offset.div(side, rounding_mode="floor"), -1)
        grid_col = torch.where(on_grid, offset % side, -1)
        shapes = [[(side, side)] * int(n) for n in images.tolist()]
        return VisualTokens(image_index, grid_row, grid_col, shapes)
