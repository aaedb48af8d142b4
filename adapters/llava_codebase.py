"""The LLaVA codebase family: the original LLaVA (`llava-torch`), LLaVA-HR and Mini-Gemini.

These models splice image features into `inputs_embeds` inside their own `prepare_inputs_labels_for_multimodal`
(each `-200` placeholder becomes that image's feature tokens; rows are re-padded, maybe truncated), then run a
LLaMA-style decoder. The adapter learns where the features went from the splice itself: it wraps that method on
the model instance and runs it once with a label probe (every text token labelled with its own index), so the
spliced positions that carry no probe label and are not padding are exactly the image tokens, whatever the
padding side, truncation or fork. The caller's labels are rebuilt from the probe, as the splice would have.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from tokencompress.engine.encoder import VisionEncoder, clip_style_encoder
from tokencompress.view import VisualTokens

from .base import Adapter, grid_patches

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


class LlavaCodebaseAdapter(Adapter):
    families = (
        "the LLaVA codebase: original LLaVA (llava-torch), LLaVA-HR, Mini-Gemini "
        "(models with prepare_inputs_labels_for_multimodal over a LLaMA-style decoder)"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.spliced: VisualTokens | None = None  # the last splice's layout, taken by the text model's hook
        self.carried_labels: Tensor | None = None  # the last splice's labels, taken the same way
        self.encoder_rows: list[int] | None = None  # per sample of the last layout: images encoded for it

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        splice = getattr(model, "prepare_inputs_labels_for_multimodal", None)
        get_model = getattr(model, "get_model", None)
        return (
            callable(splice)
            and callable(get_model)
            and hasattr(get_model(), "layers")
            and hasattr(model, "lm_head")
        )

    @property
    def multimodal_model(self) -> nn.Module:
        return self.model

    @property
    def language_model(self) -> nn.Module:
        return self.model.get_model()

    @property
    def text_config(self) -> Any:
        return self.model.config

    def vision_encoder(self) -> VisionEncoder | None:
        """The transformers vision model inside the codebase's tower wrapper (`tower.vision_tower`); none for
        Mini-Gemini-HD, which encodes every image's crops before all global views (rows out of prompt order)."""
        if getattr(self.model.config, "image_grid", 1) > 1:
            return None
        inner = self.model.get_model()
        tower = inner.get_vision_tower() if hasattr(inner, "get_vision_tower") else None
        return clip_style_encoder(getattr(tower, "vision_tower", None))

    def encoder_patches(self, tokens: VisualTokens, encoder_rows: int) -> Tensor | None:
        side = self._side(0)
        rows = self.encoder_rows
        if not side or rows is None or len(rows) != len(tokens.grid_shape):
            return None
        return grid_patches(tokens, side, encoder_rows, rows)

    # -- validation before any work -------------------------------------------------------------------------
    def visual_tokens(self, inputs: dict[str, Any]) -> VisualTokens | None:
        """Check placeholders against the images given; the layout itself comes from the splice."""
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            input_ids = inputs.get("inputs")
        images = inputs.get("images")
        if input_ids is None or images is None or input_ids.dim() != 2 or input_ids.shape[1] == 1:
            return None
        mask = inputs.get("attention_mask")
        placeholders = input_ids == IMAGE_TOKEN_INDEX
        if mask is not None:
            placeholders &= mask.bool()
        given = len(images) if isinstance(images, (list, tuple)) else images.shape[0]
        if int(placeholders.sum()) > given:
            raise ValueError(
                f"the prompt has {int(placeholders.sum())} image placeholders ({IMAGE_TOKEN_INDEX}) "
                f"({placeholders.sum(1).tolist()} per sample) but {given} image(s) were given"
            )
        return None

    # -- learning the layout from the splice ------------------------------------------------------------------
    def install(self) -> Any:
        original = self.model.prepare_inputs_labels_for_multimodal
        signature = inspect.signature(original)

        def splice(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            arguments = bound.arguments
            input_ids, images = arguments.get("input_ids"), arguments.get("images")
            if input_ids is None or images is None or input_ids.shape[1] == 1:
                return _full_length_decode_mask(original(*args, **kwargs), input_ids, arguments)
            labels, mask = arguments.get("labels"), arguments.get("attention_mask")
            arguments["labels"] = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(
                input_ids
            )
            if mask is None:
                arguments["attention_mask"] = torch.ones_like(input_ids, dtype=torch.bool)
            out = list(original(*bound.args, **bound.kwargs))
            probe, new_mask = (
                out[-1],
                out[-4],
            )  # (..., attention_mask, past_key_values, inputs_embeds, labels)
            self.spliced = self._layout(input_ids, arguments["attention_mask"], probe, new_mask.bool())
            out[-1] = self.carried_labels = None if labels is None else _carry_labels(labels, probe)
            if mask is None:
                out[-4] = None
            return tuple(out)

        self.model.__dict__["prepare_inputs_labels_for_multimodal"] = splice
        return lambda: self.model.__dict__.pop("prepare_inputs_labels_for_multimodal", None)

    def text_labels(self, labels: Tensor | None, text_inputs: dict[str, Any]) -> Tensor | None:
        carried, self.carried_labels = self.carried_labels, None
        return carried

    def complete_visual_tokens(
        self, tokens: VisualTokens | None, text_inputs: dict[str, Any]
    ) -> VisualTokens | None:
        spliced, self.spliced = self.spliced, None
        embeds = text_inputs.get("inputs_embeds")
        if spliced is None or embeds is None:
            return tokens
        batch, length = embeds.shape[:2]
        rows, spliced_length = spliced.image_index.shape
        if spliced_length != length or batch % rows:
            return tokens
        if batch != rows:  # generate expanded the spliced rows (beams, several sequences per prompt)
            repeats = batch // rows
            self.encoder_rows = [n for n in self.encoder_rows for _ in range(repeats)]
            spliced = VisualTokens(
                *(
                    t.repeat_interleave(repeats, 0)
                    for t in (spliced.image_index, spliced.grid_row, spliced.grid_col)
                ),
                [shape for shape in spliced.grid_shape for _ in range(repeats)],
            )
        return spliced

    def _layout(self, input_ids: Tensor, mask: Tensor, probe: Tensor, new_mask: Tensor) -> VisualTokens:
        """Split each sample's image positions into its images and give each its grid."""
        visual = new_mask & (probe == IGNORE_INDEX)
        image_index, grid_row, grid_col = (torch.full(visual.shape, -1, dtype=torch.long) for _ in range(3))
        shapes: list[list[tuple[int, int]]] = []
        image_counts: list[int] = []
        for b in range(visual.shape[0]):
            ids = input_ids[b][mask[b].bool()].cpu()
            groups = _placeholder_groups(ids)
            image_counts.append(sum(groups))
            runs = _runs(visual[b].nonzero()[:, 0].cpu())
            shapes.append([])
            grid = 0
            for run, images in zip(runs, groups, strict=False):
                if len(run) % images:
                    raise ValueError(
                        f"{len(run)} spliced image tokens cannot be split evenly among {images} adjacent images"
                    )
                size = len(run) // images
                for part in run.split(size):
                    local, r, c, grids = self._grid(size)
                    image_index[b, part] = torch.where(local >= 0, local + grid, -1)
                    grid_row[b, part], grid_col[b, part] = r, c
                    shapes[b].extend(grids)
                    grid += len(grids)
        # The codebase encodes one image for a sample without any (and splices none of it): its rows come too.
        per_image = max((len(s) // n for s, n in zip(shapes, image_counts, strict=True) if n), default=1)
        self.encoder_rows = [len(s) if n else per_image for s, n in zip(shapes, image_counts, strict=True)]
        device = visual.device
        return VisualTokens(image_index.to(device), grid_row.to(device), grid_col.to(device), shapes)

    def _grid(self, size: int) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, int]]]:
        """Grid, row and column of one image's `size` tokens: side x side patches (the vision tower's
        `num_patches_per_side`), several such grids (e.g. HD crops), or with a leading CLS token."""
        side = self._side(size)
        index = torch.arange(size)
        if side and size % (side * side) == 0:
            per = side * side
            return index // per, (index % per) // side, index % side, [(side, side)] * (size // per)
        if side and size == side * side + 1:
            cell = index - 1
            row = torch.where(cell >= 0, cell.div(side, rounding_mode="floor"), -1)
            return (
                torch.zeros(size, dtype=torch.long),
                row,
                torch.where(cell >= 0, cell % side, -1),
                [(side, side)],
            )
        off = torch.full((size,), -1, dtype=torch.long)
        return torch.zeros(size, dtype=torch.long), off, off.clone(), [(0, 0)]

    def _side(self, size: int) -> int:
        """Patches per side of one view: the tower's `num_patches_per_side` or `num_patches` (LLaVA, MGM), else
        the square root of the image's token count when it is a square."""
        inner = self.model.get_model()
        tower = inner.get_vision_tower() if hasattr(inner, "get_vision_tower") else None
        side = getattr(tower, "num_patches_per_side", None)
        if not isinstance(side, int):
            patches = getattr(tower, "num_patches", None)
            side = (
                math.isqrt(patches)
                if isinstance(patches, int) and math.isqrt(patches) ** 2 == patches
                else None
            )
        if isinstance(side, int) and side > 0:
            return side
        root = math.isqrt(size)
        return root if root * root == size else 0


def _full_length_decode_mask(out: Any, input_ids: Tensor | None, arguments: dict[str, Any]) -> Any:
    """LLaVA-HR's decode step builds an all-ones mask from the last layer's cache length; with per-layer caches
    that layer is shorter than the sequence. Layer 0's cache always holds the full length: size the mask by it."""
    cache = arguments.get("past_key_values")
    if (
        input_ids is None
        or not hasattr(cache, "get_seq_length")
        or not isinstance(out, tuple)
        or len(out) < 4
    ):
        return out
    mask = out[-4]
    expected = cache.get_seq_length() + input_ids.shape[1]
    if not isinstance(mask, Tensor) or mask.shape[1] == expected or not bool(mask.all()):
        return out
    out = list(out)
    out[-4] = torch.ones(mask.shape[0], expected, dtype=mask.dtype, device=mask.device)
    return tuple(out)


def _carry_labels(labels: Tensor, probe: Tensor) -> Tensor:
    """The caller's labels moved as the splice moved its text tokens; image and padding positions ignored."""
    return torch.where(probe >= 0, labels.gather(1, probe.clamp(min=0)), IGNORE_INDEX)


def _placeholder_groups(ids: Tensor) -> list[int]:
    """How many images each run of adjacent placeholders holds, in order."""
    where = (ids == IMAGE_TOKEN_INDEX).nonzero()[:, 0]
    return [len(run) for run in _runs(where)]


def _runs(positions: Tensor) -> list[Tensor]:
    """Split sorted positions into runs of consecutive values."""
    if len(positions) == 0:
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero()[:, 0] + 1
    return list(torch.tensor_split(positions, breaks.tolist()))
