"""MustDrop's prefill decisions recomputed by hand, written without tokencompress.

`mustdrop_by_hand` recomputes every filter stage from eager attention maps (`output_attentions=True`) of an
uncompressed model run under `reference.MultiStageReference` (so each stage sees the shortened sequence of the
previous stages: dropped columns get exactly zero attention, the kept ones the softmax over the survivors).
`MultiStageReference` masks each token from its own drop layer on, and, for the queries after the prompt, from a
second one: how an output-aware cache looks from the decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from reference import NEVER, MultiStageReference, expected_keep_count
from torch import Tensor, nn

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
                count = expected_keep_count(len(columns), key_ratio) if key_ratio else 0
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
                count = max(expected_keep_count(len(columns), keep), len(present_keys)) - len(present_keys)
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
