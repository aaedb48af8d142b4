"""Pooling pyramids (StaticPyramid, DPN) on the remaining adapters: LLaVA-NeXT / LLaVA-OneVision and the LLaVA
codebase family (original LLaVA, Mini-Gemini, Mini-Gemini-HD, LLaVA-HR stand-in).

Every pooled result is compared with `pooling_reference.PoolingReference` fed with a `Layout` computed here,
independently of the adapters:

- LLaVA-NeXT / OneVision: `test_llava_next.batch_layout` (transformers' own any-res formulas): each image is its
  base view grid then its crop grid, whose rows each end in a newline token; a OneVision video is its frames'
  grids then one newline. Every grid is pooled on its own; newlines are structural: never pooled, never removed,
  they stay where they are (between the pooled tokens of a crop grid).
- The codebase family: the spliced sequence walked from the prompt (a text token is one position, a placeholder
  one image's side x side raster grids, several per image in Mini-Gemini-HD; padding removed and re-added on
  `tokenizer_padding_side`, or, for LLaVA-HR, whole padded rows spliced). The reference runs the uncompressed
  model's own splice, so its decoder sees the same `inputs_embeds` as the compressed model's.

The reference pools by hand (own grids, kernels, floor mode, max / mean, DPN's probability scale, each pooled
token at its group's first member, position id floor(mean of the members' ids)) and runs the remaining decoder
layers directly. DPN is compared with the experts and probabilities the stats report, which are recomputed by
hand from the reference's hidden state of the routing token.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import helpers
import pytest
import torch
from helpers import (
    assert_close_at,
    assert_flops_close,
    assert_untouched,
    extend,
    forward_hooks,
    measure_flops,
)
from llava_hr_standin import IGNORE_INDEX, tiny_llava_hr, tiny_llava_hr_inputs
from minigemini_standin import image_tokens_per_image, tiny_minigemini, tiny_minigemini_inputs
from pooling_reference import Layout, PoolingReference, Stage
from reference import generation_positions
from test_llava_next import VISUAL_IDS as NEXT_VISUAL_IDS
from test_llava_next import sample_layout
from test_pyramid import (
    EXPERTS,
    REF_ATOL,
    compress_eval,
    hand_counts,
    router_by_hand,
    stages_for,
    tune_routers,
)
from torch import nn

import tokencompress as tc
from tokencompress.tiny import tiny_llava_next, tiny_llava_next_inputs

try:
    from llava_codebase import tiny_llava_codebase, tiny_llava_codebase_inputs
except ImportError:  # llava-torch is not installed: the original LLaVA's cases are skipped
    tiny_llava_codebase = tiny_llava_codebase_inputs = None

NUM_LAYERS = 4
IMPLEMENTATIONS = ("eager", "sdpa")
IMAGE_TOKEN_INDEX = -200  # the codebase's placeholder
SPLICE = "prepare_inputs_labels_for_multimodal"
TEMPERATURE = 10.0  # DPN's default

# -- LLaVA-NeXT / OneVision ----------------------------------------------------------------------------------

NEXT_FAMILIES = ("llava_next", "llava_onevision")
# One sample per row: ("text", n), ("image", (height_px, width_px)), ("video", frames; OneVision only); left
# padded. Crop grids: LLaVA-NeXT (64, 48) -> 8 x 6, (32, 64) -> 4 x 8, (40, 64) -> 6 x 8; OneVision (64, 48) ->
# 4 x 3, (32, 64) -> 2 x 5 (odd: floor mode); base views 4 x 4, OneVision video frames 2 x 2.
NEXT_BATCHES = {
    "b1": {family: [[("text", 3), ("image", (32, 64)), ("text", 4)]] for family in NEXT_FAMILIES},
    "b3": {  # one image, two media, none
        "llava_next": [
            [("text", 2), ("image", (64, 48)), ("text", 3)],
            [("text", 1), ("image", (32, 64)), ("text", 1), ("image", (40, 64)), ("text", 2)],
            [("text", 5)],
        ],
        "llava_onevision": [
            [("text", 2), ("image", (64, 48)), ("text", 3)],
            [("text", 1), ("image", (32, 64)), ("text", 1), ("video", 2), ("text", 2)],
            [("text", 5)],
        ],
    },
}


@functools.cache
def _next_pristine(family: str, implementation: str) -> nn.Module:
    return tiny_llava_next(family, layers=NUM_LAYERS, attn_implementation=implementation, seed=0)


# -- the LLaVA codebase family -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Codebase:
    """How to build one codebase model and its inputs, and how its splice lays out the sequence."""

    build: Callable[[str, str], nn.Module]  # (attn_implementation, tokenizer_padding_side) -> model
    inputs: Callable[[nn.Module, str, str], dict]  # (model, batch name, padding side) -> inputs
    grids_per_image: int = 1
    whole_rows: bool = False  # LLaVA-HR splices whole padded rows (padding kept, right padding only)


# (prompt lengths (prefix, suffix), images) per sample; a text-only sample carries a dummy image
LLAVA_BATCHES = {"b1": ([(3, 5)], [1]), "b3": ([(2, 4), (5, 2), (1, 6)], [1, 2, 0])}
MGM_BATCHES = {"b1": ([7], [1]), "b3": ([5, 8, 4], [1, 2, 0])}  # (text tokens, BOS included; images)
HR_BATCHES = {
    "b1": ([(3, 5)], [1]),
    "padded": ([(3, 5), (1, 2), (2, 1)], [1, 1, 1]),  # one spliced length: HR's own labels=None path runs
    "b3": (
        [(3, 5), (1, 2), (2, 3)],
        [1, 2, 0],
    ),  # rows of different spliced length: HR's own code needs labels
}


def _llava(implementation: str, side: str) -> nn.Module:
    if tiny_llava_codebase is None:
        pytest.skip("llava-torch is not installed")
    # 40 px images of 8 px patches: 5 x 5 grids, so floor mode drops a row and a column
    return tiny_llava_codebase(
        layers=NUM_LAYERS, image_size=40, attn_implementation=implementation, tokenizer_padding_side=side
    )


def _mgm(hd: bool):
    def build(implementation: str, side: str) -> nn.Module:
        return tiny_minigemini(
            layers=NUM_LAYERS, hd=hd, attn_implementation=implementation, tokenizer_padding_side=side
        )

    return build


def _mgm_inputs(model, batch: str, side: str) -> dict:
    assert model.config.tokenizer_padding_side == side
    return tiny_minigemini_inputs(model, *MGM_BATCHES[batch])


CODEBASE = {
    "llava": Codebase(
        _llava,
        lambda model, batch, side: tiny_llava_codebase_inputs(
            model, *LLAVA_BATCHES[batch], padding_side=side
        ),
    ),
    "mgm": Codebase(_mgm(False), _mgm_inputs),
    "mgm_hd": Codebase(_mgm(True), _mgm_inputs, grids_per_image=5),  # global view + 2 x 2 crops
    "llava_hr": Codebase(
        lambda implementation, side: tiny_llava_hr(layers=NUM_LAYERS, attn_implementation=implementation),
        lambda model, batch, side: tiny_llava_hr_inputs(model, *HR_BATCHES[batch]),
        whole_rows=True,
    ),
}
CODEBASE_FAMILIES = tuple(CODEBASE)
FAMILIES = NEXT_FAMILIES + CODEBASE_FAMILIES


@functools.cache
def _codebase_pristine(family: str, implementation: str, side: str) -> nn.Module:
    return CODEBASE[family].build(implementation, side)


def fresh_model(family: str, implementation: str = "sdpa", side: str = "right") -> nn.Module:
    """A new, never compressed model; the same weights under every implementation (and padding side)."""
    if family in NEXT_FAMILIES:
        return copy.deepcopy(_next_pristine(family, implementation))
    return copy.deepcopy(_codebase_pristine(family, implementation, side))


# -- the case: inputs, their independent layout, what the reference runs -------------------------------------


@dataclass
class Case:
    """One family's batch: what the compressed model gets (`inputs`), what the reference's (uncompressed) model
    gets (`ref_inputs`: the same, plus HR's labels where its own code needs them), and the layout of the sequence
    the decoder runs on (NeXT: the input; codebase: the spliced sequence)."""

    family: str
    inputs: dict[str, torch.Tensor]
    ref_inputs: dict[str, torch.Tensor]
    layout: Layout
    newline: torch.Tensor  # (B, L) structural tokens (NeXT's newlines), never pooled

    @property
    def visual(self) -> torch.Tensor:
        visual = torch.zeros_like(self.layout.real)
        for b, cells in enumerate(self.layout.cells):
            visual[b, list(cells)] = True
        return visual

    @property
    def text(self) -> torch.Tensor:
        """The real positions that are not pooled visual tokens (text, and NeXT's newlines)."""
        return self.layout.real & ~self.visual

    @property
    def rows(self) -> int:
        return self.layout.real.shape[0]


def next_case(family: str, model, batch: str, padding_side: str = "left") -> Case:
    """The layout from `test_llava_next.sample_layout` (transformers' formulas), laid on each row's real
    positions; it must mark exactly the model's placeholders."""
    samples = NEXT_BATCHES[batch][family]
    inputs = tiny_llava_next_inputs(model, samples, seed=0, padding_side=padding_side)
    inputs["position_ids"] = generation_positions(inputs["attention_mask"])  # generate's ids, not the column
    real = inputs["attention_mask"].bool()
    newline, content = torch.zeros_like(real), torch.zeros_like(real)
    cells, grids = [], []
    for b, sample in enumerate(samples):
        tokens, shapes = sample_layout(family, sample)
        positions = torch.nonzero(real[b]).flatten().tolist()
        assert len(positions) == len(tokens), "the inputs disagree with the independent token count"
        cells.append({})
        for position, token in zip(positions, tokens, strict=True):
            if token[0] == "content":
                cells[b][position] = token[1:]
                content[b, position] = True
            elif token[0] == "newline":
                newline[b, position] = True
        grids.append(shapes)
    placeholders = torch.isin(inputs["input_ids"], torch.tensor(NEXT_VISUAL_IDS)) & real
    assert torch.equal(content | newline, placeholders), "the layout misses the model's placeholders"
    return Case(family, inputs, inputs, Layout(real, cells, grids), newline)


def spliced_layout(family: str, model, inputs, side: str) -> Layout:
    """Walk each row: a text token is one position, a placeholder one image's `grids_per_image` side x side raster
    grids (grids numbered per sample); padding removed and the rows re-padded on `side`, or (LLaVA-HR) the whole
    padded row spliced, its padding kept (not real), zeros appended."""
    spec = CODEBASE[family]
    vision = model.get_vision_tower().config
    side_tokens = vision.image_size // vision.patch_size
    per_grid = side_tokens * side_tokens
    per_image = (
        image_tokens_per_image(model) if family.startswith("mgm") else model.get_vision_tower().num_patches
    )
    assert per_image == spec.grids_per_image * per_grid
    rows = []
    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].bool().tolist(), strict=True):
        entries, grid = [], 0  # per spliced position: (real, cell or None)
        for token, real in zip(ids, mask, strict=True):
            if not real:
                if spec.whole_rows:
                    entries.append((False, None))
                continue
            if token != IMAGE_TOKEN_INDEX:
                entries.append((True, None))
                continue
            for _ in range(spec.grids_per_image):
                entries += [(True, (grid, r, c)) for r in range(side_tokens) for c in range(side_tokens)]
                grid += 1
        rows.append((entries, grid))
    length = max(len(entries) for entries, _ in rows)
    real = torch.zeros(len(rows), length, dtype=torch.bool)
    cells, grids = [], []
    for b, (entries, count) in enumerate(rows):
        offset = length - len(entries) if side == "left" else 0
        cells.append({})
        for i, (is_real, cell) in enumerate(entries):
            real[b, offset + i] = is_real
            if cell is not None:
                cells[b][offset + i] = cell
        grids.append([(side_tokens, side_tokens)] * count)
    return Layout(real, cells, grids)


def model_splice_mask(family: str, model, inputs) -> torch.Tensor:
    """The attention mask the model's own splice builds (call on an uncompressed model)."""
    assert SPLICE not in model.__dict__
    splice, ids, mask = getattr(model, SPLICE), inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        if family == "llava_hr":  # (input_ids, attention_mask, past_key_values, labels, images)
            out = splice(ids, mask, None, inputs.get("labels"), inputs["images"])
        else:  # (input_ids, position_ids, attention_mask, past_key_values, labels, images, ...)
            out = splice(ids, None, mask, None, None, **media(inputs))
    return out[-4].bool()


def media(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}


def probe_labels(inputs) -> torch.Tensor:
    """Labels as LLaVA-HR's training data carries them: the ids, ignored at placeholders and padding."""
    ids = inputs["input_ids"]
    return ids.masked_fill((ids == IMAGE_TOKEN_INDEX) | ~inputs["attention_mask"].bool(), IGNORE_INDEX)


def codebase_case(family: str, model, batch: str, side: str = "right") -> Case:
    inputs = CODEBASE[family].inputs(model, batch, side)
    layout = spliced_layout(family, model, inputs, side)
    ref_inputs = inputs
    if family == "llava_hr" and len({int(c) for c in (inputs["input_ids"] == IMAGE_TOKEN_INDEX).sum(1)}) > 1:
        ref_inputs = {**inputs, "labels": probe_labels(inputs)}  # HR's own labels=None path raises here
    return Case(family, inputs, ref_inputs, layout, torch.zeros_like(layout.real))


def make_case(family: str, model, batch: str, side: str | None = None) -> Case:
    """`side`: the padding side (NeXT: of the inputs, default left; codebase: of the splice, default right)."""
    if family in NEXT_FAMILIES:
        return next_case(family, model, batch, side or "left")
    return codebase_case(family, model, batch, side or "right")


def forward(model, case: Case) -> torch.Tensor:
    with torch.no_grad():
        return model(**case.inputs).logits


# -- checks --------------------------------------------------------------------------------------------------


def check_layout_matches_the_model(ref_model, case: Case) -> None:
    """The independent layout's real positions are the model's own (codebase: its splice's mask)."""
    if case.family in NEXT_FAMILIES:
        return  # batch_layout asserts its placeholders are the model's (test_llava_next checks the newlines)
    mask = model_splice_mask(case.family, ref_model, case.ref_inputs)
    assert torch.equal(mask[:, : case.layout.real.shape[1]], case.layout.real)
    assert not mask[:, case.layout.real.shape[1] :].any()


def check_stats(model, case: Case, layers: list[int], kernels, min_grid_tokens: int, expected=None) -> None:
    """Every layer's per-sample visual counts are the hand counts of the stage in force (kernels[stage][sample]);
    with the reference's output `expected`, its tokens are the reference's, in the reference's order (each pooled
    token at its group's first member, given as that member's input position); newline tokens are kept at every
    layer and never counted visual."""
    prefill = tc.stats(model).prefill
    counts = [[sum(r * c for r, c in grids) for grids in case.layout.grids]]
    counts += hand_counts(case.layout.grids, kernels, min_grid_tokens)
    assert counts[0] == case.visual.sum(1).tolist()
    text = case.text.sum(1).tolist()
    assert len(prefill.layers) == NUM_LAYERS
    for stats in prefill.layers:
        stage = sum(stats.layer >= layer for layer in layers)
        assert stats.visual == counts[stage], (stats.layer, stats.visual, counts[stage])
        assert stats.tokens == [t + v for t, v in zip(text, counts[stage], strict=True)]
        for b in range(case.rows):
            kept = stats.kept_positions(b)
            if stage == 0:
                assert kept == torch.nonzero(case.layout.real[b]).flatten().tolist()
            elif expected is not None:
                assert kept == expected.order[layers[stage - 1]][b], (stats.layer, b)
            newlines = torch.nonzero(case.newline[b]).flatten().tolist()
            assert set(newlines) <= set(kept), f"layer {stats.layer}: a newline token was removed"
            row = stats.positions[b]
            assert not stats.visual_mask[b][torch.isin(row, torch.tensor(newlines, dtype=row.dtype))].any()
    for stage, layer in enumerate(layers):
        assert expected is None or expected.visual[layer] == counts[stage + 1]


def reference(ref_model, case: Case, stages, inputs=None, layout=None):
    return PoolingReference(ref_model).run(
        case.ref_inputs if inputs is None else inputs,
        stages,
        layout=case.layout if layout is None else layout,
    )


def kernels_of(stages) -> list[list[tuple[int, int]]]:
    return [[tuple(k) for k in stage.kernels] for stage in stages]


def dpn(pooling: str = "max", **kwargs) -> tc.DPN:
    return tc.DPN(
        after_layers=[0, 2],
        experts=EXPERTS,
        pooling=pooling,
        temperature=TEMPERATURE,
        min_grid_tokens=4,
        **kwargs,
    )


def check_routing(dpn_module: tc.DPN, model, expected, layers: list[int]) -> None:
    """At every stage, softmax(router(h) / T) of the reference's hidden state of the routing token (the last real
    token) entering that layer: its argmax is the expert the stats report, its value there the probability."""
    decisions = tc.stats(model).prefill.decisions
    for stage, layer in enumerate(layers):
        with torch.no_grad():
            probabilities = router_by_hand(dpn_module.routers[stage], expected.routing[layer], TEMPERATURE)
        expert = decisions[layer]["expert"]
        assert torch.equal(expert, probabilities.argmax(1))
        torch.testing.assert_close(
            decisions[layer]["probability"],
            probabilities.gather(1, expert[:, None])[:, 0],
            atol=1e-4,
            rtol=0,
        )


def mixed_experts(case: Case, stages) -> None:
    """Precondition of the DPN tests: at every stage the samples with media do not all choose the same expert,
    and over the stages they use every expert."""
    with_media = [bool(cells) for cells in case.layout.cells]
    used = set()
    for stage in stages:
        chosen = {kernel for kernel, media in zip(stage.kernels, with_media, strict=True) if media}
        assert len(chosen) > 1, f"precondition: the samples chose the same expert at layer {stage.layer}"
        used |= chosen
    assert used == set(EXPERTS), f"precondition: not every expert is used: {used}"


def greedy(model, case: Case, new_tokens: int = 5):
    """Greedy tokens with their logits through the family's own generate."""
    if case.family in NEXT_FAMILIES:  # generate makes its own positions; a random model may emit placeholders
        inputs = {k: v for k, v in case.inputs.items() if k != "position_ids"}
        return helpers.greedy(model, inputs, new_tokens, suppress_tokens=list(NEXT_VISUAL_IDS))
    if case.family == "llava_hr":
        return helpers.greedy(model, case.inputs, new_tokens, min_new_tokens=new_tokens)
    inputs = {"inputs": case.inputs["input_ids"], "attention_mask": case.inputs["attention_mask"]}
    return helpers.greedy(model, {**inputs, **media(case.inputs)}, new_tokens, min_new_tokens=new_tokens)


def pyramid(kind: str) -> tc.Compressor:
    if kind == "static":
        return tc.StaticPyramid(
            after_layers=[0, 2], kernels=[(1, 2), (2, 2)], pooling="max", min_grid_tokens=1
        )
    return dpn("avg")


def attach(model, kind: str, family: str) -> tc.Compressor:
    compressor = compress_eval(model, pyramid(kind))
    if kind == "dpn":
        tune_routers(compressor, ROUTER_SEEDS[family])
    return compressor


# -- 1. identity ---------------------------------------------------------------------------------------------


def identity_compressor(kind: str) -> tc.Compressor:
    if kind == "static":
        return tc.StaticPyramid(kernels=(1, 1), pooling="max")
    return tc.DPN(experts=((1, 1),), pooling="max", temperature=TEMPERATURE)


@pytest.mark.parametrize("kind", ["static", "dpn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity(family, kind):
    """A (1, 1) kernel (DPN: a single (1, 1) expert, probability 1), at the default schedule (after layers 0, 1,
    2 of 4), changes nothing: logits within 1e-5 at every real position, the same greedy tokens (a padded batch
    where the family's generate is exact: left padding; LLaVA-HR: batch 1), every token kept; uncompress restores
    the exact model."""
    side = "left" if family in ("llava", "mgm", "mgm_hd") else None  # NeXT: left-padded inputs
    model = fresh_model(family, "sdpa", side or "right")
    case = make_case(family, model, "padded" if family == "llava_hr" else "b3", side)
    generated = make_case(family, model, "b1") if family == "llava_hr" else case
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = forward(model, case)
    expected_tokens = greedy(model, generated).sequences
    hooks = forward_hooks(model)

    compress_eval(model, identity_compressor(kind))
    logits = forward(model, case)
    layers = [1, 2, 3]
    check_stats(model, case, layers, [[(1, 1)] * case.rows] * 3, 16)
    prefill = tc.stats(model).prefill
    for stats in prefill.layers:
        assert [stats.kept_positions(b) for b in range(case.rows)] == [
            torch.nonzero(case.layout.real[b]).flatten().tolist() for b in range(case.rows)
        ]
    if kind == "dpn":
        assert sorted(prefill.decisions) == layers
        for decision in prefill.decisions.values():
            assert decision["expert"].tolist() == [0] * case.rows
            assert decision["probability"].tolist() == [1.0] * case.rows
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, case.layout.real, atol=1e-5)
    assert torch.equal(greedy(model, generated).sequences, expected_tokens)

    assert tc.uncompress(model) is model
    assert SPLICE not in model.__dict__
    assert torch.equal(forward(model, case), expected)
    assert torch.equal(greedy(model, generated).sequences, expected_tokens)
    assert_untouched(model, state, hooks)


# -- 2. StaticPyramid equals the reference -------------------------------------------------------------------

# (pooling, kernels, after_layers, min_grid_tokens). NeXT: base 4 x 4 -> 2 x 2, crop 8 x 6 -> 4 x 3 (rows across
# newlines), OneVision crop 2 x 5 -> kept (10 < 16); codebase 4 x 4 -> 2 x 2, LLaVA 5 x 5 -> 2 x 2 (floored)
STATIC = {
    "max22-1stage": ("max", (2, 2), [1], 16),
    # NeXT 4 x 8 -> 4 x 4 -> 4 x 2, OneVision 2 x 5 -> 2 x 2 -> 2 x 1, frames 2 x 2 -> 2 x 1 -> kept; LLaVA
    # 5 x 5 -> 5 x 2 -> 5 x 1
    "avg12-2stages": ("avg", (1, 2), [0, 2], 4),
    # 8 x 6 -> 8 x 3 -> 4 x 1 (floored); codebase 4 x 4 -> 4 x 2 -> 2 x 1; frames 2 x 2 -> 2 x 1 -> kept
    "max-12-22": ("max", [(1, 2), (2, 2)], [0, 1], 1),
}


def check_static(model, ref_model, case: Case, spec) -> None:
    pooling, kernels, after, min_grid = spec
    compressor = tc.StaticPyramid(
        after_layers=after, kernels=kernels, pooling=pooling, min_grid_tokens=min_grid
    )
    compress_eval(model, compressor)
    logits = forward(model, case)
    layers = [a + 1 for a in after]
    stages = stages_for(model, compressor, layers, case.rows)
    expected = reference(ref_model, case, stages)
    check_stats(model, case, layers, kernels_of(stages), min_grid, expected)
    assert tc.stats(model).prefill.decisions == {}
    assert torch.equal(expected.text, case.text)
    assert logits.shape == expected.logits.shape
    assert_close_at(logits, expected.logits, case.text, atol=REF_ATOL)


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("spec", list(STATIC))
@pytest.mark.parametrize("family", FAMILIES)
def test_static_equals_reference(family, spec, implementation, batch):
    """At every real text (and newline) position; b3: a padded batch of one, two and no images (OneVision: an
    image and a video), right padding for the codebase (its tokenizer default), left for NeXT."""
    model, ref_model = fresh_model(family, implementation), fresh_model(family, implementation)
    case = make_case(family, model, batch)
    check_layout_matches_the_model(ref_model, case)
    check_static(model, ref_model, case, STATIC[spec])


@pytest.mark.parametrize("family", ["llava", "mgm", "mgm_hd"])
def test_static_left_padding_splice(family):
    """The splice re-pads on the left (tokenizer_padding_side="left"): pooled positions follow."""
    model, ref_model = fresh_model(family, "sdpa", "left"), fresh_model(family, "sdpa", "left")
    case = make_case(family, model, "b3", "left")
    assert not case.layout.real[:, 0].all()
    check_layout_matches_the_model(ref_model, case)
    check_static(model, ref_model, case, STATIC["max-12-22"])


@pytest.mark.parametrize("kernel", [(2, 2), (1, 2)])
@pytest.mark.parametrize("family", NEXT_FAMILIES)
def test_newlines_stay_between_pooled_rows(family, kernel):
    """By hand: after one stage, a sample's tokens are its text and newline tokens, each where it was, and one
    pooled token per window at the position of the window's top-left cell (its first member). So the newlines of
    a crop grid stay between the pooled rows, not after the grid."""
    model = fresh_model(family)
    case = make_case(family, model, "b3")
    compress_eval(model, tc.StaticPyramid(after_layers=[0], kernels=kernel, pooling="avg", min_grid_tokens=4))
    forward(model, case)
    stats = tc.stats(model).prefill.layers[1]
    kh, kw = kernel
    between = 0
    for b in range(case.rows):
        at = {cell: position for position, cell in case.layout.cells[b].items()}
        expected = torch.nonzero(case.text[b]).flatten().tolist()
        for g, (rows, cols) in enumerate(case.layout.grids[b]):
            if rows * cols < 4 or rows < kh or cols < kw:
                expected += [at[(g, r, c)] for r in range(rows) for c in range(cols)]
                continue
            tops = [at[(g, r * kh, c * kw)] for r in range(rows // kh) for c in range(cols // kw)]
            expected += tops
            newlines = torch.nonzero(case.newline[b]).flatten().tolist()
            between += sum(min(tops) < n < max(tops) for n in newlines)
        assert stats.kept_positions(b) == sorted(expected)
    assert between > 0, "no newline lies between the pooled tokens of a grid: the check would be vacuous"


@pytest.mark.parametrize("family", ["llava_next", "llava"])
def test_reference_is_not_vacuous(family):
    """Pooling changes the text logits, and so do positions other than the floor of the mean, so the comparisons
    above would notice an engine that pooled nothing or misplaced the pooled tokens' positions."""
    model = fresh_model(family)
    case = make_case(family, model, "b3")
    stages = stages_for(model, pyramid("static"), [1, 3], case.rows)
    pooled = reference(model, case, stages)
    first = PoolingReference(model, positions="first").run(case.ref_inputs, stages, layout=case.layout)
    plain = forward(model, case)
    where = case.text & case.visual.any(1, keepdim=True)
    assert (pooled.logits - plain)[where].abs().max() > 1e-2
    assert (pooled.logits - first.logits)[where].abs().max() > 1e-3
    identity = reference(model, case, [Stage(layer=1, kernels=[(1, 1)] * case.rows)])
    assert_close_at(identity.logits, plain, case.text, atol=1e-5)


# -- 3. DPN equals the reference -----------------------------------------------------------------------------

# The seeds of `tune_routers` under which the samples with media of batch "b3" choose different experts at both
# stages and use every expert (checked: `mixed_experts`), and every sample with media of "b3" and "b1" gets a
# probability below 0.99, for max, avg and conv pooling; found by trying seeds.
ROUTER_SEEDS = {"llava_next": 24, "llava_onevision": 1, "llava": 3, "mgm": 0, "mgm_hd": 1, "llava_hr": 7}


def run_dpn(family: str, implementation: str, batch: str, pooling: str):
    model, ref_model = fresh_model(family, implementation), fresh_model(family, implementation)
    case = make_case(family, model, batch)
    compressor = compress_eval(model, dpn(pooling))
    tune_routers(compressor, ROUTER_SEEDS[family])
    logits = forward(model, case)
    return model, ref_model, case, compressor, logits


def check_dpn(model, ref_model, case: Case, compressor, logits) -> None:
    layers = [a + 1 for a in compressor.after_layers]
    stages = stages_for(model, compressor, layers, case.rows)
    expected = reference(ref_model, case, stages)
    check_routing(compressor, model, expected, layers)
    check_stats(model, case, layers, kernels_of(stages), compressor.min_grid_tokens, expected)
    # every sample with media is scaled far from 1, so a missing multiplication would show
    media = [bool(cells) for cells in case.layout.cells]
    assert all(0 < p < 0.99 for stage in stages for p, m in zip(stage.scales, media, strict=True) if m)
    assert_close_at(logits, expected.logits, case.text, atol=REF_ATOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("pooling", ["max", "avg", "conv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dpn_equals_reference(family, pooling, implementation):
    """DPN in eval: each sample pooled by its argmax expert (the samples of the padded batch choose different
    experts), its visual tokens scaled by that expert's probability; newlines neither pooled nor scaled."""
    model, ref_model, case, compressor, logits = run_dpn(family, implementation, "b3", pooling)
    mixed_experts(case, stages_for(model, compressor, [1, 3], case.rows))
    check_dpn(model, ref_model, case, compressor, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpn_routing_token_with_labels(family):
    """With labels, the routing token is the one before the first supervised label, in the sequence the decoder
    runs on (codebase: the spliced one, which the caller's labels do not index): each row's last token is
    supervised, so its second-to-last real (text) token routes; experts and probabilities at both stages are
    the routers' on the reference's hidden states there."""
    model, ref_model = fresh_model(family), fresh_model(family)
    case = make_case(family, model, "b3")
    ids, mask = case.inputs["input_ids"], case.inputs["attention_mask"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b in range(case.rows):
        last = int(torch.nonzero(mask[b]).max())
        labels[b, last] = ids[b, last]
    compressor = compress_eval(model, dpn("max"))
    tune_routers(compressor, ROUTER_SEEDS[family])
    with torch.no_grad():
        out = model(**case.inputs, labels=labels)
    assert out.loss is not None and out.routing_loss is not None
    layers = [a + 1 for a in compressor.after_layers]
    stages = stages_for(model, compressor, layers, case.rows)
    routing = [int(torch.nonzero(case.layout.real[b]).max()) - 1 for b in range(case.rows)]
    assert case.text[torch.arange(case.rows), torch.tensor(routing)].all()
    expected = PoolingReference(ref_model).run(case.ref_inputs, stages, routing=routing, layout=case.layout)
    check_routing(compressor, model, expected, layers)
    assert_close_at(out.logits, expected.logits, case.text, atol=REF_ATOL)
    # the check tells the tokens apart: at the last real token (the routing token without labels) the first
    # stage's router gives other probabilities
    last = [int(torch.nonzero(case.layout.real[b]).max()) for b in range(case.rows)]
    plain = PoolingReference(ref_model).run(case.ref_inputs, stages[:1], routing=last, layout=case.layout)
    with torch.no_grad():
        labelled = router_by_hand(compressor.routers[0], expected.routing[layers[0]], TEMPERATURE)
        unlabelled = router_by_hand(compressor.routers[0], plain.routing[layers[0]], TEMPERATURE)
    assert (labelled - unlabelled).abs().max() > 1e-3


@pytest.mark.parametrize("family", NEXT_FAMILIES)
def test_next_right_padding(family):
    """Right-padded NeXT / OneVision inputs: StaticPyramid and a DPN whose samples choose different experts."""
    model, ref_model = fresh_model(family), fresh_model(family)
    case = make_case(family, model, "b3", "right")
    assert not case.layout.real[:, -1].all()
    check_static(model, ref_model, case, STATIC["max-12-22"])
    model = fresh_model(family)
    case = make_case(family, model, "b3", "right")
    compressor = compress_eval(model, dpn("avg"))
    tune_routers(compressor, ROUTER_SEEDS[family])
    logits = forward(model, case)
    mixed_experts(case, stages_for(model, compressor, [1, 3], case.rows))
    check_dpn(model, ref_model, case, compressor, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpn_batch_1(family):
    model, ref_model, case, compressor, logits = run_dpn(family, "sdpa", "b1", "max")
    check_dpn(model, ref_model, case, compressor, logits)


# -- 4. decode steps -----------------------------------------------------------------------------------------


def extended(ref_model, case: Case, out) -> tuple[dict[str, torch.Tensor], Layout, int]:
    """The reference's inputs over prompt + generated tokens (at generate's positions), their layout, and the
    prompt's length in the sequence the decoder runs on."""
    if case.family in NEXT_FAMILIES:
        prompt = {k: v for k, v in case.inputs.items() if k != "position_ids"}
        full = extend(prompt, out.sequences)
        full["position_ids"] = generation_positions(full["attention_mask"])
        length = case.inputs["input_ids"].shape[1]
    elif case.family == "llava_hr":  # generate returns prompt + new ids; HR re-splices them (batch 1)
        full = {**case.inputs, "input_ids": out.sequences, "attention_mask": torch.ones_like(out.sequences)}
        length = case.layout.real.shape[1]
    else:  # generate ran on the spliced embeddings: it returns the new tokens only
        ids, mask = case.inputs["input_ids"], case.inputs["attention_mask"]
        with torch.no_grad():
            _, _, spliced_mask, _, embeds, _ = getattr(ref_model, SPLICE)(
                ids, None, mask, None, None, **media(case.inputs)
            )
            new = ref_model.get_model().embed_tokens(out.sequences)
        assert torch.equal(spliced_mask.bool(), case.layout.real)
        full_mask = torch.cat([spliced_mask.long(), torch.ones_like(out.sequences)], dim=1)
        full = {
            "inputs_embeds": torch.cat([embeds, new], dim=1),
            "attention_mask": full_mask,
            "position_ids": generation_positions(full_mask),
        }
        length = embeds.shape[1]
    new = torch.ones(case.rows, len(out.logits), dtype=torch.bool)
    real = torch.cat([case.layout.real, new], dim=1)
    return full, Layout(real, case.layout.cells, case.layout.grids), length


# NeXT and OneVision: a left-padded batch; the codebase: left padding (batched generate is exact there) and right
# padding (the default) with batch 1; LLaVA-HR: batch 1 (its decode step attends padding)
GREEDY = [
    ("llava_next", "b3", "left"),
    ("llava_onevision", "b3", "left"),
    ("llava", "b3", "left"),
    ("llava", "b1", "right"),
    ("mgm_hd", "b3", "left"),
    ("llava_hr", "b1", "right"),
]


@pytest.mark.parametrize("kind", ["static", "dpn"])
@pytest.mark.parametrize("family,batch,side", GREEDY)
def test_cache_greedy(family, batch, side, kind):
    """Every decode step's logits with the pooled cache equal the reference over prompt + generated tokens, with
    the prefill's pooling (its kernels, DPN's experts and probabilities), at generate's positions."""
    new_tokens = 5
    model, ref_model = fresh_model(family, "sdpa", side), fresh_model(family, "sdpa", side)
    case = make_case(family, model, batch, side)
    compressor = attach(model, kind, family)
    out = greedy(model, case, new_tokens)
    assert len(out.logits) == new_tokens
    layers = [a + 1 for a in compressor.after_layers]
    stages = stages_for(model, compressor, layers, case.rows)
    check_stats(model, case, layers, kernels_of(stages), compressor.min_grid_tokens)
    full, layout, prompt = extended(ref_model, case, out)
    expected = reference(ref_model, case, stages, inputs=full, layout=layout)
    everywhere = torch.ones(case.rows, dtype=torch.bool)
    for step, logits in enumerate(out.logits):  # step t predicts from position prompt - 1 + t
        assert_close_at(logits, expected.logits[:, prompt - 1 + step], everywhere, REF_ATOL)
    # the cache holds the pooled tokens: all entries before the first stage, fewer after the last (a row that
    # chose the (1, 1) expert keeps its length until a later stage pools it)
    held = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert tc.stats(model).kv_cache_entries == held
    total = prompt + new_tokens - 1
    assert held[: layers[0]] == [total] * layers[0]
    assert held[layers[-1]] < total


# -- 5. accounting -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["static", "dpn"])
@pytest.mark.parametrize("family", ["llava_next", "llava"])
def test_flops_match_counter(family, kind):
    """The stats' analytic FLOPs (prefill, its uncompressed baseline, a decode step on the pooled cache) agree
    with torch's FLOP counter within 2%; DPN's router matmuls are the stats' extra_flops (the counter sees them:
    they run inside the decoder). The codebase counts the decoder (`model.model`, whose forward runs after the
    splice) and the LM head."""
    model = fresh_model(family)
    case = make_case(family, model, "b3")
    if family in NEXT_FAMILIES:
        measure = measure_flops
        prompt_mask = case.inputs["attention_mask"]

        def decode_positions(mask):
            return generation_positions(mask)[:, -1:]
    else:
        root = type(model).__name__
        measure = functools.partial(measure_flops, modules=(f"{root}.model", f"{root}.lm_head"))
        prompt_mask = case.layout.real.long()  # the spliced mask (right padding)

        def decode_positions(mask):
            return prompt_mask.sum(1, keepdim=True)

    bare, _ = measure(lambda: model(**case.inputs))
    compressor = pyramid(kind)
    with tc.compressed(model, compressor):
        model.eval()
        if kind == "dpn":
            tune_routers(compressor, ROUTER_SEEDS[family])
        prefill, out = measure(lambda: model(**case.inputs, use_cache=True))
        stats = tc.stats(model).prefill
        assert_flops_close(stats.flops, prefill)
        assert_flops_close(stats.baseline_flops, bare)
        assert prefill < 0.9 * bare
        hidden = model.config.get_text_config().hidden_size
        if kind == "dpn":
            router = 2 * case.rows * (hidden * (hidden // 4) + (hidden // 4) * len(EXPERTS))
            assert stats.extra_flops == 2 * router
        else:
            assert stats.extra_flops == 0
        step = torch.full((case.rows, 1), 9)
        mask = torch.cat([prompt_mask, torch.ones_like(step)], dim=1)
        decode_inputs = {
            "input_ids": step,
            "attention_mask": mask,
            "position_ids": decode_positions(mask),
            "past_key_values": out.past_key_values,
        }
        decode, _ = measure(lambda: model(**decode_inputs, use_cache=True))
        last = tc.stats(model).last
        assert last.kind == "decode"
        assert_flops_close(last.flops, decode)
