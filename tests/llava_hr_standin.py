"""A faithful tiny stand-in for LLaVA-HR (Luo et al. 2024, "Feast Your Eyes"), built from transformers parts.

LLaVA-HR (github.com/luogen1996/LLaVA-HR) is not on PyPI. This module mirrors its class structure, attribute
names, method names and signatures, and - what matters for tokencompress - its splice, forward and
`prepare_inputs_for_generation` line by line. Real-code references (repository luogen1996/LLaVA-HR):

* ``llava_hr/constants.py``                                -> ``IGNORE_INDEX``, ``IMAGE_TOKEN_INDEX`` ...
* ``llava_hr/model/multimodal_encoder/clip_encoder.py``    -> :class:`CLIPVisionTower`, :func:`forward_embeddings`
* ``llava_hr/model/multimodal_encoder/builder.py``         -> :func:`build_vision_tower`
* ``llava_hr/model/multimodal_projector/builder.py``       -> :func:`build_vision_projector` (LLaVA-1.5's)
* ``llava_hr/model/llava_arch.py``                         -> :class:`LlavaMetaModel`, :class:`LlavaMetaForCausalLM`
* ``llava_hr/model/language_model/llava_llama.py``         -> :class:`LlavaConfig`, :class:`LlavaLlamaModel`,
  :class:`LlavaLlamaForCausalLM`

Every deviation from the real code is marked ``# STAND-IN:`` (no checkpoints, no downloads, parts left out) or
``# TF5:`` (minimal adaptation so the code runs under transformers 5.x; HR pins transformers 4.3x).

What is NOT mirrored: HR's multi-path encoder (``MultiPathCLIPVisionTower``: a CLIP ViT and a high-resolution
ConvNeXt fused by MR-Adapters, ``is_multipath_encoder=True`` in the released checkpoints) is replaced by HR's
plain ``CLIPVisionTower`` (``is_multipath_encoder=False``, a path HR's builder supports). Either tower returns
one (B, N, C) grid of patch features per image, so the splice - the only part tokencompress sees - is the same.
The EVA-CLIP / ConvNeXt-only towers and the ``spatial*`` (any-res) merge are left out (flat merge only).

HR's splice (the OLDER LLaVA one, ``prepare_inputs_labels_for_multimodal(input_ids, attention_mask,
past_key_values, labels, images, image_sizes=None)`` returning ``(None, attention_mask, past_key_values,
inputs_embeds, labels)``), per sample: padding is NOT removed; each ``-200`` placeholder of the whole padded row
is replaced in place by that image's N features; rows of different length are right-padded with zeros; the mask
is rebuilt as ``[True] * (new_len - old_len) + old_mask + [False] * new_padding`` (the extra Trues go to the
LEFT, whatever the image's position: right for right-padded prompts, HR's collator padding; wrong for left
padding). No ``position_ids``: the decoder numbers every row 0..L-1, padding included. Properties of HR's own
code kept as they are:

* ``labels=None`` with rows of different spliced length (rows with different image counts) raises
  ``UnboundLocalError`` (``_new_labels`` is only bound when labels are given): HR batches only in training.
* at a decode step with a cache, the splice replaces ``attention_mask`` by ones over the LAST layer's cached
  length + 1, so a padded batch attends its padding while decoding (HR evaluates with batch 1).
* a text-only row consumes one image (``features[0:0]`` spliced), so mixed batches carry a dummy image.
"""

# HR's code is kept as written (getattr/setattr with constants, super(Class, self), zip without strict, ...):
# ruff: noqa: B009, B010, B905, SIM108, SIM910, UP008

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from typing import List, Optional, Tuple, Union  # noqa: UP035 - HR's annotations, kept

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import CrossEntropyLoss
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# --------------------------------------------------------------------------------------------------------------
# llava_hr/constants.py
# --------------------------------------------------------------------------------------------------------------
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"

PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
VISION_TOWER_NAME = "openai/clip-vit-large-patch14-336"  # a name only: the stand-in never loads it


# --------------------------------------------------------------------------------------------------------------
# llava_hr/model/multimodal_encoder/clip_encoder.py
# --------------------------------------------------------------------------------------------------------------
def forward_embeddings(self, pixel_values: torch.FloatTensor, interpolate_pos_encoding=False) -> torch.Tensor:
    # TF5: transformers 5 calls the embeddings with `interpolate_pos_encoding`; HR's replacement (bound over
    # CLIPVisionEmbeddings.forward) takes pixel_values only. The argument is accepted and ignored: HR resamples
    # the position embeddings itself whenever the patch count differs.
    batch_size = pixel_values.shape[0]
    target_dtype = self.patch_embedding.weight.dtype
    patch_embeds = self.patch_embedding(pixel_values.to(dtype=target_dtype))  # shape = [*, width, grid, grid]
    patch_embeds = patch_embeds.flatten(2).transpose(1, 2)

    class_embeds = self.class_embedding.expand(batch_size, 1, -1)
    embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
    position_embeddings = self.position_embedding(self.position_ids)

    if position_embeddings.shape[1] != embeddings.shape[1]:
        position_embeddings = resample_pos_embed(position_embeddings, embeddings.shape[1])

    embeddings = embeddings + position_embeddings
    return embeddings


def resample_pos_embed(
    posemb,
    new_size: int,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
    verbose: bool = False,
):
    new_size = [
        int(math.sqrt(new_size - num_prefix_tokens)),
        int(math.sqrt(new_size - num_prefix_tokens)),
    ]
    num_pos_tokens = posemb.shape[1] - num_prefix_tokens
    old_size = int(math.sqrt(num_pos_tokens))
    bs = posemb.shape[0]

    if num_prefix_tokens:
        posemb_prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    else:
        posemb_prefix, posemb = None, posemb

    # do the interpolation
    embed_dim = posemb.shape[-1]
    orig_dtype = posemb.dtype
    posemb = posemb.float()  # interpolate needs float32
    posemb = posemb.reshape(bs, old_size, old_size, -1).permute(0, 3, 1, 2)
    posemb = F.interpolate(posemb, size=new_size, mode=interpolation, antialias=antialias)
    posemb = posemb.permute(0, 2, 3, 1).reshape(bs, -1, embed_dim)
    posemb = posemb.to(dtype=orig_dtype)

    # add back extra (class, etc) prefix tokens
    if posemb_prefix is not None:
        posemb = torch.cat([posemb_prefix, posemb], 1)

    if not torch.jit.is_scripting() and verbose:
        print(f"Resized position embedding: {old_size} to {new_size}.")

    return posemb


class CLIPVisionTower(nn.Module):
    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()

        self.is_loaded = False
        self.freeze_vision = args.freeze_vision
        self.input_image_size = args.input_image_size
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        # STAND-IN: the CLIP config travels in the model config (`clip_vision_config`, a dict) instead of
        # `CLIPVisionConfig.from_pretrained(self.vision_tower_name)`.
        self._vision_cfg_dict = dict(args.clip_vision_config)

        if not delay_load:
            self.load_model()
        else:
            self.cfg_only = CLIPVisionConfig(**self._vision_cfg_dict)

    def load_model(self):
        # STAND-IN: random weights from the config instead of `CLIPVisionModel.from_pretrained`; no image
        # processor (CLIPImageProcessor needs Pillow): tiny_llava_hr_inputs makes tensors directly.
        self.image_processor = None
        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(**self._vision_cfg_dict))
        # TF5: `self.vision_tower.vision_model.encoder` / `.embeddings` below: transformers 5's CLIPVisionModel
        # holds the vision transformer's parts directly (no `vision_model` wrapper).
        # checkpointing for clip
        self.vision_tower.encoder.gradient_checkpointing = True

        if self.freeze_vision:
            self.vision_tower.requires_grad_(False)

        cls_ = self.vision_tower.embeddings
        bound_method = forward_embeddings.__get__(cls_, cls_.__class__)
        setattr(cls_, "forward", bound_method)

        if self.input_image_size is not None:
            pass  # STAND-IN: HR resizes its image processor here; there is none (see above)

        self.is_loaded = True

    def feature_select(self, image_forward_outs):
        if self.select_layer > 100:
            n_layer = len(image_forward_outs.hidden_states) - 1
            mod_index = max(n_layer // (self.select_layer // 100), 1)
            image_features = []
            for i in range(n_layer):
                if (i + 1) % mod_index == 0:
                    image_features.append(image_forward_outs.hidden_states[i + 1])
            image_features = torch.cat(image_features, -1)
        else:
            image_features = image_forward_outs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            image_features = image_features[:, 1:]
        elif self.select_feature == "cls_patch":
            image_features = image_features
        else:
            raise ValueError(f"Unexpected select feature: {self.select_feature}")
        return image_features

    def forward(self, images):
        if self.freeze_vision:
            with torch.no_grad():
                image_features = self._forward_images(images)
        else:
            image_features = self._forward_images(images)

        return image_features

    def _forward_images(self, images):
        if type(images) is list:
            image_features = []
            for image in images:
                image_forward_out = self.vision_tower(
                    image.to(device=self.device, dtype=self.dtype).unsqueeze(0), output_hidden_states=True
                )
                image_feature = self.feature_select(image_forward_out).to(image.dtype)
                image_features.append(image_feature)
        else:
            image_forward_outs = self.vision_tower(
                images.to(device=self.device, dtype=self.dtype), output_hidden_states=True
            )
            image_features = self.feature_select(image_forward_outs).to(images.dtype)
        return image_features

    @property
    def dummy_feature(self):
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self):
        return self.vision_tower.dtype

    @property
    def device(self):
        return self.vision_tower.device

    @property
    def num_attention_heads(self):
        return self.config.num_attention_heads

    @property
    def num_layers(self):
        return self.config.num_hidden_layers

    @property
    def config(self):
        if self.is_loaded:
            return self.vision_tower.config
        else:
            return self.cfg_only

    @property
    def hidden_size(self):
        return self.config.hidden_size

    @property
    def num_patches_per_side(self):
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self):
        return (self.config.image_size // self.config.patch_size) ** 2


# --------------------------------------------------------------------------------------------------------------
# llava_hr/model/multimodal_encoder/builder.py
# --------------------------------------------------------------------------------------------------------------
def build_vision_tower(vision_tower_cfg, **kwargs):
    vision_tower = getattr(
        vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None)
    )
    is_absolute_path_exists = os.path.exists(vision_tower)
    is_multipath_encoder = getattr(vision_tower_cfg, "is_multipath_encoder")
    if is_multipath_encoder:
        # STAND-IN: MultiPathCLIPVisionTower (CLIP ViT + ConvNeXt with MR-Adapters) is not mirrored.
        raise NotImplementedError(
            "the stand-in has HR's plain CLIPVisionTower only (is_multipath_encoder=False)"
        )
    else:
        if is_absolute_path_exists or vision_tower.startswith("openai") or vision_tower.startswith("laion"):
            return CLIPVisionTower(vision_tower, args=vision_tower_cfg, **kwargs)
        # STAND-IN: EVACLIPVisionTower ("eva...") and ConvNextVisionTower ("...convnext...") left out.

    raise ValueError(f"Unknown vision tower: {vision_tower}")


# --------------------------------------------------------------------------------------------------------------
# llava_hr/model/multimodal_projector/builder.py (LLaVA-1.5's)
# --------------------------------------------------------------------------------------------------------------
class IdentityMap(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x

    @property
    def config(self):
        return {"mm_projector_type": "identity"}


def build_vision_projector(config, delay_load=False, **kwargs):
    projector_type = getattr(config, "mm_projector_type", "linear")

    if projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)

    mlp_gelu_match = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if mlp_gelu_match:
        mlp_depth = int(mlp_gelu_match.group(1))
        modules = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
        for _ in range(1, mlp_depth):
            modules.append(nn.GELU())
            modules.append(nn.Linear(config.hidden_size, config.hidden_size))
        return nn.Sequential(*modules)

    if projector_type == "identity":
        return IdentityMap()

    raise ValueError(f"Unknown projector type: {projector_type}")


# --------------------------------------------------------------------------------------------------------------
# llava_hr/model/llava_arch.py
# --------------------------------------------------------------------------------------------------------------
class LlavaMetaModel:
    def __init__(self, config):
        super(LlavaMetaModel, self).__init__(config)

        if hasattr(config, "mm_vision_tower"):
            if not hasattr(config, "is_multipath_encoder"):
                setattr(config, "is_multipath_encoder", False)
            if hasattr(config, "delay_load"):
                delay_load = getattr(config, "delay_load")
            else:
                delay_load = True
            self.vision_tower = build_vision_tower(config, delay_load=delay_load)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in getattr(config, "mm_patch_merge_type", ""):
                self.image_newline = torch.Tensor(torch.zeros(config.hidden_size, dtype=self.dtype))

    def get_vision_tower(self):
        vision_tower = getattr(self, "vision_tower", None)
        if type(vision_tower) is list:
            vision_tower = vision_tower[0]
        return vision_tower

    # STAND-IN: initialize_vision_modules (training-time setup from model_args) left out.


class LlavaMetaForCausalLM(ABC):
    @abstractmethod
    def get_model(self):
        pass

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def encode_images(self, images):
        image_features = self.get_model().get_vision_tower()(images)
        image_features = self.get_model().mm_projector(image_features)
        return image_features

    def prepare_inputs_labels_for_multimodal(
        self, input_ids, attention_mask, past_key_values, labels, images, image_sizes=None
    ):
        vision_tower = self.get_vision_tower()
        if vision_tower is None or images is None or input_ids.shape[1] == 1:
            if (
                past_key_values is not None
                and vision_tower is not None
                and images is not None
                and input_ids.shape[1] == 1
            ):
                # TF5: `past_key_values[-1][-1].shape[-2]` (the last layer's value tensor, legacy tuple cache):
                # a transformers-5 DynamicCache is not indexable; `.layers[-1].values` is that same tensor.
                attention_mask = torch.ones(
                    (attention_mask.shape[0], past_key_values.layers[-1].values.shape[-2] + 1),
                    dtype=attention_mask.dtype,
                    device=attention_mask.device,
                )
            return input_ids, attention_mask, past_key_values, None, labels

        if type(images) is list or images.ndim == 5:
            if type(images) is list:
                images = [x.unsqueeze(0) if x.ndim == 3 else x for x in images]
            concat_images = torch.cat([image for image in images], dim=0)
            image_features = self.encode_images(concat_images)
            split_sizes = [image.shape[0] for image in images]
            image_features = torch.split(image_features, split_sizes, dim=0)
            mm_patch_merge_type = getattr(self.config, "mm_patch_merge_type", "flat")
            if mm_patch_merge_type == "flat":
                image_features = [x.flatten(0, 1) for x in image_features]
            else:
                # STAND-IN: HR's `spatial` / `spatial_unpad` (any-res) merge is not mirrored.
                raise NotImplementedError(
                    f"mm_patch_merge_type {mm_patch_merge_type!r}: the stand-in is flat"
                )
        else:
            image_features = self.encode_images(images)

        new_input_embeds = []
        new_labels = [] if labels is not None else None
        cur_image_idx = 0
        for batch_idx, cur_input_ids in enumerate(input_ids):
            if (cur_input_ids == IMAGE_TOKEN_INDEX).sum() == 0:
                # multimodal LLM, but the current sample is not multimodal
                # FIXME: this is a hacky fix, for deepspeed zero3 to work
                half_len = cur_input_ids.shape[0] // 2
                cur_image_features = image_features[cur_image_idx]
                cur_input_embeds_1 = self.get_model().embed_tokens(cur_input_ids[:half_len])
                cur_input_embeds_2 = self.get_model().embed_tokens(cur_input_ids[half_len:])
                cur_input_embeds = torch.cat(
                    [cur_input_embeds_1, cur_image_features[0:0], cur_input_embeds_2], dim=0
                )
                new_input_embeds.append(cur_input_embeds)
                if labels is not None:
                    new_labels.append(labels[batch_idx])
                cur_image_idx += 1
                continue
            image_token_indices = torch.where(cur_input_ids == IMAGE_TOKEN_INDEX)[0]
            cur_new_input_embeds = []
            if labels is not None:
                cur_labels = labels[batch_idx]
                cur_new_labels = []
                assert cur_labels.shape == cur_input_ids.shape
            while image_token_indices.numel() > 0:
                cur_image_features = image_features[cur_image_idx]
                image_token_start = image_token_indices[0]
                if getattr(self.config, "tune_mm_mlp_adapter", False) and getattr(
                    self.config, "mm_use_im_start_end", False
                ):
                    cur_new_input_embeds.append(
                        self.get_model().embed_tokens(cur_input_ids[: image_token_start - 1]).detach()
                    )
                    cur_new_input_embeds.append(
                        self.get_model().embed_tokens(
                            cur_input_ids[image_token_start - 1 : image_token_start]
                        )
                    )
                    cur_new_input_embeds.append(cur_image_features)
                    cur_new_input_embeds.append(
                        self.get_model().embed_tokens(
                            cur_input_ids[image_token_start + 1 : image_token_start + 2]
                        )
                    )
                    if labels is not None:
                        cur_new_labels.append(cur_labels[:image_token_start])
                        cur_new_labels.append(
                            torch.full(
                                (cur_image_features.shape[0],),
                                IGNORE_INDEX,
                                device=labels.device,
                                dtype=labels.dtype,
                            )
                        )
                        cur_new_labels.append(cur_labels[image_token_start : image_token_start + 1])
                        cur_labels = cur_labels[image_token_start + 2 :]
                else:
                    cur_new_input_embeds.append(
                        self.get_model().embed_tokens(cur_input_ids[:image_token_start])
                    )
                    cur_new_input_embeds.append(cur_image_features)
                    if labels is not None:
                        cur_new_labels.append(cur_labels[:image_token_start])
                        cur_new_labels.append(
                            torch.full(
                                (cur_image_features.shape[0],),
                                IGNORE_INDEX,
                                device=labels.device,
                                dtype=labels.dtype,
                            )
                        )
                        cur_labels = cur_labels[image_token_start + 1 :]
                cur_image_idx += 1
                if getattr(self.config, "tune_mm_mlp_adapter", False) and getattr(
                    self.config, "mm_use_im_start_end", False
                ):
                    cur_input_ids = cur_input_ids[image_token_start + 2 :]
                else:
                    cur_input_ids = cur_input_ids[image_token_start + 1 :]
                image_token_indices = torch.where(cur_input_ids == IMAGE_TOKEN_INDEX)[0]
            if cur_input_ids.numel() > 0:
                if getattr(self.config, "tune_mm_mlp_adapter", False) and getattr(
                    self.config, "mm_use_im_start_end", False
                ):
                    cur_new_input_embeds.append(self.get_model().embed_tokens(cur_input_ids).detach())
                else:
                    cur_new_input_embeds.append(self.get_model().embed_tokens(cur_input_ids))
                if labels is not None:
                    cur_new_labels.append(cur_labels)
            cur_new_input_embeds = [x.to(device=self.device) for x in cur_new_input_embeds]
            cur_new_input_embeds = torch.cat(cur_new_input_embeds, dim=0)
            new_input_embeds.append(cur_new_input_embeds)
            if labels is not None:
                cur_new_labels = torch.cat(cur_new_labels, dim=0)
                new_labels.append(cur_new_labels)

        if any(x.shape != new_input_embeds[0].shape for x in new_input_embeds):
            max_len = max(x.shape[0] for x in new_input_embeds)

            new_input_embeds_align = []
            for cur_new_embed in new_input_embeds:
                cur_new_embed = torch.cat(
                    (
                        cur_new_embed,
                        torch.zeros(
                            (max_len - cur_new_embed.shape[0], cur_new_embed.shape[1]),
                            dtype=cur_new_embed.dtype,
                            device=cur_new_embed.device,
                        ),
                    ),
                    dim=0,
                )
                new_input_embeds_align.append(cur_new_embed)
            new_input_embeds = torch.stack(new_input_embeds_align, dim=0)

            if labels is not None:
                new_labels_align = []
                _new_labels = new_labels
                for cur_new_label in new_labels:
                    cur_new_label = torch.cat(
                        (
                            cur_new_label,
                            torch.full(
                                (max_len - cur_new_label.shape[0],),
                                IGNORE_INDEX,
                                dtype=cur_new_label.dtype,
                                device=cur_new_label.device,
                            ),
                        ),
                        dim=0,
                    )
                    new_labels_align.append(cur_new_label)
                new_labels = torch.stack(new_labels_align, dim=0)

            if attention_mask is not None:
                new_attention_mask = []
                # HR: with labels=None, `_new_labels` is unbound here (UnboundLocalError) - kept as is.
                for cur_attention_mask, cur_new_labels, cur_new_labels_align in zip(
                    attention_mask, _new_labels, new_labels
                ):
                    new_attn_mask_pad_left = torch.full(
                        (cur_new_labels.shape[0] - labels.shape[1],),
                        True,
                        dtype=attention_mask.dtype,
                        device=attention_mask.device,
                    )
                    new_attn_mask_pad_right = torch.full(
                        (cur_new_labels_align.shape[0] - cur_new_labels.shape[0],),
                        False,
                        dtype=attention_mask.dtype,
                        device=attention_mask.device,
                    )
                    cur_new_attention_mask = torch.cat(
                        (new_attn_mask_pad_left, cur_attention_mask, new_attn_mask_pad_right), dim=0
                    )
                    new_attention_mask.append(cur_new_attention_mask)
                attention_mask = torch.stack(new_attention_mask, dim=0)
                assert attention_mask.shape == new_labels.shape
        else:
            new_input_embeds = torch.stack(new_input_embeds, dim=0)
            if labels is not None:
                new_labels = torch.stack(new_labels, dim=0)

            if attention_mask is not None:
                new_attn_mask_pad_left = torch.full(
                    (attention_mask.shape[0], new_input_embeds.shape[1] - input_ids.shape[1]),
                    True,
                    dtype=attention_mask.dtype,
                    device=attention_mask.device,
                )
                attention_mask = torch.cat((new_attn_mask_pad_left, attention_mask), dim=1)
                assert attention_mask.shape == new_input_embeds.shape[:2]

        return None, attention_mask, past_key_values, new_input_embeds, new_labels

    # STAND-IN: initialize_vision_tokenizer (training-time tokenizer setup) left out.


# --------------------------------------------------------------------------------------------------------------
# llava_hr/model/language_model/llava_llama.py
# --------------------------------------------------------------------------------------------------------------
class LlavaConfig(LlamaConfig):
    model_type = "llava"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig

    def __init__(self, config: LlamaConfig):
        super(LlavaLlamaModel, self).__init__(config)


class LlavaLlamaForCausalLM(LlamaForCausalLM, LlavaMetaForCausalLM):
    config_class = LlavaConfig

    def __init__(self, config):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = LlavaLlamaModel(config)

        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        # Initialize weights and apply final processing
        self.post_init()

    def get_model(self):
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor = None,
        attention_mask: Optional[torch.Tensor] = None,  # noqa: UP045
        past_key_values: Optional[List[torch.FloatTensor]] = None,  # noqa: UP006, UP045
        inputs_embeds: Optional[torch.FloatTensor] = None,  # noqa: UP045
        labels: Optional[torch.LongTensor] = None,  # noqa: UP045
        use_cache: Optional[bool] = None,  # noqa: UP045
        output_attentions: Optional[bool] = None,  # noqa: UP045
        output_hidden_states: Optional[bool] = None,  # noqa: UP045
        images: Optional[torch.FloatTensor] = None,  # noqa: UP045
        image_sizes: Optional[List[List[int]]] = None,  # noqa: UP006, UP045
        return_dict: Optional[bool] = None,  # noqa: UP045
    ) -> Union[Tuple, CausalLMOutputWithPast]:  # noqa: UP006, UP007
        output_attentions = (
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        # TF5: `self.config.use_return_dict` is deprecated (a warning at every call); `return_dict` is its value.
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        input_ids, attention_mask, past_key_values, inputs_embeds, labels = (
            self.prepare_inputs_labels_for_multimodal(
                input_ids, attention_mask, past_key_values, labels, images, image_sizes
            )
        )

        # decoder outputs consists of (dec_features, layer_state, dec_hidden, dec_attn)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )

        hidden_states = outputs[0]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            # Shift so that tokens < n predict n
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            # Flatten the tokens
            loss_fct = CrossEntropyLoss()
            shift_logits = shift_logits.view(-1, self.config.vocab_size)
            shift_labels = shift_labels.view(-1)
            # Enable model/pipeline parallelism
            shift_labels = shift_labels.to(shift_logits.device)
            loss = loss_fct(shift_logits, shift_labels)

        if not return_dict:
            output = (logits,) + outputs[1:]
            return (loss,) + output if loss is not None else output

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, **kwargs
    ):
        # TF5: transformers 5's generate drops an all-ones attention_mask (no padding) before the loop; 4.3x
        # always passed one (ones over the ids when none was given), and HR's splice reads its batch size and
        # dtype at decode steps. Restore what 4.3x passed: ones over every id so far.
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        # TF5: HR tests `if past_key_values:` - None at the first step under transformers 4.3x. Transformers 5
        # hands a DynamicCache to the first step already (empty, but truthy: its layers exist), so the test is
        # made on what it meant, a cache holding something.
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            input_ids = input_ids[:, -1:]

        # if `inputs_embeds` are passed, we only want to use them in the 1st generation step
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}

        model_inputs.update(
            {
                "past_key_values": past_key_values,
                "use_cache": kwargs.get("use_cache"),
                "attention_mask": attention_mask,
                "images": kwargs.get("images", None),
                "image_sizes": kwargs.get("image_sizes", None),
            }
        )
        return model_inputs


# TF5: HR registers `AutoConfig.register("llava", LlavaConfig)` and the causal LM for it; transformers 5 has its
# own "llava" model type, so the registration would raise. The stand-in is built directly (tiny_llava_hr).


# --------------------------------------------------------------------------------------------------------------
# builders (stand-in for llava_hr/model/builder.py::load_pretrained_model and the eval scripts' preprocessing)
# --------------------------------------------------------------------------------------------------------------
def tiny_llava_hr(
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
) -> LlavaLlamaForCausalLM:
    """A random tiny LLaVA-HR (LLaMA decoder, HR's CLIPVisionTower, mlp2x_gelu projector, flat merge), eval mode.

    One image becomes ``(image_size // patch_size) ** 2`` feature tokens (layer -2, CLS dropped)."""
    torch.manual_seed(seed)
    clip_cfg = {
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": 3,
    }
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
        # the fields HR's train.py / initialize_vision_modules write into config.json
        mm_vision_tower=VISION_TOWER_NAME,
        is_multipath_encoder=False,  # STAND-IN: the released HR checkpoints use the multi-path encoder
        freeze_vision=True,
        input_image_size=None,
        mm_hidden_size=vision_hidden,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_patch_merge_type="flat",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        tune_mm_mlp_adapter=False,
        image_aspect_ratio="pad",
        use_mm_proj=True,
        # STAND-IN: the tower's config travels inside the model config (the real tower reads it from disk)
        clip_vision_config=clip_cfg,
    )
    config._attn_implementation = attn_implementation
    model = LlavaLlamaForCausalLM(config)
    # as load_pretrained_model: load the delay-loaded tower
    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model()
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


def tiny_llava_hr_inputs(
    model: LlavaLlamaForCausalLM,
    prompt_lengths: list[tuple[int, int]],
    images_per_sample: list[int],
    padding_side: str = "right",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A padded batch in HR's format: sample i is BOS, `prefix` random tokens, `images_per_sample[i]`
    placeholders (one per image, one random text token between two), `suffix` random tokens, for
    `prompt_lengths[i] == (prefix, suffix)`; `images` (n_images, 3, S, S) in sample order, a dummy image for a
    text-only sample (HR's splice consumes one). Right padding is HR's (its collator's); its splice puts the
    mask's extra Trues on the left, so left-padded rows are mis-masked by HR itself."""
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
    size = model.get_vision_tower().config.image_size
    count = sum(max(n, 1) for n in images_per_sample)
    images = torch.randn(count, 3, size, size, generator=generator).to(model.dtype)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "images": images}
