"""An independent masking reference for token dropping, written without tokencompress.

Dropping visual tokens before decoder layer K must equal running the *uncompressed* model on the full sequence and
masking the dropped tokens' key columns out of attention from layer K on. `MaskingReference` does exactly that
with its own forward pre-hooks on the decoder layers: each layer's `attention_mask` is replaced by a 4-D mask
built here from scratch (causal by sequence index, padding keys masked, dropped keys masked from layer K on),
for prefill, full forwards and cached decode steps (greedy, sampling, beam search) alike. `MultiStageReference`
generalises it to a drop layer per token (multi-stage methods), and to a second one for the queries after the
prompt (an output-aware cache, as the decode steps see it); `MaskingReference` is its single-layer case.

`fastv_kept` recomputes FastV's choice with eager attention (`output_attentions=True`) on an uncompressed model,
so the engine's kept set can be checked against an independent computation too.

Nothing here imports tokencompress: it only relies on the transformers module layout shared by LLaVA and
Qwen2-VL/Qwen2.5-VL/Qwen3-VL (decoder layers at `model.model.language_model.layers`, the 2-D padding mask at the
text model's entry), or on that of the LLaVA codebase family (original LLaVA, Mini-Gemini: the LLaMA decoder at
`model.get_model()`, fed spliced `inputs_embeds`). Positions are left to the uncompressed model (1-D, or Qwen's
own M-RoPE ids).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

NEVER = 1 << 30  # drop layer of a token that is never dropped


def generation_positions(attention_mask: Tensor) -> Tensor:
    """The position ids HF `generate` uses: cumulative count of real tokens minus one, 0 at padding."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def expected_keep_count(num_visual: int, keep: float | int) -> int:
    """ceil(N x keep) for a ratio (the keep value read as the decimal the user wrote), min(N, keep) for a count."""
    if isinstance(keep, float):
        return math.ceil(Fraction(str(keep)) * num_visual)
    return min(num_visual, keep)


def multistage_mask(
    pad: Tensor,
    past: int,
    num_queries: int,
    layer: int,
    prompt_drop: Tensor,
    later_drop: Tensor,
    implementation: str,
    dtype: torch.dtype,
) -> Tensor:
    """The 4-D attention mask of decoder layer `layer` of the uncompressed reference.

    pad: (B, past + q) padding mask over every key (1 = real); the queries are the last q keys. prompt_drop and
    later_drop: (B, P) the first layer from which each of the P prompt positions is masked as a key, for queries
    inside the prompt and for queries after it. Causal by sequence index; every query sees its own key (rows of
    padding or dropped tokens must not be fully masked; their outputs are never used).
    """
    batch, keys = pad.shape
    if keys != past + num_queries:
        raise AssertionError(f"the padding mask covers {keys} keys but the layer has {past} + {num_queries}")
    device = pad.device
    key_index = torch.arange(keys, device=device)
    query_index = past + torch.arange(num_queries, device=device)
    allowed = (key_index[None, None, :] <= query_index[None, :, None]) & pad.bool()[:, None, :]
    prompt = prompt_drop.shape[1]
    covered = min(prompt, keys)
    hidden_in_prompt = torch.zeros(batch, keys, dtype=torch.bool, device=device)
    hidden_later = torch.zeros(batch, keys, dtype=torch.bool, device=device)
    hidden_in_prompt[:, :covered] = prompt_drop[:, :covered].to(device) <= layer
    hidden_later[:, :covered] = later_drop[:, :covered].to(device) <= layer
    in_prompt = (query_index < prompt)[None, :, None]
    hidden = torch.where(in_prompt, hidden_in_prompt[:, None, :], hidden_later[:, None, :])
    allowed = allowed & ~hidden
    own = torch.arange(num_queries, device=device)
    allowed[:, own, past + own] = True
    mask = allowed[:, None]
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"the reference supports eager and sdpa, not {implementation!r}")


class MultiStageReference:
    """Context manager: while active, the uncompressed `model` masks prompt position j of sample b out of
    attention (as a key) in every decoder layer >= drop[b, j] for the prompt's queries, and >= later[b, j]
    (default: drop) for queries after the prompt (decode steps, or generated tokens in a full forward).

    drop, later: (B, P) integer layers, `NEVER` for tokens never masked. A batch that is a multiple of B (beam
    search) repeats each sample's row for its consecutive copies.
    """

    def __init__(self, model: nn.Module, drop: Tensor, later: Tensor | None = None) -> None:
        self.model = model
        self.drop = drop.long()
        self.later = self.drop if later is None else later.long()
        if self.later.shape != self.drop.shape:
            raise AssertionError("drop and later must have the same shape")
        self.handles: list[Any] = []
        self.pad: Tensor | None = None
        self.calls = 0

    @property
    def text_model(self) -> nn.Module:
        inner = self.model.model
        # the LLaVA codebase family: the LLaMA decoder is the inner model itself
        return inner.language_model if hasattr(inner, "language_model") else self.model.get_model()

    def __enter__(self) -> Any:
        self.handles.append(self.text_model.register_forward_pre_hook(self._on_text, with_kwargs=True))
        for index, layer in enumerate(self.text_model.layers):
            self.handles.append(
                layer.register_forward_pre_hook(
                    lambda m, a, k, i=index: self._on_layer(i, a, k), with_kwargs=True
                )
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _on_text(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise AssertionError(f"the reference expects the 2-D padding mask, got {mask.dim()}-D")
        self.pad = mask

    def _rows(self, table: Tensor, batch: int) -> Tensor:
        rows = table.shape[0]
        if batch == rows:
            return table
        if batch % rows:
            raise AssertionError(f"batch {batch} is not a multiple of the reference's {rows} rows")
        return table.repeat_interleave(batch // rows, dim=0)

    def _on_layer(self, index: int, args: tuple, kwargs: dict) -> tuple:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batch, queries = hidden.shape[:2]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(index) if cache is not None else 0
        pad = self.pad
        if pad is None:
            pad = torch.ones(batch, past + queries, dtype=torch.long, device=hidden.device)
        implementation = self.model.config.get_text_config()._attn_implementation
        kwargs["attention_mask"] = multistage_mask(
            pad,
            past,
            queries,
            index,
            self._rows(self.drop, batch),
            self._rows(self.later, batch),
            implementation,
            hidden.dtype,
        )
        self.calls += 1
        return (hidden, *args[1:]), kwargs


class MaskingReference(MultiStageReference):
    """Context manager: while active, `model` (an uncompressed LLaVA or Qwen-VL model) masks the key
    columns marked in `dropped` (B, L_prompt) bool out of attention in decoder layers >= `layer`.

    Works for any forward or `generate` call: the 2-D padding mask is read at the text model's entry (None means
    no padding), the cached length per layer from the cache itself. A batch that is a multiple of `dropped`'s
    (beam search, num_return_sequences) repeats each sample's row for its consecutive copies.
    """

    def __init__(self, model: nn.Module, layer: int, dropped: Tensor) -> None:
        super().__init__(model, torch.where(dropped.bool(), layer, NEVER))


def fastv_kept(
    eager_model: nn.Module,
    inputs: dict[str, Tensor],
    layer: int,
    keep: float | int,
    image_token_id: int | Sequence[int] | None,
    visual: Tensor | None = None,
) -> list[set[int]]:
    """FastV's kept visual positions per sample, recomputed with eager attention on an uncompressed model.

    Score of a visual token = attention it receives from the sample's last real token at layer `layer - 1`, mean
    over heads; keep the top ceil(N x keep) (or the count) per sample. Visual tokens are those whose id is
    `image_token_id` (or one of several ids: Qwen's image and video placeholders). LLaVA `inputs` must hold
    position_ids (generate's); Qwen models compute their M-RoPE ids from mm_token_type_ids and the grids.
    `visual` (B, L) bool, when given, marks the visual tokens instead (inputs given as spliced `inputs_embeds`,
    as in the LLaVA codebase family, have no placeholder ids).
    """
    if eager_model.config.get_text_config()._attn_implementation != "eager":
        raise AssertionError("fastv_kept needs a model running eager attention")
    with torch.no_grad():
        out = eager_model(**inputs, output_attentions=True)
    # Decoder attentions only: the LLaVA and Qwen-VL outputs' attentions are those of the language model.
    attention = out.attentions[layer - 1]  # (B, H, L, L)
    pad = inputs["attention_mask"].bool()
    if visual is None:
        ids = [image_token_id] if isinstance(image_token_id, int) else list(image_token_id)
        visual = torch.isin(inputs["input_ids"], torch.tensor(ids, device=pad.device))
    visual = visual.to(pad.device) & pad
    kept = []
    for b in range(pad.shape[0]):
        last = int(torch.nonzero(pad[b])[-1])
        scores = attention[b, :, last].float().mean(0)
        columns = torch.nonzero(visual[b]).flatten()
        count = expected_keep_count(len(columns), keep)
        top = torch.topk(scores[columns], count).indices if count else columns[:0]
        kept.append({int(c) for c in columns[top]})
    return kept
