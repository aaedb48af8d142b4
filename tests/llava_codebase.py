"""The original LLaVA codebase (PyPI `llava-torch`, installed with `pip install --no-deps llava-torch==1.2.2.post1`)
under our transformers, for tests only: a minimal import shim, a tiny random `LlavaLlamaForCausalLM` built from
configs (no download) and padded batches with its `IMAGE_TOKEN_INDEX` (-200) placeholders.

Importing this module raises ImportError when llava-torch is not installed: tests use
`pytest.importorskip("llava_codebase")`-style guards, or `pytest.importorskip("llava")` before importing it.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.utils import import_utils

if importlib.util.find_spec("llava") is None:
    raise ImportError("llava-torch is not installed: pip install --no-deps llava-torch==1.2.2.post1")


def _import_llava() -> None:
    """The whole shim. llava/mm_utils.py does `from PIL import Image` at import (used only by its image
    preprocessing helpers, never by the model); Pillow is not a dependency here, so, only when Pillow is
    missing, a stub `PIL` lives in sys.modules for the duration of the import and is removed right after.
    Transformers caches `is_vision_available()` (lru_cache) and imports `PIL.Image` lazily, so the real answer
    is cached first and the stub never leaks into transformers or any other import."""
    if importlib.util.find_spec("PIL") is not None:
        import llava.model.language_model.llava_llama  # noqa: F401

        return
    import_utils.is_vision_available()  # cache the real answer (False) before the stub exists
    pil, image = types.ModuleType("PIL"), types.ModuleType("PIL.Image")
    pil.__path__, pil.Image = [], image
    sys.modules.update({"PIL": pil, "PIL.Image": image})
    try:
        import llava.model.language_model.llava_llama  # noqa: F401
    finally:
        del sys.modules["PIL"], sys.modules["PIL.Image"]


_import_llava()

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM  # noqa: E402
from llava.model.multimodal_encoder import clip_encoder  # noqa: E402

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "PAD_TOKEN_ID",
    "LlavaConfig",
    "LlavaLlamaForCausalLM",
    "image_token_count",
    "tiny_llava_codebase",
    "tiny_llava_codebase_inputs",
]

PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
VISION_TOWER_NAME = "openai/clip-vit-large-patch14-336"  # never loaded: the builder supplies the config


def tiny_llava_codebase(
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 128,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_padding_side: str = "right",
) -> LlavaLlamaForCausalLM:
    """A random LLaVA-1.5-style `LlavaLlamaForCausalLM`: CLIP tower built from a CLIPVisionConfig, features of
    layer -2 without CLS ((image_size / patch_size)^2 tokens per image), `mlp2x_gelu` projector, flat merge.
    `tokenizer_padding_side` is the side the splice pads to: "right" as in the released checkpoints (batched
    `generate` is then wrong for the shorter rows, a codebase property); "left" makes batched generate exact."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    vision._attn_implementation = (
        "eager" if attn_implementation == "eager" else "sdpa"
    )  # tower kernel is irrelevant
    config = LlavaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        # what LLaVA-1.5's config.json holds (initialize_vision_modules / train.py set these)
        mm_vision_tower=VISION_TOWER_NAME,
        mm_hidden_size=vision_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        tokenizer_padding_side=tokenizer_padding_side,
        use_mm_proj=True,
    )
    config._attn_implementation = attn_implementation
    # CLIPVisionTower(delay_load=True) reads only a config with CLIPVisionConfig.from_pretrained(name): answer it
    # from memory, patching the name in llava's module only and only while the model is built.
    original = clip_encoder.CLIPVisionConfig
    clip_encoder.CLIPVisionConfig = types.SimpleNamespace(from_pretrained=lambda *args, **kwargs: vision)
    try:
        model = LlavaLlamaForCausalLM(config)
    finally:
        clip_encoder.CLIPVisionConfig = original
    # What CLIPVisionTower.load_model does, minus the download (and the image processor, which needs Pillow).
    tower = model.get_vision_tower()
    tower.vision_tower = CLIPVisionModel(vision)
    tower.vision_tower.requires_grad_(False)
    tower.is_loaded = True
    model = model.to(dtype).eval()
    # Spread logits so greedy decoding is not dominated by ties in a random model (as tokencompress.tiny does).
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0 / hidden**0.5 * 4)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.bos_token_id = BOS_TOKEN_ID
    return model


def image_token_count(model: LlavaLlamaForCausalLM) -> int:
    """Feature tokens one image becomes in the splice (one -200 placeholder each)."""
    return model.get_vision_tower().num_patches


def tiny_llava_codebase_inputs(
    model: LlavaLlamaForCausalLM,
    prompt_lengths: list[tuple[int, int]],
    images_per_sample: list[int],
    padding_side: str = "right",
    seed: int = 0,
    dummy_image_for_text_only: bool = True,
) -> dict[str, torch.Tensor]:
    """A padded batch in the codebase's format: sample i is BOS, `prefix` random tokens, `images_per_sample[i]`
    IMAGE_TOKEN_INDEX placeholders (one per image, one random text token between two), `suffix` random tokens,
    for `prompt_lengths[i] == (prefix, suffix)`. `images` is (n_images, 3, H, W), in sample order.

    `prepare_inputs_labels_for_multimodal` consumes one image feature for a sample WITHOUT placeholders (it
    splices `features[0:0]`, as in LLaVA training where text-only samples carry a dummy image), so a batch mixing
    text-only and image samples needs a dummy image at that place: added when `dummy_image_for_text_only`.
    When no sample has an image, `images` is omitted (the codebase then only embeds the ids)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    rows = []
    for (prefix, suffix), images in zip(prompt_lengths, images_per_sample, strict=True):
        parts = [torch.tensor([BOS_TOKEN_ID]), torch.randint(4, vocab, (prefix,), generator=generator)]
        for i in range(images):
            if i:
                parts.append(torch.randint(4, vocab, (1,), generator=generator))
            parts.append(torch.tensor([IMAGE_TOKEN_INDEX]))
        parts.append(torch.randint(4, vocab, (suffix,), generator=generator))
        rows.append(torch.cat(parts))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span] = row
        attention_mask[i, span] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if sum(images_per_sample):
        counts = [n or int(dummy_image_for_text_only) for n in images_per_sample]
        size = model.get_vision_tower().config.image_size
        out["images"] = torch.randn(sum(counts), 3, size, size, generator=generator).to(model.dtype)
    return out
