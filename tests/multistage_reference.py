"""An independent masking reference for multi-stage token dropping, written without tokencompress.

Dropping a visual token before decoder layer K must equal running the *uncompressed* model on the full sequence
and masking that token's key column out of attention from layer K on. `MultiStageReference` generalises
`reference.MaskingReference` to a drop layer per token (each stage of a multi-stage method drops its own tokens
from its own layer on), and to a second drop layer per token for the queries after the prompt (generated
tokens), which is how an output-aware cache looks from the decode steps: the prompt's queries keep the prefill
masking while later queries no longer see tokens the cache lost.

`mustdrop_by_hand` recomputes MustDrop's prefill decisions, stage after stage, from eager attention maps
(`output_attentions=True`) of an uncompressed model run under this reference (so each stage sees the shortened
sequence of the previous stages: dropped columns get exactly zero attention, the kept ones the softmax over the
survivors).

Nothing here imports tokencompress: only the transformers module layout shared by LLaVA and Qwen2-VL / Qwen2.5-VL
/ Qwen3-VL (decoder layers at `model.model.language_model.layers`, the 2-D padding mask at the text model's entry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

NEVER = 1 << 30  # drop layer of a token that is never dropped


def count_of(num_visual: int, keep: float | int) -> int:
    """ceil(N x ratio) with the ratio read as the decimal the user wrote; min(N, count) for an int count."""
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
        return self.model.model.language_model

    def __enter__(self) -> MultiStageReference:
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


# -- MustDrop's prefill decisions by hand ------------------------------------------------------------------------


@dataclass
class StageByHand:
    """One filter stage, per sample: the visual positions it saw, their scores and what it kept."""

    layer: int  # the filter layer (its attention decides); the drop acts from layer + 1
    candidates: list[list[int]] = field(default_factory=list)
    global_score: list[Tensor] = field(default_factory=list)
    individual: list[Tensor] = field(default_factory=list)
    by_rule: list[set[int]] = field(default_factory=list)  # kept by thresholds / budget alone (no protection)
    kept: list[set[int]] = field(default_factory=list)


@dataclass
class MustDropByHand:
    drop: Tensor  # (B, L) first layer each position is masked from (NEVER: reaches the last layer)
    keys: list[set[int]]  # key tokens per sample
    stages: list[StageByHand]

    def kept_after(self, stage: int) -> list[set[int]]:
        return self.stages[stage].kept

    @property
    def final(self) -> list[set[int]]:
        return self.stages[-1].kept


def _top(scores: Tensor, count: int, gap: float, what: str) -> list[int]:
    """Indices of the `count` highest scores (ties to the earlier index), checked not to hinge on float noise."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    if 0 < count < len(order):
        a, b = float(scores[order[count - 1]]), float(scores[order[count]])
        assert a - b > gap * max(abs(a), 1e-30), f"{what}: the top-{count} boundary is within float noise"
    return order[:count]


def mustdrop_by_hand(
    eager_model: nn.Module,
    inputs: dict[str, Tensor],
    visual: Tensor,
    filter_layers: list[int],
    global_threshold: float,
    individual_threshold: float,
    keep: float | int | None = None,
    key_ratio: float = 0.08,
    rows_after: str = "current",
    noise: float = 1e-4,
) -> MustDropByHand:
    """MustDrop's prefill from eager attention maps, stage by stage.

    At filter layer K: the attention of layer K (softmax over the keys the layer sees, mean over heads) from
    each real text token after the sample's last visual token (`rows_after`: "current", its last surviving one,
    or "input", the last one of the input; no such token: the last real token still there) to each current
    visual token;
    global = column sum, individual = column max. Keep where global >= global_threshold x sum(global) or
    individual >= individual_threshold, or with `keep` the top count(N_stage, keep) by
    max(global / (global_threshold x sum), individual / individual_threshold); key tokens (the top
    ceil(key_ratio x N) by global score at the first stage) are always kept. Threshold comparisons closer than
    a relative `noise` to their threshold fail the call: such a choice would hinge on float noise.
    """
    if eager_model.config.get_text_config()._attn_implementation != "eager":
        raise AssertionError("mustdrop_by_hand needs a model running eager attention")
    real = inputs["attention_mask"].bool()
    visual = visual.bool() & real
    batch, length = visual.shape
    drop = torch.full((batch, length), NEVER, dtype=torch.long)
    current = visual.clone()
    index = torch.arange(length)
    keys: list[set[int]] = [set() for _ in range(batch)]
    stages = []
    for stage_number, layer in enumerate(filter_layers):
        with torch.no_grad(), MultiStageReference(eager_model, drop):
            attention = eager_model(**inputs, output_attentions=True).attentions[layer]
        attention = attention.double().mean(1)  # (B, L, L)
        stage = StageByHand(layer)
        for b in range(batch):
            columns = torch.nonzero(current[b]).flatten()
            stage.candidates.append(columns.tolist())
            if len(columns) == 0:
                for part in (stage.global_score, stage.individual):
                    part.append(torch.zeros(0, dtype=torch.double))
                stage.by_rule.append(set())
                stage.kept.append(set())
                continue
            last_visual = (
                int(columns.max()) if rows_after == "current" else int(torch.nonzero(visual[b]).max())
            )
            rows = torch.nonzero(real[b] & ~visual[b] & (index > last_visual)).flatten()
            if len(rows) == 0:  # the sequence ends with visual tokens: the last one still there
                rows = torch.nonzero(real[b] & (drop[b] == NEVER)).flatten()[-1:]
            block = attention[b][rows][:, columns]
            global_score, individual = block.sum(0), block.amax(0)
            total = float(global_score.sum())
            stage.global_score.append(global_score)
            stage.individual.append(individual)
            if stage_number == 0:
                count = count_of(len(columns), key_ratio) if key_ratio else 0
                keys[b] = {int(columns[i]) for i in _top(global_score, count, 1e-6, "key tokens")}
            if keep is None:
                global_ratio = global_score / (global_threshold * total)
                individual_ratio = individual / individual_threshold
                for ratio in (global_ratio, individual_ratio):
                    closest = float((ratio - 1).abs().min())
                    assert closest > noise, f"a score is within {closest:.2g} of its threshold: pick others"
                rule = (global_ratio >= 1) | (individual_ratio >= 1)
                by_rule = {int(c) for c in columns[rule]}
            else:
                margin = torch.maximum(
                    global_score / (global_threshold * total), individual / individual_threshold
                )
                # the budget counts the key tokens: they take their places first, the highest margins the rest
                present_keys = keys[b] & set(columns.tolist())
                others = torch.tensor([int(c) not in present_keys for c in columns])
                count = max(count_of(len(columns), keep), len(present_keys)) - len(present_keys)
                chosen = _top(margin[others], count, 1e-6, "keep budget")
                by_rule = {int(columns[others][i]) for i in chosen} | present_keys
            kept = by_rule | (keys[b] & set(columns.tolist()))
            stage.by_rule.append(by_rule)
            stage.kept.append(kept)
            for c in columns.tolist():
                if c not in kept:
                    drop[b, c] = layer + 1
                    current[b, c] = False
        stages.append(stage)
    return MustDropByHand(drop=drop, keys=keys, stages=stages)
