"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models and their padded input batches, built from configs.

For the tests: M-RoPE with a tiny head dim, variable image grids, several images per sample, videos, and (Qwen3-VL)
DeepStack features injected into the first decoder layers. Inputs follow the Qwen processors' conventions: each
image or video is wrapped in vision_start/vision_end tokens (Qwen3-VL: one such span per temporal patch, each
preceded by a timestamp text token), `mm_token_type_ids` is 1 at image tokens and 2 at video tokens, grids are
(t, h, w) in patches before the spatial merger, and pixel values are flattened patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from .tiny import PAD_TOKEN_ID, finish_tiny_model

VISION_START_TOKEN_ID = 1
VISION_END_TOKEN_ID = 2
IMAGE_TOKEN_ID = 3
VIDEO_TOKEN_ID = 4
FIRST_TEXT_ID = 8  # random text tokens are drawn from [FIRST_TEXT_ID, vocab): never a special id
SPECIAL_TOKEN_IDS = (PAD_TOKEN_ID, VISION_START_TOKEN_ID, VISION_END_TOKEN_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
PATCH_SIZE = 4
TEMPORAL_PATCH_SIZE = 2
SPATIAL_MERGE_SIZE = 2
CHANNELS = 3

Sample = Sequence[tuple[str, int | tuple[int, ...]]]


def _mrope_section(head_dim: int, family: str) -> list[int]:
    """Splits head_dim / 2 rotary frequencies over (t, h, w). Qwen3-VL interleaves them (h and w take every
    third frequency from 1 and 2, up to 3 x section), so its h and w sections must fit 3 x section <= half."""
    half = head_dim // 2
    if half < 3:
        raise ValueError(f"head_dim {head_dim} is too small for M-RoPE")
    if family == "qwen3_vl":
        spatial = max(1, half // 4)
        return [half - 2 * spatial, spatial, spatial]
    spatial = half // 3
    return [half - 2 * spatial, spatial, spatial]


def tiny_qwen_vl(
    family: str = "qwen2_vl",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 160,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vision_hidden: int = 32,
    vision_depth: int = 2,
) -> torch.nn.Module:
    """A random Qwen2VL/Qwen2_5_VL/Qwen3VLForConditionalGeneration; patches of 4 x 4 pixels x 2 frames, 2 x 2
    spatial merge (one visual token per 4 patches). Qwen3-VL injects DeepStack features into decoder layers
    0 .. vision_depth - 1 (one per vision block)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    if vocab <= FIRST_TEXT_ID:
        raise ValueError(f"vocab {vocab} leaves no room for text tokens after the special ids")
    torch.manual_seed(seed)
    head_dim = hidden // heads
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim, family)}
    text = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        rope_parameters=rope,
    )
    vision = dict(
        depth=vision_depth,
        num_heads=2,
        in_channels=CHANNELS,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        spatial_merge_size=SPATIAL_MERGE_SIZE,
    )
    if family == "qwen2_vl":
        text.update(bos_token_id=None, eos_token_id=None)
        vision.update(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        text.update(bos_token_id=None, eos_token_id=None)
        vision.update(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            out_hidden_size=hidden,
            # windows of 2 x 2 merged tokens (8 x 8 patches of 4 pixels): window attention really windows
            window_size=2 * SPATIAL_MERGE_SIZE * PATCH_SIZE,
            fullatt_block_indexes=[vision_depth - 1],
            tokens_per_second=2,
        )
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        text.update(head_dim=head_dim)
        vision.update(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            out_hidden_size=hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=list(range(vision_depth)),
        )
        config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
    )
    config._attn_implementation = attn_implementation
    model = finish_tiny_model(model_class(config), hidden, dtype)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = None
    return model


def _check_grid(kind: str, grid: tuple[int, ...]) -> tuple[int, int, int]:
    expected = 2 if kind == "image" else 3
    if len(grid) != expected or any(int(g) < 1 for g in grid):
        raise ValueError(f"a {kind} grid is {'(h, w)' if kind == 'image' else '(t, h, w)'}, got {grid!r}")
    t, h, w = (1, *grid) if kind == "image" else grid
    if h % SPATIAL_MERGE_SIZE or w % SPATIAL_MERGE_SIZE:
        raise ValueError(
            f"{kind} grid {grid!r}: h and w must be multiples of the merge size {SPATIAL_MERGE_SIZE}"
        )
    return int(t), int(h), int(w)


def tiny_qwen_inputs(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    seed: int = 0,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """A padded batch, one row per sample. A sample is a list of parts: ("text", n) for n random text tokens,
    ("image", (h, w)) and ("video", (t, h, w)) with the grid in patches before the 2 x 2 merger (h, w even; t
    temporal patches of 2 frames each). Returns input_ids, attention_mask, mm_token_type_ids, and where there
    are media pixel_values/image_grid_thw and pixel_values_videos/video_grid_thw (images and videos in sample
    order, as a processor would return them)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    vocab = config.get_text_config().vocab_size
    vision = config.vision_config
    merge = vision.spatial_merge_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    separate_frames = config.model_type == "qwen3_vl"  # Qwen3-VL: one span and a timestamp per frame

    def text(n: int) -> torch.Tensor:
        return torch.randint(FIRST_TEXT_ID, vocab, (n,), generator=generator)

    def span(token: int, count: int, kind_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat(
            [
                torch.tensor([VISION_START_TOKEN_ID]),
                torch.full((count,), token),
                torch.tensor([VISION_END_TOKEN_ID]),
            ]
        )
        types = torch.zeros(count + 2, dtype=torch.long)
        types[1:-1] = kind_id
        return ids, types

    rows, type_rows = [], []
    grids: dict[str, list[tuple[int, int, int]]] = {"image": [], "video": []}
    for sample in samples:
        ids, types = [], []
        for kind, value in sample:
            if kind == "text":
                if int(value) < 0:
                    raise ValueError(f"text length must be >= 0, got {value!r}")
                ids.append(text(int(value)))
                types.append(torch.zeros(int(value), dtype=torch.long))
                continue
            if kind not in ("image", "video"):
                raise ValueError(
                    f"a part is ('text', n), ('image', (h, w)) or ('video', (t, h, w)), got {kind!r}"
                )
            t, h, w = _check_grid(kind, tuple(value))
            grids[kind].append((t, h, w))
            per_frame = h * w // merge**2
            if kind == "image":
                part = span(IMAGE_TOKEN_ID, per_frame, 1)
                ids.append(part[0])
                types.append(part[1])
            elif separate_frames:
                for _ in range(t):
                    ids.append(text(1))  # the frame's timestamp ("<0.5 seconds>" in the processor)
                    types.append(torch.zeros(1, dtype=torch.long))
                    part = span(VIDEO_TOKEN_ID, per_frame, 2)
                    ids.append(part[0])
                    types.append(part[1])
            else:
                part = span(VIDEO_TOKEN_ID, t * per_frame, 2)
                ids.append(part[0])
                types.append(part[1])
        if not ids:
            raise ValueError("a sample needs at least one part")
        rows.append(torch.cat(ids))
        type_rows.append(torch.cat(types))

    width = max(len(r) for r in rows)
    if width == 0:
        raise ValueError("every sample is empty")
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    mm_token_type_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, type_row) in enumerate(zip(rows, type_rows, strict=True)):
        where = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, where] = row
        attention_mask[i, where] = 1
        mm_token_type_ids[i, where] = type_row
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm_token_type_ids}
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if grids[kind]:
            grid = torch.tensor(grids[kind], dtype=torch.long)
            patches = int(grid.prod(-1).sum())
            out[key] = torch.randn(patches, patch_dim, generator=generator).to(model.dtype)
            out[f"{kind}_grid_thw"] = grid
    return out
