"""Tiny random LLaVA models and prompts built from configs: for the demo, the tests and the benchmarks."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0


def tiny_text_config(
    hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int
) -> LlamaConfig:
    """The LLaMA decoder config every tiny LLaVA-family model uses."""
    return LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
    )


def finish_tiny_model(model: torch.nn.Module, hidden: int, dtype: torch.dtype) -> torch.nn.Module:
    """Eval mode and dtype; logits spread so greedy decoding of a random model is not dominated by ties."""
    model = model.to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0 / hidden**0.5 * 4)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_llava(
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 128,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlavaForConditionalGeneration:
    """A random LlavaForConditionalGeneration: (image_size / patch_size)^2 visual tokens per image."""
    torch.manual_seed(seed)
    text = tiny_text_config(hidden, layers, heads, kv_heads, intermediate, vocab)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    return finish_tiny_model(LlavaForConditionalGeneration(config), hidden, dtype)


def tiny_llava_inputs(
    model: LlavaForConditionalGeneration,
    prompt_lengths: list[tuple[int, int]],
    images_per_sample: list[int],
    seed: int = 0,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """A padded batch: sample i has `images_per_sample[i]` images spliced between a prefix and a suffix of
    random text tokens of lengths `prompt_lengths[i]`; images follow one another with one text token between."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    per_image = side * side
    vocab = config.text_config.vocab_size
    rows = []
    for (prefix, suffix), images in zip(prompt_lengths, images_per_sample, strict=True):
        parts = [torch.randint(4, vocab, (prefix,), generator=generator)]
        for i in range(images):
            if i:
                parts.append(torch.randint(4, vocab, (1,), generator=generator))
            parts.append(torch.full((per_image,), IMAGE_TOKEN_ID))
        parts.append(torch.randint(4, vocab, (suffix,), generator=generator))
        rows.append(torch.cat(parts))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span] = row
        attention_mask[i, span] = 1
    total_images = sum(images_per_sample)
    size = config.vision_config.image_size
    pixel_values = torch.randn(total_images, 3, size, size, generator=generator).to(model.dtype)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if total_images:
        out["pixel_values"] = pixel_values
    return out


VIDEO_TOKEN_ID = 4


def tiny_llava_next(
    family: str = "llava_next",
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 128,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A random LLaVA-NeXT (CLIP, "default" select) or LLaVA-OneVision (SigLIP, "full" select, anyres_max_1 so
    large crop grids are down-scaled) model: 32 px views of 8 px patches (4 x 4 tokens), any-res pinpoints up
    to 64 x 64 px."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    text = tiny_text_config(hidden, layers, heads, kv_heads, intermediate, vocab)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32
    )
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    if family == "llava_next":
        config = LlavaNextConfig(
            text_config=text,
            vision_config=CLIPVisionConfig(patch_size=8, **vision),
            image_token_id=IMAGE_TOKEN_ID,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        model_class = LlavaNextForConditionalGeneration
    elif family == "llava_onevision":
        config = LlavaOnevisionConfig(
            text_config=text,
            vision_config=SiglipVisionConfig(patch_size=8, **vision),
            image_token_id=IMAGE_TOKEN_ID,
            video_token_id=VIDEO_TOKEN_ID,
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_1",
        )
        model_class = LlavaOnevisionForConditionalGeneration
    else:
        raise ValueError(f"family must be 'llava_next' or 'llava_onevision', got {family!r}")
    config._attn_implementation = attn_implementation
    return finish_tiny_model(model_class(config), hidden, dtype)


def tiny_llava_next_inputs(
    model: torch.nn.Module, samples: list[list[tuple[str, object]]], seed: int = 0, padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """A padded batch. A sample is a list of parts: ("text", n), ("image", (height, width)) in pixels, or, for
    OneVision, ("video", frames). Placeholder counts come from the model's own vision pipeline on the random
    pixels, so they are what the model will splice."""
    generator = torch.Generator().manual_seed(seed)
    module = __import__(type(model.model).__module__, fromlist=["image_size_to_num_patches"])
    config = model.config
    size = config.vision_config.image_size
    images = [value for sample in samples for kind, value in sample if kind == "image"]
    videos = [value for sample in samples for kind, value in sample if kind == "video"]
    out: dict[str, torch.Tensor] = {}
    image_tokens: list[int] = []
    if images:
        patches = [
            module.image_size_to_num_patches(list(hw), config.image_grid_pinpoints, size) for hw in images
        ]
        pixel_values = torch.zeros(len(images), max(patches), 3, size, size)
        for i, count in enumerate(patches):
            pixel_values[i, :count] = torch.randn(count, 3, size, size, generator=generator)
        out["pixel_values"] = pixel_values.to(model.dtype)
        out["image_sizes"] = torch.tensor(images)
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=out["pixel_values"], image_sizes=out["image_sizes"], return_dict=True
            ).pooler_output
        image_tokens = [len(f) for f in features]
    video_tokens: list[int] = []
    if videos:
        frames = max(videos)
        if any(v != frames for v in videos):
            raise ValueError("all videos of a batch must have the same number of frames")
        out["pixel_values_videos"] = torch.randn(len(videos), frames, 3, size, size, generator=generator).to(
            model.dtype
        )
        with torch.no_grad():
            features = model.model.get_video_features(
                pixel_values_videos=out["pixel_values_videos"], return_dict=True
            ).pooler_output
        video_tokens = [features.shape[1]] * len(videos)
    rows = []
    image_iter, video_iter = iter(image_tokens), iter(video_tokens)
    vocab = config.text_config.vocab_size
    for sample in samples:
        parts = []
        for kind, value in sample:
            if kind == "text":
                parts.append(torch.randint(5, vocab, (int(value),), generator=generator))
            elif kind == "image":
                parts.append(torch.full((next(image_iter),), IMAGE_TOKEN_ID))
            else:
                parts.append(torch.full((next(video_iter),), VIDEO_TOKEN_ID))
        rows.append(torch.cat(parts))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span], attention_mask[i, span] = row, 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, **out}
