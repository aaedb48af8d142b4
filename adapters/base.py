"""What an adapter tells the engine: where the parts of one model family are, and where the visual tokens are."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tokencompress.accounting import DecoderShape
from tokencompress.engine.encoder import VisionEncoder
from tokencompress.engine.scoring import apply_rotary
from tokencompress.view import VisualTokens


class Adapter:
    """Base for one model family. Subclasses set `families` and implement `matches` and `visual_tokens`.

    The defaults below fit LLaMA-style decoders (`self_attn.q_proj/k_proj`, optional `q_norm/k_norm`, rotate-half
    rotary embedding, `norm` after the last layer); override them for other decoders.
    """

    families: ClassVar[str]
    positions_on_grid: ClassVar[bool] = (
        False  # True where a visual token's position is its grid cell (M-RoPE)
    )

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    # -- where things are -------------------------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives input_ids and images (its pre-hook finds the visual tokens)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    def attention_implementation(self) -> str:
        return self.text_config._attn_implementation or "eager"

    def shape(self) -> DecoderShape:
        config = self.text_config
        attention = self.layers[0].self_attn
        head_dim = attention.head_dim
        return DecoderShape(
            layers=len(self.layers),
            hidden=config.hidden_size,
            heads=attention.q_proj.out_features // head_dim,
            kv_heads=attention.k_proj.out_features // head_dim,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=self.lm_head.out_features,
        )

    # -- visual tokens ----------------------------------------------------------------------------------
    def visual_tokens(self, inputs: dict[str, Any]) -> VisualTokens | None:
        """Locate the visual tokens in the multimodal model's call arguments; None when there are none.

        Must raise a clear error when the placeholders do not match the images given.
        """
        raise NotImplementedError

    def complete_visual_tokens(
        self, tokens: VisualTokens | None, text_inputs: dict[str, Any]
    ) -> VisualTokens | None:
        """Finish (or, for models that splice images inside their forward, produce) the visual tokens from the
        text model's call arguments; default: as they are."""
        return tokens

    def install(self) -> Any:
        """Per-instance changes the adapter needs beyond hooks (e.g. observing a splice method); returns the
        function that undoes them. Default: none."""
        return lambda: None

    def take_layer_additions(self, text_inputs: dict[str, Any]) -> dict[int, tuple[Tensor, Tensor]]:
        """Features the model adds to a decoder layer's output at visual positions, {layer: (mask (B, L),
        values (n, hidden))}, removed from `text_inputs` so the engine adds them at the kept tokens instead."""
        return {}

    def text_labels(self, labels: Tensor | None, text_inputs: dict[str, Any]) -> Tensor | None:
        """The caller's labels aligned with the text model's sequence (for models that splice images inside
        their forward, as the splice moved them); default: as given."""
        return labels

    def vision_encoder(self) -> VisionEncoder | None:
        """The model's ViT, for compressors that shorten it (MustDrop's vision stage) and for counting its FLOPs;
        None where the adapter cannot say which prompt slot each patch becomes (`encoder_patches`). Default: None."""
        return None

    def encoder_patches(self, tokens: VisualTokens, encoder_rows: int) -> Tensor | None:
        """(B, L) long: for each visual slot, the encoder patch its feature comes from, as row x patches + patch
        (row: the image's place in the encoder's batch of `encoder_rows`; patch: raster index on its grid), -1
        elsewhere; None when this input's layout does not map onto the encoder's patches. Needed where
        `vision_encoder` is given."""
        return None

    def addition_layers(self) -> list[int]:
        """Decoder layers that may receive such additions."""
        return []

    def placeholders(self, inputs: dict[str, Any], token_id: int) -> Tensor:
        """(B, L) bool: where `token_id` stands, from input_ids, or from inputs_embeds by that id's embedding."""
        input_ids = inputs.get("input_ids")
        if input_ids is not None:
            return input_ids == token_id
        embeds = inputs["inputs_embeds"]
        weight = self.model.get_input_embeddings().weight[token_id]
        return (embeds == weight.to(embeds.dtype)).all(-1)

    def input_norm(self, layer: int) -> nn.Module:
        """The layer's normalisation before attention (what routers read)."""
        return self.layers[layer].input_layernorm

    def mlp(self, layer: int) -> nn.Module:
        """The layer's feed-forward block, whose output a mixture-of-depths router scales."""
        return self.layers[layer].mlp

    # -- attention pieces for scoring -------------------------------------------------------------------
    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def key_projection(self, layer: int) -> nn.Module:
        return self.attention(layer).k_proj

    def queries(self, layer: int, normed: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotated query heads (B, H, n, d) of the attention-input rows `normed` (B, n, hidden)."""
        attention = self.attention(layer)
        states = attention.q_proj(normed).unflatten(-1, (-1, attention.head_dim))
        if hasattr(attention, "q_norm"):
            states = attention.q_norm(states)
        return apply_rotary(states.transpose(1, 2), cos, sin)

    def keys(self, layer: int, projected: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotated key heads (B, Hkv, n, d) from the key projection's output (B, n, Hkv x d)."""
        attention = self.attention(layer)
        states = projected.unflatten(-1, (-1, attention.head_dim))
        if hasattr(attention, "k_norm"):
            states = attention.k_norm(states)
        return apply_rotary(states.transpose(1, 2), cos, sin)

    def scaling(self, layer: int) -> float:
        return self.attention(layer).scaling


def check_media_runs(placeholder: Tensor, sizes: list[int], kind: str) -> None:
    """Media fill placeholders in row-major order with `sizes` tokens each; each must start where a run of
    placeholders starts and end where one ends, within one sample (a video may span one run per frame).
    Otherwise the sizes (grids, image sizes) do not describe the prompt's own placeholders."""
    flat = placeholder.flatten().nonzero()[:, 0]
    rows = flat // placeholder.shape[1]
    gap = torch.ones(len(flat) + 1, dtype=torch.bool, device=flat.device)
    gap[1:-1] = (flat[1:] != flat[:-1] + 1) | (rows[1:] != rows[:-1])
    ends = torch.tensor(sizes, device=flat.device).cumsum(0)
    starts = ends - torch.tensor(sizes, device=flat.device)
    if not bool(gap[starts].all() and gap[ends].all()):
        raise ValueError(
            f"the {kind} sizes do not match the runs of {kind} placeholder tokens: the {kind}s given take {sizes} "
            "tokens in order, which do not fall on the placeholder runs of the prompt"
        )


def grid_patches(
    tokens: VisualTokens, side: int, encoder_rows: int, rows_per_sample: list[int] | None = None
) -> Tensor | None:
    """`encoder_patches` for models whose every grid is one image's side x side patch grid, the images in sequence
    order (sample by sample) being the encoder's batch rows; `rows_per_sample` where a sample takes other rows than
    its grids (the LLaVA codebase encodes an image for a sample without one). Samples that `generate` repeated
    after encoding (beams, several sequences per prompt: k consecutive copies) share their original's rows. None
    for any other layout."""
    if any(shape != (side, side) for shapes in tokens.grid_shape for shape in shapes):
        return None
    if rows_per_sample is None:
        rows_per_sample = [len(shapes) for shapes in tokens.grid_shape]
    batch, total = len(rows_per_sample), sum(rows_per_sample)
    repeats = total // encoder_rows if encoder_rows and total % encoder_rows == 0 else 0
    if repeats < 1 or batch % repeats:
        return None
    rows = torch.tensor(rows_per_sample[::repeats], device=tokens.image_index.device)
    first_row = (rows.cumsum(0) - rows).repeat_interleave(repeats)[:, None]
    on_grid = tokens.is_visual & (tokens.grid_row >= 0) & (tokens.grid_col >= 0)
    flat = (first_row + tokens.image_index) * side * side + tokens.grid_row * side + tokens.grid_col
    return torch.where(on_grid, flat, -1)
