"""A faithful tiny stand-in for Mini-Gemini (MGM, Li et al. 2024), built from transformers parts.

Mini-Gemini (github.com/dvlab-research/MGM, formerly MiniGemini) is not on PyPI.  This module mirrors its
class structure, attribute names and method signatures so that code written against these classes works on
the real MGM classes by structure.  Real-code references (repository dvlab-research/MGM):

* ``mgm/constants.py``                               -> ``IGNORE_INDEX``, ``IMAGE_TOKEN_INDEX`` ...
* ``mgm/model/multimodal_encoder/clip_encoder.py``    -> :class:`CLIPVisionTower` (low resolution, ViT)
* ``mgm/model/multimodal_encoder/openclip_encoder.py``-> :class:`OpenCLIPVisionTower` (high resolution ConvNeXt)
* ``mgm/model/multimodal_encoder/builder.py``         -> :func:`build_vision_tower`, :func:`build_vision_tower_aux`
* ``mgm/model/multimodal_projector/builder.py``       -> :func:`build_vision_projector` (LLaVA's builder)
* ``mgm/model/mgm_arch.py``                           -> :class:`MGMMetaModel`, :class:`MGMMetaForCausalLM`
* ``mgm/model/language_model/mgm_llama.py``           -> :class:`MGMConfig`, :class:`MGMLlamaModel`,
  :class:`MGMLlamaForCausalLM`
* ``mgm/model/builder.py`` (``load_pretrained_model``) and ``mgm/eval/model_vqa.py`` (image preparation)
  -> :func:`tiny_minigemini`, :func:`tiny_minigemini_inputs`

Every deviation from the real code is marked with ``# STAND-IN:`` (no checkpoints / no downloads) or
``# TF5:`` (minimal adaptation so that the code runs under transformers 5.x).

Spliced sequence layout (``prepare_inputs_labels_for_multimodal``), per sample: padding is removed with the
attention mask, every ``IMAGE_TOKEN_INDEX`` (-200) placeholder is replaced *in place* by that image's features
(``N = (image_size // patch_size) ** 2`` tokens, or ``5 * N`` in HD mode ordered
``[global, crop(0,0), crop(0,1), crop(1,0), crop(1,1)]``, each crop row-major), the text around it keeps its
order, then the batch is re-padded with zero embeddings on the right (``config.tokenizer_padding_side``,
default ``"right"``), ``position_ids`` restart at 0 for every sample and image positions get ``IGNORE_INDEX``
labels.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)

# --------------------------------------------------------------------------------------------------------------
# mgm/constants.py
# --------------------------------------------------------------------------------------------------------------
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"

# Names as they appear in the real MGM configs; the stand-in only uses them to choose the tower class.
_CLIP_NAME = "model_zoo/OpenAI/clip-vit-large-patch14-336"
_OPENCLIP_NAME = "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"


# --------------------------------------------------------------------------------------------------------------
# mgm/model/multimodal_encoder/clip_encoder.py
# --------------------------------------------------------------------------------------------------------------
class CLIPVisionTower(nn.Module):
    """Low-resolution encoder: a transformers ``CLIPVisionModel`` held as ``self.vision_tower``."""

    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        self.is_optimize = getattr(args, "optimize_vision_tower", False)
        # STAND-IN: the CLIP config comes from the MGM config (``clip_vision_config`` dict) instead of
        # ``CLIPVisionConfig.from_pretrained(vision_tower)``.
        self._vision_cfg_dict = dict(args.clip_vision_config)
        attn = getattr(args, "_attn_implementation", None)
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model(attn_implementation=attn)
        else:
            self.cfg_only = CLIPVisionConfig(**self._vision_cfg_dict)

    def load_model(self, attn_implementation=None):
        # STAND-IN: random weights built from the config; the real one loads CLIPVisionModel.from_pretrained and a
        # VideoFramesProcessor.  No image processor can be built here (it needs torchvision + PIL), so it is None;
        # tiny_minigemini_inputs does the equivalent preprocessing on tensors.
        self.image_processor = None
        cfg = CLIPVisionConfig(**self._vision_cfg_dict)
        if attn_implementation is not None:
            cfg._attn_implementation = attn_implementation
        self.vision_tower = CLIPVisionModel(cfg)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def feature_select(self, image_forward_outs):
        image_features = image_forward_outs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            image_features = image_features[:, 1:]
        elif self.select_feature == "cls_patch":
            image_features = image_features
        else:
            raise ValueError(f"Unexpected select feature: {self.select_feature}")
        return image_features

    def image_forward(self, images):
        if type(images) is list:
            image_features = []
            for image in images:
                image_forward_out = self.vision_tower(
                    image.to(device=self.device, dtype=self.dtype).unsqueeze(0), output_hidden_states=True
                )
                image_features.append(self.feature_select(image_forward_out).to(image.dtype))
        else:
            image_forward_outs = self.vision_tower(
                images.to(device=self.device, dtype=self.dtype), output_hidden_states=True
            )
            image_features = self.feature_select(image_forward_outs).to(images.dtype)
        return image_features

    def forward(self, images):
        if not self.is_optimize:
            with torch.no_grad():
                image_features = self.image_forward(images)
        else:
            image_features = self.image_forward(images)
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
    def config(self):
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self):
        return self.config.hidden_size

    @property
    def num_patches(self):
        return (self.config.image_size // self.config.patch_size) ** 2


# --------------------------------------------------------------------------------------------------------------
# mgm/model/multimodal_encoder/openclip_encoder.py
# --------------------------------------------------------------------------------------------------------------
class OpenCLIPVisionTower(nn.Module):
    """High-resolution encoder: a ConvNeXt decomposed into ``vision_stem`` and ``vision_stages``.

    The real tower is OpenCLIP's ConvNeXt-L (timm trunk, ``norm_pre``/``head`` removed); here the stem and the four
    stages of a transformers ``ConvNextModel`` play that role (same layout: 4x4/4 patchify conv + LayerNorm, then
    stage 0 at stride 4 and stages 1-3 each downsampling by 2).  Every stage output is bilinearly upsampled to the
    stage-0 resolution and all are concatenated on channels: ``hidden_size = sum(model_channel)``.
    """

    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        # STAND-IN: the real one reads ``open_clip_config.json`` from the tower folder.
        self.vision_config = dict(args.convnext_config)
        self.is_optimize = getattr(args, "optimize_vision_tower_aux", False)
        self.is_droppath = getattr(args, "drop_path", True)
        # STAND-IN: the real one sets ``model_channel`` in load_model from the tower name (e.g. convnext_large_d_320 ->
        # [192, 384, 768, 1536]); here it comes from the ConvNeXt config so that hidden_size works before loading.
        self.model_channel = list(self.vision_config["hidden_sizes"])
        if not delay_load:
            self.load_model()

    def load_model(self):
        # STAND-IN: random ConvNeXt from a config instead of open_clip + checkpoint.
        convnext = ConvNextModel(ConvNextConfig(**self.vision_config))
        self.model_type = "convnext_standin"
        self.is_loaded = True
        # decompose stem and stages blocks in vision tower (the final layernorm / pooler are dropped, as MGM drops
        # ``trunk.norm_pre`` and ``head``)
        self.vision_stem = convnext.embeddings
        self.vision_stages = convnext.encoder.stages
        self.vision_stem.requires_grad_(False)
        self.vision_stages.requires_grad_(False)

    def forward(self, images):
        if type(images) is list:
            image_features = []
            for image in images:
                image_features.append(
                    self.backbone(image.to(device=self.device, dtype=self.dtype).unsqueeze(0))
                )
        else:
            image_features = self.backbone(images.to(device=self.device, dtype=self.dtype))
        return image_features

    def backbone(self, images):
        if not self.is_optimize:
            with torch.no_grad():
                results = self.basic_forward(images)
        else:
            results = self.basic_forward(images)

        target_size = (results["stage_0"].shape[-2], results["stage_0"].shape[-1])
        result_cat = []
        for _stage in results:
            if _stage == "stage_0":
                result_cat.append(results[_stage].contiguous())
            else:
                result_cat.append(
                    F.interpolate(
                        results[_stage].float().contiguous(),
                        size=target_size,
                        mode="bilinear",
                        align_corners=False,
                    ).to(dtype=results[_stage].dtype)
                )
        result_cat = torch.cat(result_cat, dim=1)
        return result_cat.contiguous()

    def basic_forward(self, images):
        results = {}
        x = self.vision_stem(images)
        for _idx in range(len(self.vision_stages)):
            x = self.vision_stages[_idx](x)
            results[f"stage_{_idx}"] = x
        return results

    @property
    def dummy_feature(self):
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self):
        # STAND-IN: the real one reads ``vision_stem[0].weight`` (timm stem is a Sequential).
        return self.vision_stem.patch_embeddings.weight.dtype

    @property
    def device(self):
        return self.vision_stem.patch_embeddings.weight.device

    @property
    def config(self):
        return self.vision_config

    @property
    def hidden_size(self):
        return sum(self.model_channel)


# --------------------------------------------------------------------------------------------------------------
# mgm/model/multimodal_encoder/builder.py
# --------------------------------------------------------------------------------------------------------------
def build_vision_tower(vision_tower_cfg, **kwargs):
    vision_tower = getattr(
        vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None)
    )
    # STAND-IN: no ``os.path.exists`` check (nothing is on disk); EVA towers are not provided.
    if "openai" in vision_tower.lower() or "ShareGPT4V" in vision_tower:
        return CLIPVisionTower(vision_tower, args=vision_tower_cfg, **kwargs)
    raise ValueError(f"Unknown vision tower: {vision_tower}")


def build_vision_tower_aux(vision_tower_cfg, **kwargs):
    vision_tower_aux = getattr(
        vision_tower_cfg, "mm_vision_tower_aux", getattr(vision_tower_cfg, "vision_tower_aux", None)
    )
    if "openclip" in vision_tower_aux.lower():
        return OpenCLIPVisionTower(vision_tower_aux, args=vision_tower_cfg, **kwargs)
    if "openai" in vision_tower_aux.lower():
        return CLIPVisionTower(vision_tower_aux, args=vision_tower_cfg, **kwargs)
    raise ValueError(f"Unknown vision tower: {vision_tower_aux}")


# --------------------------------------------------------------------------------------------------------------
# mgm/model/multimodal_projector/builder.py (unchanged from LLaVA)
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
# mgm/model/mgm_arch.py
# --------------------------------------------------------------------------------------------------------------
class MGMMetaModel:
    def __init__(self, config):
        super().__init__(config)

        if hasattr(config, "mm_vision_tower"):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)

        if hasattr(config, "mm_vision_tower_aux"):
            self.vision_tower_aux = build_vision_tower_aux(config, delay_load=True)

    def get_vision_tower(self):
        vision_tower = getattr(self, "vision_tower", None)
        if type(vision_tower) is list:
            vision_tower = vision_tower[0]
        return vision_tower

    def get_vision_tower_aux(self):
        vision_tower_aux = getattr(self, "vision_tower_aux", None)
        if type(vision_tower_aux) is list:
            vision_tower_aux = vision_tower_aux[0]
        return vision_tower_aux

    # STAND-IN: ``initialize_vision_modules`` (training-time construction / adapter loading) is not provided.

    def initialize_uni_modules(self, model_args, for_eval=False):
        """Create the patch-info-mining projections (query from low-res, key/value from high-res features)."""
        self.config.image_size_aux = getattr(model_args, "image_size_aux", 320)
        self.config.optimize_vision_tower = getattr(model_args, "optimize_vision_tower", False)
        self.config.optimize_vision_tower_aux = getattr(model_args, "optimize_vision_tower_aux", False)

        self.vlm_uni_query_projector = nn.Sequential(
            nn.LayerNorm(self.config.mm_hidden_size),
            nn.Linear(self.config.mm_hidden_size, self.config.mm_hidden_size),
        )
        self.vlm_uni_aux_projector = nn.Sequential(
            nn.LayerNorm(self.config.mm_hidden_size_aux),
            nn.Linear(self.config.mm_hidden_size_aux, self.config.mm_hidden_size),
        )
        self.vlm_uni_val_projector = nn.Sequential(
            nn.LayerNorm(self.config.mm_hidden_size_aux),
            nn.Linear(self.config.mm_hidden_size_aux, self.config.mm_hidden_size),
        )
        # STAND-IN: the real method now loads 'vlm_uni*' (and optionally vision tower) weights from the checkpoint's
        # safetensors shards; here the modules keep their random init and are moved to the projector's
        # device / dtype as the real ``get_w`` does after loading.
        weight = self.mm_projector[0].weight if isinstance(self.mm_projector, nn.Sequential) else None
        if weight is not None:
            for name in ("vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector"):
                getattr(self, name).to(device=weight.device, dtype=weight.dtype)


class MGMMetaForCausalLM(ABC):
    @abstractmethod
    def get_model(self):
        pass

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def get_vision_tower_aux(self):
        return self.get_model().get_vision_tower_aux()

    def encode_images(self, images, images_aux=None, is_video=False):
        """Low-res tokens (+ patch info mining with the high-res map) -> mm_projector.

        HD (``config.image_grid == 2`` and ``config.image_global``): ``images`` is ``(B, 5, C, H, W)`` as
        ``[crop(0,0), crop(0,1), crop(1,0), crop(1,1), global]``; output per image is ``[global, crops...]``.
        """
        image_grid = getattr(self.config, "image_grid", 1)
        image_global = getattr(self.config, "image_global", False)
        if image_grid > 1:
            batch_size = images.shape[0]
            if image_global:
                global_images = images[:, -1:].flatten(0, 1).contiguous()
                grid_images = images[:, :-1].flatten(0, 1).contiguous()
                images = torch.cat([grid_images, global_images], dim=0)
            else:
                images = images.flatten(0, 1).contiguous()

        image_features = self.get_model().get_vision_tower()(images)

        if image_global:
            image_feat_global = image_features[-len(global_images) :]
            image_features = image_features[: len(grid_images)]

        if images_aux is not None:
            image_aux_features_raw = (
                self.get_model()
                .get_vision_tower_aux()(images_aux)
                .to(dtype=image_features.dtype, device=image_features.device)
            )

            if image_global:
                image_aux_features_global = F.interpolate(
                    image_aux_features_raw.float(),
                    scale_factor=1 / image_grid,
                    mode="bilinear",
                    align_corners=False,
                ).to(dtype=image_aux_features_raw.dtype)
                image_feat_global, image_aux_feat_global = self.unified_resampler(
                    image_feat_global, image_aux_features_global
                )

            if image_grid > 1:
                image_aux_features_raw = image_aux_features_raw.reshape(
                    *image_aux_features_raw.shape[:2],
                    image_grid,
                    image_aux_features_raw.shape[-2] // image_grid,
                    image_grid,
                    image_aux_features_raw.shape[-1] // image_grid,
                )
                image_aux_features_raw = (
                    image_aux_features_raw.permute(0, 2, 4, 1, 3, 5).flatten(1, 2).flatten(0, 1).contiguous()
                )
            image_features, image_aux_features = self.unified_resampler(
                image_features, image_aux_features_raw
            )

            if image_grid > 1:
                image_features = image_features.reshape(batch_size, image_grid**2, *image_features.shape[1:])
                image_features = image_features.flatten(1, 2).contiguous()
                image_aux_features = image_aux_features.reshape(
                    batch_size, image_grid**2, *image_aux_features.shape[1:]
                )
                image_aux_features = image_aux_features.flatten(1, 2).contiguous()

            # add global features, [global, local]
            if image_global:
                image_features = torch.cat([image_feat_global, image_features], dim=1)
                image_aux_features = torch.cat([image_aux_feat_global, image_aux_features], dim=1)

            # token generation (residual add of the mined high-res detail)
            image_features = image_features + image_aux_features

        # process image features after token generation
        image_features = self.get_model().mm_projector(image_features)
        return image_features

    def unified_resampler(self, images, images_aux):
        """Patch info mining: each low-res token attends over the high-res window under it.

        ``images``: ``(B, N, C)`` low-res tokens (square grid, N = n*n); ``images_aux``: ``(B, C_aux, H, W)``.
        Returns ``(images, embed_feat)`` with ``embed_feat`` ``(B, N, C)``; the caller adds them.
        """
        # patchwise with square images
        patch_num = int(images.shape[1] ** 0.5)
        patch_size = images_aux.shape[-1] // patch_num
        # within patch attention
        images_aux = images_aux.permute(0, 2, 3, 1)
        images_aux = images_aux.reshape(
            len(images_aux), patch_num, patch_size, patch_num, patch_size, images_aux.shape[-1]
        )
        images_aux = images_aux.permute(0, 1, 3, 2, 4, 5)
        images_aux = images_aux.reshape(
            len(images_aux), patch_num**2, patch_size**2, images_aux.shape[-1]
        ).contiguous()

        # token attention
        embed_query = self.get_model().vlm_uni_query_projector(images)
        embed_aux = self.get_model().vlm_uni_aux_projector(images_aux)
        embed_value = self.get_model().vlm_uni_val_projector(images_aux)
        embed_att = embed_query[:, :, None] @ (embed_aux.transpose(-1, -2) / (embed_aux.shape[-1] ** 0.5))
        embed_att = embed_att.nan_to_num()
        embed_feat = (embed_att.softmax(-1) @ embed_value).mean(2)
        return images, embed_feat

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids,
        position_ids,
        attention_mask,
        past_key_values,
        labels,
        images=None,
        images_aux=None,
    ):
        vision_tower = self.get_vision_tower()
        if vision_tower is None or images is None or input_ids.shape[1] == 1:
            if (
                past_key_values is not None
                and vision_tower is not None
                and images is not None
                and input_ids.shape[1] == 1
            ):
                # MGM/LLaVA decode-time handling when images are passed at every step: extend the (un-spliced)
                # mask with ones up to cache length + 1 and take the position as (number of attended) - 1.
                # TF5: the real code reads ``past_key_values[-1][-1].shape[-2]`` (legacy tuple cache); a transformers
                # 5 ``Cache`` is not indexable that way, so its ``get_seq_length()`` gives the same number.
                if hasattr(past_key_values, "get_seq_length"):
                    target_shape = past_key_values.get_seq_length() + 1
                else:
                    target_shape = past_key_values[-1][-1].shape[-2] + 1
                # TF5: transformers 5 ``generate`` drops an all-ones attention mask (4.x always passed it); treat a
                # missing mask as an empty one so that the extension below yields all ones.
                if attention_mask is None:
                    attention_mask = torch.ones(
                        (input_ids.shape[0], 0), dtype=torch.long, device=input_ids.device
                    )
                attention_mask = torch.cat(
                    (
                        attention_mask,
                        torch.ones(
                            (attention_mask.shape[0], target_shape - attention_mask.shape[1]),
                            dtype=attention_mask.dtype,
                            device=attention_mask.device,
                        ),
                    ),
                    dim=1,
                )
                position_ids = torch.sum(attention_mask, dim=1).unsqueeze(-1) - 1
            return input_ids, position_ids, attention_mask, past_key_values, None, labels

        if isinstance(images, list):
            images = torch.stack(images, dim=0)
        if isinstance(images_aux, list):
            images_aux = torch.stack(images_aux, dim=0)

        image_features = self.encode_images(images, images_aux)

        # TODO (as in MGM): image start / end is not implemented here to support pretraining.
        if getattr(self.config, "tune_mm_mlp_adapter", False) and getattr(
            self.config, "mm_use_im_start_end", False
        ):
            raise NotImplementedError

        # dummy tensors where they do not exist
        _labels = labels
        _position_ids = position_ids
        _attention_mask = attention_mask
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            attention_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = torch.arange(0, input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)

        # remove the padding using attention_mask
        input_ids = [
            cur_input_ids[cur_attention_mask]
            for cur_input_ids, cur_attention_mask in zip(input_ids, attention_mask, strict=True)
        ]
        labels = [
            cur_labels[cur_attention_mask]
            for cur_labels, cur_attention_mask in zip(labels, attention_mask, strict=True)
        ]

        new_input_embeds = []
        new_labels = []
        cur_image_idx = 0
        for batch_idx, cur_input_ids in enumerate(input_ids):
            num_images = (cur_input_ids == IMAGE_TOKEN_INDEX).sum()
            if num_images == 0:
                # as MGM: a text-only sample still consumes one (dummy) image, contributing 0 tokens
                cur_image_features = image_features[cur_image_idx]
                cur_input_embeds_1 = self.get_model().embed_tokens(cur_input_ids)
                cur_input_embeds = torch.cat([cur_input_embeds_1, cur_image_features[0:0]], dim=0)
                new_input_embeds.append(cur_input_embeds)
                new_labels.append(labels[batch_idx])
                cur_image_idx += 1
                continue

            image_token_indices = (
                [-1] + torch.where(cur_input_ids == IMAGE_TOKEN_INDEX)[0].tolist() + [cur_input_ids.shape[0]]
            )
            cur_input_ids_noim = []
            cur_labels = labels[batch_idx]
            cur_labels_noim = []
            for i in range(len(image_token_indices) - 1):
                cur_input_ids_noim.append(
                    cur_input_ids[image_token_indices[i] + 1 : image_token_indices[i + 1]]
                )
                cur_labels_noim.append(cur_labels[image_token_indices[i] + 1 : image_token_indices[i + 1]])
            split_sizes = [x.shape[0] for x in cur_labels_noim]
            cur_input_embeds = self.get_model().embed_tokens(torch.cat(cur_input_ids_noim))
            cur_input_embeds_no_im = torch.split(cur_input_embeds, split_sizes, dim=0)
            cur_new_input_embeds = []
            cur_new_labels = []

            max_pos_id = 0
            for i in range(num_images + 1):
                cur_new_input_embeds.append(cur_input_embeds_no_im[i])
                cur_new_labels.append(cur_labels_noim[i])
                max_pos_id += cur_input_embeds_no_im[i].shape[0]
                if i < num_images:
                    cur_image_features = image_features[cur_image_idx]
                    cur_image_idx += 1
                    cur_new_input_embeds.append(cur_image_features)
                    cur_new_labels.append(
                        torch.full(
                            (cur_image_features.shape[0],),
                            IGNORE_INDEX,
                            device=cur_labels.device,
                            dtype=cur_labels.dtype,
                        )
                    )
                    max_pos_id += cur_image_features.shape[0]

            cur_new_input_embeds = [x.to(device=cur_input_embeds.device) for x in cur_new_input_embeds]
            cur_new_input_embeds = torch.cat(cur_new_input_embeds)
            cur_new_labels = torch.cat(cur_new_labels)

            new_input_embeds.append(cur_new_input_embeds)
            new_labels.append(cur_new_labels)

        # Truncate sequences to max length as image embeddings can make the sequence longer
        tokenizer_model_max_length = getattr(self.config, "tokenizer_model_max_length", None)
        if tokenizer_model_max_length is not None:
            new_input_embeds = [x[:tokenizer_model_max_length] for x in new_input_embeds]
            new_labels = [x[:tokenizer_model_max_length] for x in new_labels]

        # Combine them
        max_len = max(x.shape[0] for x in new_input_embeds)
        batch_size = len(new_input_embeds)

        new_input_embeds_padded = []
        new_labels_padded = torch.full(
            (batch_size, max_len), IGNORE_INDEX, dtype=new_labels[0].dtype, device=new_labels[0].device
        )
        attention_mask = torch.zeros(
            (batch_size, max_len), dtype=attention_mask.dtype, device=attention_mask.device
        )
        position_ids = torch.zeros(
            (batch_size, max_len), dtype=position_ids.dtype, device=position_ids.device
        )

        for i, (cur_new_embed, cur_new_labels) in enumerate(zip(new_input_embeds, new_labels, strict=True)):
            cur_len = cur_new_embed.shape[0]
            pad = torch.zeros(
                (max_len - cur_len, cur_new_embed.shape[1]),
                dtype=cur_new_embed.dtype,
                device=cur_new_embed.device,
            )
            if getattr(self.config, "tokenizer_padding_side", "right") == "left":
                new_input_embeds_padded.append(torch.cat((pad, cur_new_embed), dim=0))
                if cur_len > 0:
                    new_labels_padded[i, -cur_len:] = cur_new_labels
                    attention_mask[i, -cur_len:] = True
                    position_ids[i, -cur_len:] = torch.arange(
                        0, cur_len, dtype=position_ids.dtype, device=position_ids.device
                    )
            else:
                new_input_embeds_padded.append(torch.cat((cur_new_embed, pad), dim=0))
                if cur_len > 0:
                    new_labels_padded[i, :cur_len] = cur_new_labels
                    attention_mask[i, :cur_len] = True
                    position_ids[i, :cur_len] = torch.arange(
                        0, cur_len, dtype=position_ids.dtype, device=position_ids.device
                    )

        new_input_embeds = torch.stack(new_input_embeds_padded, dim=0)

        new_labels = None if _labels is None else new_labels_padded
        attention_mask = None if _attention_mask is None else attention_mask.to(dtype=_attention_mask.dtype)
        if _position_ids is None:
            position_ids = None

        return None, position_ids, attention_mask, past_key_values, new_input_embeds, new_labels


# --------------------------------------------------------------------------------------------------------------
# mgm/model/language_model/mgm_llama.py
# --------------------------------------------------------------------------------------------------------------
class MGMConfig(LlamaConfig):
    model_type = "mgm"


class MGMLlamaModel(MGMMetaModel, LlamaModel):
    config_class = MGMConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)


class MGMLlamaForCausalLM(LlamaForCausalLM, MGMMetaForCausalLM):
    config_class = MGMConfig

    def __init__(self, config):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = MGMLlamaModel(config)
        self.pretraining_tp = getattr(config, "pretraining_tp", 1)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

        # Initialize weights and apply final processing
        self.post_init()

    def get_model(self):
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        images: torch.FloatTensor | None = None,
        images_aux: torch.FloatTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        if inputs_embeds is None:
            (
                input_ids,
                position_ids,
                attention_mask,
                past_key_values,
                inputs_embeds,
                labels,
            ) = self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, past_key_values, labels, images, images_aux
            )

        # TF5: the real forward runs ``self.model`` + ``lm_head`` (with the ``pretraining_tp`` split) and a shifted
        # CrossEntropyLoss itself; LlamaForCausalLM.forward does the same computation (shifted CE with
        # ignore_index=-100, fp32 logits) and also handles transformers-5 kwargs (``logits_to_keep``, output
        # capturing), so it is called instead.  ``output_*`` / ``return_dict`` are forwarded only when set.
        for name, value in (
            ("output_attentions", output_attentions),
            ("output_hidden_states", output_hidden_states),
            ("return_dict", return_dict),
        ):
            if value is not None:
                kwargs[name] = value
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        images_aux: torch.FloatTensor | None = None,
        **kwargs,
    ):
        position_ids = kwargs.pop("position_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("`inputs_embeds` is not supported")

        if images is not None:
            (inputs, position_ids, attention_mask, _, inputs_embeds, _) = (
                self.prepare_inputs_labels_for_multimodal(
                    inputs, position_ids, attention_mask, None, None, images, images_aux
                )
            )
        else:
            inputs_embeds = self.get_model().embed_tokens(inputs)

        # The spliced embeddings go to HF generate (no input_ids): the returned ids are the new tokens only.
        return super().generate(
            position_ids=position_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        images = kwargs.pop("images", None)
        images_aux = kwargs.pop("images_aux", None)
        _inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, inputs_embeds=inputs_embeds, **kwargs
        )
        # TF5: MGM ran on transformers ~4.36, whose LlamaForCausalLM.prepare_inputs_for_generation recomputed the
        # positions at every step as ``attention_mask.cumsum(-1) - 1`` (pads filled with 1) sliced to the new
        # tokens.  Transformers 5 computes them once and then increments the last column, which gives wrong
        # positions for MGM's right-padded spliced batches (a padded row ends with position 0).  Restore the 4.36
        # rule so decode positions continue each sample's own count of attended tokens.
        mask = _inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            step = _inputs.get("inputs_embeds")
            step = _inputs.get("input_ids") if step is None else step
            if step is not None and step.shape[1] > 0:
                pos = mask.long().cumsum(-1) - 1
                pos = pos.masked_fill(mask == 0, 1)
                _inputs["position_ids"] = pos[:, -step.shape[1] :]
        if images is not None:
            _inputs["images"] = images
        if images_aux is not None:
            _inputs["images_aux"] = images_aux
        return _inputs


AutoConfig.register("mgm", MGMConfig, exist_ok=True)
AutoModelForCausalLM.register(MGMConfig, MGMLlamaForCausalLM, exist_ok=True)


# --------------------------------------------------------------------------------------------------------------
# builders (stand-in for mgm/model/builder.py::load_pretrained_model and mgm/eval/model_vqa.py preprocessing)
# --------------------------------------------------------------------------------------------------------------
def tiny_minigemini(
    layers=4,
    hidden=64,
    heads=4,
    kv_heads=2,
    intermediate=128,
    vocab=128,
    image_size=32,
    patch_size=8,
    aux_image_size=64,
    hd=False,
    attn_implementation="sdpa",
    seed=0,
    tokenizer_padding_side="right",
    tokenizer_model_max_length=None,
):
    """A random tiny MGM (Llama decoder, CLIP ViT low-res tower, ConvNeXt high-res tower), float32, eval mode.

    Image tokens per image: ``N = (image_size // patch_size) ** 2``; ``5 * N`` with ``hd=True``
    (MGM-HD: ``image_grid=2``, ``image_global=True``, and the high-res input is ``image_grid`` times larger,
    as MGM-HD uses 1536 instead of 768).  ``aux_image_size`` must be chosen so that the ConvNeXt stage-0 map
    (``aux_image_size / 4``) is a multiple of ``image_size // patch_size`` (window side = their ratio).
    """
    grid_side = image_size // patch_size
    image_grid = 2 if hd else 1
    image_size_aux = aux_image_size * image_grid
    if (aux_image_size // 4) % grid_side:
        raise ValueError("aux_image_size / 4 must be a multiple of image_size // patch_size")
    clip_cfg = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": 3,
    }
    convnext_cfg = {
        "num_channels": 3,
        "patch_size": 4,
        "hidden_sizes": [8, 16, 24, 32],
        "depths": [1, 1, 1, 1],
        "image_size": image_size_aux,
    }
    config = MGMConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        # fields as written by MGM's train.py / initialize_vision_modules
        mm_vision_tower=_CLIP_NAME,
        mm_vision_tower_aux=_OPENCLIP_NAME,
        mm_hidden_size=clip_cfg["hidden_size"],
        mm_hidden_size_aux=sum(convnext_cfg["hidden_sizes"]),
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        use_mm_proj=True,
        image_aspect_ratio="square",
        image_size_aux=image_size_aux,
        image_grid=image_grid,
        image_global=bool(hd),
        optimize_vision_tower=False,
        optimize_vision_tower_aux=False,
        tune_mm_mlp_adapter=False,
        tokenizer_padding_side=tokenizer_padding_side,
        tokenizer_model_max_length=tokenizer_model_max_length,
        # STAND-IN: the tower configs travel inside the model config (the real towers read them from disk)
        clip_vision_config=clip_cfg,
        convnext_config=convnext_cfg,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = MGMLlamaForCausalLM(config)
    # as load_pretrained_model: load the (delay-loaded) towers, then initialize the patch-info-mining modules
    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model(attn_implementation=attn_implementation)
    vision_tower_aux = model.get_vision_tower_aux()
    if not vision_tower_aux.is_loaded:
        vision_tower_aux.load_model()
    model.get_model().initialize_uni_modules(model.config, for_eval=True)
    return model.float().eval()


def tiny_minigemini_inputs(model, prompt_lengths, images_per_sample, seed=0):
    """Random prompts with ``IMAGE_TOKEN_INDEX`` placeholders, padded as MGM's collator does.

    ``prompt_lengths[i]``: text tokens of sample i (BOS included, placeholders not counted);
    ``images_per_sample``: int or list.  Placeholders split the text into equal parts after BOS (one image:
    ``[BOS, <image>, text...]`` like MGM's ``"<image>\\n" + question`` prompts).  Input padding uses
    pad id 0 on ``config.tokenizer_padding_side`` (MGM removes it before splicing anyway).

    Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``images`` (n_images, 3, S, S) or in HD
    ``(n_images, 5, 3, S, S)`` ordered ``[4 crops row-major, global]``, ``images_aux`` (n_images, 3, A, A),
    images ordered sample by sample.  A sample with 0 images gets a zero dummy image (MGM's dataset does the
    same, and ``prepare_inputs_labels_for_multimodal`` consumes one image per image-less sample).
    """
    config = model.config
    batch = len(prompt_lengths)
    if isinstance(images_per_sample, int):
        images_per_sample = [images_per_sample] * batch
    gen = torch.Generator().manual_seed(seed)
    vision_cfg = model.get_vision_tower().config
    size = vision_cfg.image_size
    grid = getattr(config, "image_grid", 1)
    size_aux = config.image_size_aux
    dtype = model.dtype

    seqs = []
    for length, n_img in zip(prompt_lengths, images_per_sample, strict=True):
        text = torch.randint(3, config.vocab_size, (length,), generator=gen)
        text[0] = config.bos_token_id
        body = text[1:]
        parts = list(torch.tensor_split(body, n_img)) if n_img > 0 else [body]
        pieces = [text[:1]]
        for j in range(n_img):
            pieces.append(torch.tensor([IMAGE_TOKEN_INDEX]))
            pieces.append(parts[j])
        if n_img == 0:
            pieces.append(body)
        seqs.append(torch.cat(pieces))

    max_len = max(len(s) for s in seqs)
    input_ids = torch.full((batch, max_len), config.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, max_len), dtype=torch.long)
    left = getattr(config, "tokenizer_padding_side", "right") == "left"
    for i, s in enumerate(seqs):
        if left:
            input_ids[i, max_len - len(s) :] = s
            attention_mask[i, max_len - len(s) :] = 1
        else:
            input_ids[i, : len(s)] = s
            attention_mask[i, : len(s)] = 1

    images, images_aux = [], []
    for n_img in images_per_sample:
        for j in range(max(n_img, 1)):
            aux = torch.rand((3, size_aux, size_aux), generator=gen) * 2 - 1
            if n_img == 0 and j == 0:
                aux = torch.zeros_like(aux)
            # model_vqa.py: the aux image is the processed one; the low-res input is resized from it
            raw = F.interpolate(
                aux[None], size=[size * grid, size * grid], mode="bilinear", align_corners=False
            )[0]
            if grid >= 2:
                crops = (
                    raw.reshape(3, grid, size, grid, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
                )
                if getattr(config, "image_global", False):
                    glob = F.interpolate(raw[None], size=[size, size], mode="bilinear", align_corners=False)
                    crops = torch.cat([crops, glob], dim=0)  # [image_crops, image_global]
                raw = crops.contiguous()
            images.append(raw)
            images_aux.append(aux)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "images": torch.stack(images).to(dtype),
        "images_aux": torch.stack(images_aux).to(dtype),
    }


def image_tokens_per_image(model):
    """Number of spliced embeddings per image: N, or (image_grid**2 + image_global) * N."""
    n = model.get_vision_tower().num_patches
    grid = getattr(model.config, "image_grid", 1)
    if grid > 1:
        return (grid**2 + int(bool(getattr(model.config, "image_global", False)))) * n
    return n
