"""ARank (gamma-MoD's layer choice): how redundant each decoder layer's attention is, from a few batches.

Luo et al., "gamma-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language Models", 2024.
https://arxiv.org/abs/2410.13859

For each layer, each head's causal attention map of one sample (fp32, over the sample's real tokens) has its
diagonal zeroed and its matrix rank taken; ranks are averaged over heads, then over samples. A low rank means the
layer's attention carries little information: a candidate for a mixture-of-depths layer. The maps are recomputed
from the layer's own queries and keys, one layer and one head at a time, while the model runs under its own
attention implementation (no eager attention, memory for one n x n map at a time).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

AUTHORS_DENSE = (0, 1, 2, -1)  # the layers the authors keep dense: the first three and the last


@dataclass(frozen=True)
class ARank:
    """scores[l]: layer l's ARank (mean over heads and samples); samples: how many went in; layers: the suggested
    mixture-of-depths layers (every layer but `dense`, or the `count` lowest-ranked of those)."""

    scores: list[float]
    samples: int
    layers: list[int]


def arank(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    dense: Iterable[int] = AUTHORS_DENSE,
    count: int | None = None,
) -> ARank:
    """Run `model` on each batch (keyword inputs, e.g. a processor's output) and return every layer's ARank and
    the suggested MoD layers: all layers except `dense` (negative indices count from the end; the authors keep
    0, 1, 2 and the last dense), or with `count` the `count` lowest-ranked of them."""
    from tokencompress.adapters import find_adapter

    adapter = find_adapter(model)
    num_layers = len(adapter.layers)
    kept_dense = sorted({d % num_layers for d in dense})
    eligible = [layer for layer in range(num_layers) if layer not in kept_dense]
    if count is not None and not (isinstance(count, int) and 1 <= count <= len(eligible)):
        raise ValueError(
            f"arank: count must be an int in 1..{len(eligible)} (layers not kept dense), got {count!r}"
        )
    totals = torch.zeros(num_layers, dtype=torch.float64)
    state: dict[str, Any] = {"samples": 0, "real": None}
    handles = [
        adapter.language_model.register_forward_pre_hook(
            functools.partial(_note_padding, state), with_kwargs=True
        )
    ]
    for index in range(num_layers):
        handles.append(
            adapter.attention(index).register_forward_pre_hook(
                functools.partial(_rank_layer, adapter, index, totals, state), with_kwargs=True
            )
        )
    try:
        with torch.no_grad():
            for batch in batches:
                state["real"] = None
                model(**batch)
                state["samples"] += state["batch"]
    finally:
        for handle in handles:
            handle.remove()
    if not state["samples"]:
        raise ValueError("arank needs at least one batch")
    scores = (totals / state["samples"]).tolist()
    ranked = sorted(eligible, key=lambda layer: scores[layer])
    layers = sorted(ranked[:count]) if count is not None else eligible
    return ARank(scores=scores, samples=state["samples"], layers=layers)


def _note_padding(state: dict[str, Any], module: nn.Module, args: tuple, kwargs: dict) -> None:
    """The text model's 2-D padding mask tells which tokens of each row are real."""
    mask = kwargs.get("attention_mask")
    embeds = kwargs.get("inputs_embeds")
    ids = kwargs.get("input_ids", args[0] if args else None)
    batch, length = (embeds if embeds is not None else ids).shape[:2]
    state["batch"] = batch
    if isinstance(mask, Tensor) and mask.dim() == 2:
        state["real"] = mask[:, -length:].bool()
    else:
        state["real"] = torch.ones(batch, length, dtype=torch.bool)


def _rank_layer(
    adapter: Any,
    index: int,
    totals: Tensor,
    state: dict[str, Any],
    module: nn.Module,
    args: tuple,
    kwargs: dict,
) -> None:
    normed = args[0] if args else kwargs["hidden_states"]
    cos, sin = kwargs["position_embeddings"]
    queries = adapter.queries(index, normed, cos, sin).float()
    keys = adapter.keys(index, adapter.key_projection(index)(normed), cos, sin).float()
    group = queries.shape[1] // keys.shape[1]
    scaling = adapter.scaling(index)
    real = state["real"].to(normed.device)
    for b in range(queries.shape[0]):
        tokens = real[b].nonzero()[:, 0]
        n = len(tokens)
        causal = torch.ones(n, n, dtype=torch.bool, device=normed.device).tril()
        ranks = []
        for head in range(queries.shape[1]):
            scores = queries[b, head, tokens] @ keys[b, head // group, tokens].T * scaling
            attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            attention.fill_diagonal_(0.0)
            ranks.append(torch.linalg.matrix_rank(attention).item())
        totals[index] += sum(ranks) / len(ranks)
