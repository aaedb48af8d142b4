"""MustDrop's `budget` (a layer average of visual tokens), the vision encoder's FLOPs and the per-stage token
report, on a tiny model with LLaVA-1.5's geometry: 336 px images of 14 px patches (24 x 24 = 576 visual tokens)
and 32 decoder layers, so the authors' filter layers 2, 6, 10, 14 apply unscaled.

The budget's average credits each decoder layer with the visual tokens it passes on (layer l with what layer
l + 1 processed, the last layer with its own). With M tokens entering the first filter and M_k kept by stage k,
for LLaVA-1.5 that is

    (2 M + 4 M1 + 4 M2 + 4 M3 + 18 M4) / 32,

and the counts are recomputed here from the rule, by brute force over every value of the decay ratio where a
count changes, not by the library's bisection. The encoder's FLOPs are compared with torch's FlopCounterMode
over the CLIP encoder layers and with a hand count of what those layers ran on.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import SDPA_CPU, assert_flops_close, assert_untouched, forward_hooks, measure_flops
from torch.utils.flop_counter import FlopCounterMode

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs

LAYERS = 32
IMAGE_SIZE, PATCH = 336, 14
SIDE = IMAGE_SIZE // PATCH  # 24
PER_IMAGE = SIDE * SIDE  # 576
FILTERS = [2, 6, 10, 14]  # the authors' filter layers of 32 (0-based; each stage acts before the next layer)
KEY_RATIO = 0.08
WINDOW = 3
MERGE_THRESHOLD = 0.8
BUDGETS = (192, 128, 64)
# (prefix, suffix) text lengths and images per sample
BATCHES = {"b1": ([(3, 5)], [1]), "b2": ([(3, 5), (9, 2)], [1, 1])}
# merge batch: per sample, how many rows of 3 x 3 windows (from the top) have one color per window
UNIFORM_WINDOW_ROWS = (4, 2)


# -- model, inputs ---------------------------------------------------------------------------------------------


@functools.cache
def _pristine() -> torch.nn.Module:
    return tiny_llava(
        hidden=32,
        layers=LAYERS,
        heads=2,
        kv_heads=1,
        intermediate=64,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        vision_hidden=16,
    )


def fresh_model() -> torch.nn.Module:
    return copy.deepcopy(_pristine())


def make_inputs(model, batch: str, padding_side: str = "left") -> dict[str, torch.Tensor]:
    lengths, images = BATCHES[batch]
    return tiny_llava_inputs(model, lengths, images, seed=1, padding_side=padding_side)


def merge_inputs(model, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Two samples of one image each; in image b the top UNIFORM_WINDOW_ROWS[b] rows of 3 x 3 patch windows are
    one color per window (42 x 42 px blocks), the rest random noise."""
    inputs = make_inputs(model, "b2", padding_side)
    generator = torch.Generator().manual_seed(3)
    pixels = inputs["pixel_values"].clone()
    block, per_side = WINDOW * PATCH, SIDE // WINDOW
    for b, rows in enumerate(UNIFORM_WINDOW_ROWS):
        colors = torch.rand(3, rows, per_side, generator=generator) * 2 - 1
        pixels[b, :, : rows * block] = colors.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return {**inputs, "pixel_values": pixels}


def image_tokens(inputs) -> list[int]:
    return ((inputs["input_ids"] == IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()).sum(1).tolist()


def run(model, inputs, compressor):
    tc.compress(model, compressor)
    with torch.no_grad():
        logits = model(**inputs).logits
    return tc.stats(model).prefill, logits


# -- hand computations ---------------------------------------------------------------------------------------------


def merged_windows_by_hand(pixel_values: torch.Tensor) -> list[int]:
    """Per image: how many 3 x 3 patch windows an uncompressed CLIP leaves with mean pairwise cosine similarity
    (self-pairs excluded) >= MERGE_THRESHOLD after its first layer; asserts no window is within 1e-3 of it."""
    tower = fresh_model().model.vision_tower
    with torch.no_grad():
        states = tower(pixel_values, output_hidden_states=True).hidden_states[1][
            :, 1:
        ]  # after layer 0, no CLS
    per_side = SIDE // WINDOW
    counts = []
    for image in states:
        grid = image.reshape(per_side, WINDOW, per_side, WINDOW, -1).permute(0, 2, 1, 3, 4)
        unit = F.normalize(grid.reshape(per_side * per_side, WINDOW * WINDOW, -1).double(), dim=-1)
        similarity = unit @ unit.transpose(1, 2)
        pairs = WINDOW * WINDOW * (WINDOW * WINDOW - 1)
        mean = (similarity.sum((1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(1)) / pairs
        assert (mean - MERGE_THRESHOLD).abs().min() > 1e-3, "a window sits on the threshold"
        counts.append(int((mean >= MERGE_THRESHOLD).sum()))
    return counts


def tokens_after_merge(pixel_values: torch.Tensor) -> list[int]:
    """Per image: 576 patches, less 8 for every merged 3 x 3 window."""
    return [PER_IMAGE - (WINDOW * WINDOW - 1) * n for n in merged_windows_by_hand(pixel_values)]


def counts_by_hand(m: int, budget: float, after=FILTERS, layers: int = LAYERS) -> list[int]:
    """The tokens kept by each filter stage for a sample with m tokens entering the first filter.

    K = ceil(0.08 m) key tokens; M_k = K + floor((m - K) r^k + 0.5) for the largest r in [0, 1] with
    a_1 m + sum_k w_k M_k <= budget x L (w_k = a_{k+1} - a_k, w_S = L - a_S). The counts only change where some
    (m - K) r^k crosses j - 1/2, so every r between two consecutive such points gives the same counts: scan the
    midpoints in increasing order. When even M_k = K overshoots: every stage keeps
    min(K, max(1, floor((budget x L - a_1 m) / sum w))).
    """
    k = min(math.ceil(KEY_RATIO * m - 1e-9), m)
    weights = [b - a for a, b in zip(after, [*after[1:], layers], strict=True)]
    target = budget * layers - after[0] * m
    stages = range(1, len(after) + 1)

    def counts(r: float) -> list[int]:
        return [k + math.floor((m - k) * r**s + 0.5) for s in stages]

    def cost(c: list[int]) -> int:
        return sum(w * x for w, x in zip(weights, c, strict=True))

    if k * sum(weights) > target:
        return [min(k, max(1, math.floor(target / sum(weights))))] * len(after)
    if cost(counts(1.0)) <= target:
        return counts(1.0)
    points = {0.0, 1.0} | {((j - 0.5) / (m - k)) ** (1 / s) for s in stages for j in range(1, m - k + 1)}
    ordered = sorted(points)
    best = counts(0.0)
    for low, high in zip(ordered, ordered[1:], strict=False):
        c = counts((low + high) / 2)
        if cost(c) > target:
            break
        best = c
    return best


def average_by_hand(m: int, stage_counts: list[int], after=FILTERS, layers: int = LAYERS) -> float:
    """(a_1 M + sum_k w_k M_k) / L; for LLaVA-1.5 (2 M + 4 M1 + 4 M2 + 4 M3 + 18 M4) / 32."""
    weights = [b - a for a, b in zip(after, [*after[1:], layers], strict=True)]
    return (after[0] * m + sum(w * c for w, c in zip(weights, stage_counts, strict=True))) / layers


def passed_on_from_layers(prefill) -> list[float]:
    """Per sample, from the per-layer counts: layer l credited with what layer l + 1 processed, the last layer
    with its own, averaged over the layers."""
    per_layer = [layer.visual for layer in prefill.layers]
    credited = [per_layer[min(index + 1, len(per_layer) - 1)] for index in range(len(per_layer))]
    return [sum(column) / len(credited) for column in zip(*credited, strict=True)]


def processed_from_layers(prefill) -> list[float]:
    per_layer = [layer.visual for layer in prefill.layers]
    return [sum(column) / len(per_layer) for column in zip(*per_layer, strict=True)]


def check_budget(prefill, entering: list[int], budget: float, input_counts: list[int], vision_stage: bool):
    """The per-layer counts are the rule's (by hand, per sample), and the passed-on average is the budget's."""
    assert len(prefill.layers) == LAYERS
    expected = [counts_by_hand(m, budget) for m in entering]
    stages = prefill.tokens_per_stage()
    for index, layer in enumerate(prefill.layers):
        for b, m in enumerate(entering):
            if index == 0:
                want = input_counts[b]  # layer 0 runs on one copy per patch; the vision stage merges after it
            elif index <= FILTERS[0]:
                want = m
            else:
                want = expected[b][sum(index > a for a in FILTERS) - 1]
            assert layer.visual[b] == want, f"layer {index}, sample {b}"
    for s, after in enumerate(FILTERS):
        assert stages[f"layer {after + 1}"] == [counts[s] for counts in expected]
    if not vision_stage:
        assert entering == input_counts
    averages = passed_on_from_layers(prefill)
    for b, m in enumerate(entering):
        assert averages[b] == pytest.approx(average_by_hand(m, expected[b]))
        assert budget - 1 < averages[b] <= budget, (averages[b], budget)
    assert prefill.average_visual_tokens("passed_on") == pytest.approx(averages)
    processed = prefill.average_visual_tokens("processed")
    assert processed == pytest.approx(processed_from_layers(prefill))
    assert all(p >= q for p, q in zip(processed, averages, strict=True))
    return expected


# -- 1. the budget -------------------------------------------------------------------------------------------------


def test_counts_by_hand_examples():
    """The hand rule on numbers worked out on paper: 576 tokens entering, K = ceil(46.08) = 47."""
    # budget 64: even the keys alone overshoot (47 x 30 > 64 x 32 - 2 x 576 = 896): floor(896 / 30) = 29 each
    assert counts_by_hand(576, 64) == [29] * 4
    assert average_by_hand(576, [29] * 4) == (2 * 576 + 30 * 29) / 32
    # a budget of every token keeps every token; one just below it drops some at the last stage only
    assert counts_by_hand(576, 576) == [576] * 4
    assert counts_by_hand(576, 575.5)[:3] == [576] * 3 and counts_by_hand(576, 575.5)[3] < 576
    for budget in (192, 128, 100):
        counts = counts_by_hand(576, budget)
        assert counts == sorted(counts, reverse=True) and counts[-1] >= 47
        assert budget - 1 < average_by_hand(576, counts) <= budget


@pytest.mark.parametrize("batch", ["b1", "b2-left", "b2-right"])
@pytest.mark.parametrize("vision_stage", [False, True])
@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_met_on_llava15_geometry(budget, vision_stage, batch):
    """MustDrop(budget=B): each stage keeps the rule's count per sample and the layer average of visual tokens,
    each layer credited with the tokens it passes on, (2 M + 4 M1 + 4 M2 + 4 M3 + 18 M4) / 32, is B within one
    token (never above); random pixels: the vision stage merges nothing (M = 576). The default schedule is the
    authors' 2, 6, 10, 14 with the vision stage on or off."""
    name, _, padding_side = batch.partition("-")
    model = fresh_model()
    inputs = make_inputs(model, name, padding_side or "left")
    compressor = tc.MustDrop(budget=budget, vision_stage=vision_stage)
    prefill, _ = run(model, inputs, compressor)
    assert compressor.after == FILTERS
    counts = image_tokens(inputs)
    assert counts == [PER_IMAGE] * len(counts)
    check_budget(prefill, counts, budget, counts, vision_stage)
    assert list(prefill.tokens_per_stage()) == [
        "input",
        *(["vision encoder", "layer 1"] if vision_stage else []),
        *(f"layer {a + 1}" for a in FILTERS),
    ]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("budget", [192, 128])
def test_budget_met_after_vision_stage_merges(budget, padding_side):
    """Uniform 42 px blocks: the vision stage merges whole 3 x 3 windows (M < 576, different per sample); the
    counts follow the rule with that M (and K = ceil(0.08 M)), and the budget is still met."""
    model = fresh_model()
    inputs = merge_inputs(model, padding_side)
    entering = tokens_after_merge(inputs["pixel_values"])
    assert entering == [PER_IMAGE - 8 * 8 * rows for rows in UNIFORM_WINDOW_ROWS]  # only the uniform windows
    prefill, _ = run(model, inputs, tc.MustDrop(budget=budget))
    assert prefill.tokens_per_stage()["vision encoder"] == entering
    assert all(m < PER_IMAGE for m in entering) and entering[0] != entering[1]
    expected = check_budget(prefill, entering, budget, image_tokens(inputs), vision_stage=True)
    assert expected[0] != expected[1]


# -- 2. encoder FLOPs ----------------------------------------------------------------------------------------------


def encoder_layer_names(model) -> list[str]:
    """The FLOP counter's names of the CLIP encoder layers."""
    prefix = type(model).__name__
    names = [
        f"{prefix}.{name}"
        for name, _ in model.named_modules()
        if re.fullmatch(r".*vision_tower\.encoder\.layers\.\d+", name)
    ]
    assert len(names) == model.config.vision_config.num_hidden_layers
    return names


def clip_layer_flops(model, rows: int, tokens: int) -> int:
    """One CLIP layer, matrix multiplications only: q, k, v, out (4 h^2), fc1 and fc2 (2 h i) per token, and
    attention scores and values (2 x tokens^2 x h) per row, each multiply-add 2 FLOPs."""
    config = model.config.vision_config
    h, i = config.hidden_size, config.intermediate_size
    return 2 * rows * tokens * (4 * h * h + 2 * h * i) + 2 * 2 * rows * tokens * tokens * h


def key_scoring_flops(model, rows: int, tokens: int) -> int:
    """MustDrop's key tokens at the last encoder layer: k projection of every token, q of the CLS token, and the
    CLS row of scores (one query against `tokens` keys)."""
    h = model.config.vision_config.hidden_size
    return 2 * rows * (tokens + 1) * h * h + 2 * rows * tokens * h


def flops_by_module(fn) -> dict[str, int]:
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_CPU)
    with torch.no_grad(), counter:
        fn()
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def test_encoder_flops_uncompressed_encoder():
    """An encoder the pipeline does not shorten (FastV; MustDrop on pixels where nothing merges) is counted as it
    ran: every layer on 577 tokens (== baseline), plus MustDrop's key-token scoring; within 2 % of the counter."""
    model = fresh_model()
    inputs = make_inputs(model, "b2")
    names = encoder_layer_names(model)
    bare, _ = measure_flops(lambda: model(**inputs), names)
    full = len(names) * clip_layer_flops(model, rows=2, tokens=1 + PER_IMAGE)
    assert_flops_close(full, bare)
    for compressor in (tc.FastV(layer=1, keep=0.5), tc.MustDrop(budget=128)):
        with tc.compressed(model, compressor):
            measured, _ = measure_flops(lambda: model(**inputs), names)
            prefill = tc.stats(model).prefill
            scoring = key_scoring_flops(model, 2, 1 + PER_IMAGE) if isinstance(compressor, tc.MustDrop) else 0
            assert prefill.encoder_flops == full + scoring
            assert prefill.baseline_encoder_flops == full
            assert_flops_close(prefill.encoder_flops, measured)
            assert_flops_close(prefill.baseline_encoder_flops, bare)
            assert prefill.total_flops == prefill.flops + full + scoring
            assert prefill.baseline_total_flops == prefill.baseline_flops + full


def test_encoder_flops_with_merges():
    """Two images with different merge counts: layer 0 runs on 577 tokens, layer 1 on 1 + the longer image's merged
    tokens for both rows (padded rows are counted as run); within 2 % of the counter on the compressed run, the
    baseline within 2 % of the bare run; total FLOPs (decoder, LM head, encoder) within 2 % of the counter."""
    model = fresh_model()
    inputs = merge_inputs(model)
    names = encoder_layer_names(model)
    prefix = type(model).__name__
    decoder = [f"{prefix}.model.language_model", f"{prefix}.lm_head"]
    bare, _ = measure_flops(lambda: model(**inputs), names)
    entering = tokens_after_merge(inputs["pixel_values"])
    assert entering[0] != entering[1]
    with tc.compressed(model, tc.MustDrop(budget=128)):
        counts = flops_by_module(lambda: model(**inputs))
        prefill = tc.stats(model).prefill
    encoder = sum(counts[name] for name in names)
    expected = (
        clip_layer_flops(model, 2, 1 + PER_IMAGE)
        + clip_layer_flops(model, 2, 1 + max(entering))
        + key_scoring_flops(model, 2, 1 + max(entering))
    )
    assert prefill.encoder_flops == expected
    assert prefill.encoder_flops < prefill.baseline_encoder_flops
    assert prefill.baseline_encoder_flops == 2 * clip_layer_flops(model, 2, 1 + PER_IMAGE)
    assert_flops_close(prefill.encoder_flops, encoder)
    assert_flops_close(prefill.baseline_encoder_flops, bare)
    assert encoder < 0.9 * bare
    assert_flops_close(prefill.total_flops, encoder + sum(counts[name] for name in decoder))
    assert prefill.baseline_total_flops == prefill.baseline_flops + prefill.baseline_encoder_flops


# -- 3. tokens per stage -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vision_stage", [True, False])
def test_tokens_per_stage_and_report(vision_stage):
    """tokens_per_stage(): "input" (the prompt's placeholders), "vision encoder" (the merged count, where the
    vision stage ran) and "layer k" per acting layer, each the count decoder layer k processed; between acting
    layers the counts stay. str(stats) lists them and the vision encoder's FLOPs."""
    model = fresh_model()
    inputs = merge_inputs(model)
    prefill, _ = run(model, inputs, tc.MustDrop(budget=128, vision_stage=vision_stage))
    stages = prefill.tokens_per_stage()
    acting = ([1] if vision_stage else []) + [a + 1 for a in FILTERS]
    merged = tokens_after_merge(inputs["pixel_values"])
    assert list(stages) == [
        "input",
        *(["vision encoder"] if vision_stage else []),
        *(f"layer {k}" for k in acting),
    ]
    assert stages["input"] == image_tokens(inputs) == [PER_IMAGE, PER_IMAGE]
    assert prefill.layers[0].visual == stages["input"]
    for k in acting:
        assert stages[f"layer {k}"] == prefill.layers[k].visual
        assert all(a > b for a, b in zip(prefill.layers[k - 1].visual, prefill.layers[k].visual, strict=True))
    for index in range(1, LAYERS):
        if index not in acting:
            assert prefill.layers[index].visual == prefill.layers[index - 1].visual, f"layer {index}"
    text = str(tc.stats(model))
    assert (
        f"vision encoder: {prefill.encoder_flops / 1e9:.3f} GFLOPs vs "
        f"{prefill.baseline_encoder_flops / 1e9:.3f} uncompressed"
    ) in text
    assert f"visual tokens, input: {[PER_IMAGE, PER_IMAGE]}" in text
    for k in acting:
        assert f"visual tokens, layer {k}: {stages[f'layer {k}']}" in text
    if vision_stage:
        assert stages["vision encoder"] == merged == prefill.layers[1].visual
        assert f"visual tokens, vision encoder: {merged}" in text
        assert prefill.encoder_flops < prefill.baseline_encoder_flops
    else:
        assert "visual tokens, vision encoder" not in text
        assert prefill.encoder_flops == prefill.baseline_encoder_flops > 0


# -- 4. bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"keep": 0.5, "budget": 128}, ValueError, r"give keep .* or budget .*, not both"),
        ({"keep": 64, "budget": 64.0}, ValueError, r"not both"),
        ({"budget": 0}, ValueError, r"budget must be a positive, finite number of tokens, got 0"),
        ({"budget": -12.5}, ValueError, r"budget must be a positive, finite number of tokens, got -12\.5"),
        ({"budget": True}, ValueError, r"budget must be a positive, finite number of tokens, got True"),
        ({"budget": False}, ValueError, r"budget must be a positive, finite number of tokens, got False"),
        ({"budget": "128"}, ValueError, r"budget must be a positive, finite number of tokens, got '128'"),
        ({"merge_window": 1}, ValueError, r"merge_window must be an int >= 2, got 1"),
        ({"merge_window": 0}, ValueError, r"merge_window must be an int >= 2, got 0"),
        ({"merge_window": 3.0}, ValueError, r"merge_window must be an int >= 2, got 3\.0"),
        ({"merge_window": True}, ValueError, r"merge_window must be an int >= 2, got True"),
        ({"merge_threshold": 1.01}, ValueError, r"merge_threshold must be in \[-1, 1\], got 1\.01"),
        ({"merge_threshold": -1.5}, ValueError, r"merge_threshold must be in \[-1, 1\], got -1\.5"),
        ({"merge_threshold": float("nan")}, ValueError, r"merge_threshold must be in \[-1, 1\]"),
        ({"merge_threshold": True}, ValueError, r"merge_threshold must be in \[-1, 1\]"),
        (
            {"vision_stage": False, "prefill_stage": False},
            ValueError,
            r"both off; nothing would be compressed",
        ),
        ({"vision_stage": 1}, TypeError, r"vision_stage must be True or False, got 1"),
        ({"prefill_stage": None}, TypeError, r"prefill_stage must be True or False, got None"),
        ({"filter_layers": [0, 4]}, ValueError, r"filter_layers=\[0, 4\] starts at 0.*vision_stage=False"),
        ({"filter_layers": [0], "budget": 64}, ValueError, r"starts at 0, where the vision stage merges"),
    ],
)
def test_invalid_configuration(kwargs, error, match):
    """Rejected at construction, by the class, by name and from a saved config alike."""
    with pytest.raises(error, match=match):
        tc.MustDrop(**kwargs)
    with pytest.raises(error, match=match):
        tc.build("mustdrop", **kwargs)
    with pytest.raises(error, match=match):
        tc.Compressor.from_dict({"name": "mustdrop", **kwargs})


@pytest.mark.parametrize("budget", [float("nan"), float("inf")])
def test_non_finite_budget_rejected(budget):
    """A NaN budget is not a number of tokens (it used to pass `budget <= 0` and keep just the key tokens); an
    infinite one asks for nothing."""
    with pytest.raises(ValueError, match="budget must be a positive, finite number of tokens"):
        tc.MustDrop(budget=budget)


@pytest.mark.parametrize("setting", [{"budget": 128}, {"keep": 0.5}])
def test_counts_need_the_prefill_stage(setting):
    """keep and budget set the filter stages' counts; without the prefill stage they would be silently ignored."""
    with pytest.raises(ValueError, match="need prefill_stage=True"):
        tc.MustDrop(prefill_stage=False, **setting)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"merge_threshold": -1},
        {"merge_threshold": 1.0},
        {"merge_window": 2},
        {"budget": 0.5},
        {"budget": 128, "filter_layers": [0, 4], "vision_stage": False},
        {"vision_stage": False},
        {"prefill_stage": False},
    ],
)
def test_boundary_configurations_accepted(kwargs):
    compressor = tc.MustDrop(**kwargs)
    assert all(
        getattr(compressor, key) == (tuple(v) if isinstance(v, list) else v) for key, v in kwargs.items()
    )


def test_schedule_outside_model_rejected_at_compress_time_model_untouched():
    """A budget with a filter layer past L - 2: a clear error from compress, the model unchanged and usable."""
    model = fresh_model()
    inputs = make_inputs(model, "b1")
    with torch.no_grad():
        expected = model(**inputs).logits  # transformers installs its own hooks on the first forward
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = forward_hooks(model)
    with pytest.raises(ValueError, match=r"filter_layers=\[2, 31\] is outside this model; allowed 0\.\.30"):
        tc.compress(model, tc.MustDrop(budget=128, filter_layers=[2, 31]))
    assert_untouched(model, state, hooks)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_unknown_average_convention():
    model = fresh_model()
    prefill, _ = run(model, make_inputs(model, "b1"), tc.MustDrop(budget=128))
    with pytest.raises(ValueError, match=r"convention must be 'processed' or 'passed_on', got 'x'"):
        prefill.average_visual_tokens(convention="x")
    assert prefill.average_visual_tokens() == prefill.average_visual_tokens("processed")


# -- 5. serialisation ----------------------------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip():
    compressor = tc.MustDrop(
        filter_layers=[1, 5, 9],
        budget=96.5,
        key_ratio=0.1,
        vision_stage=True,
        merge_threshold=-0.25,
        merge_window=2,
        prefill_stage=True,
        decode_stage=False,
    )
    data = json.loads(json.dumps(compressor.to_dict()))
    assert data == {
        "name": "mustdrop",
        "filter_layers": [1, 5, 9],
        "global_threshold": 0.001,
        "individual_threshold": 0.001,
        "keep": None,
        "budget": 96.5,
        "key_ratio": 0.1,
        "vision_stage": True,
        "merge_threshold": -0.25,
        "merge_window": 2,
        "prefill_stage": True,
        "decode_stage": False,
    }
    back = tc.Compressor.from_dict(data)
    assert isinstance(back, tc.MustDrop) and back is not compressor
    assert back == compressor and back.to_dict() == compressor.to_dict()
    params = {key: value for key, value in data.items() if key != "name"}
    assert tc.build("mustdrop", **params) == compressor
    assert tc.MustDrop.from_dict(data) == compressor


def test_save_and_from_pretrained_reproduce_logits(tmp_path):
    """A budgeted MustDrop with the vision stage: saved and re-applied to a fresh model, it gives identical logits
    and per-layer counts."""
    model = fresh_model()
    inputs = merge_inputs(model)
    with torch.no_grad():
        uncompressed = model(**inputs).logits
    compressor = tc.MustDrop(budget=100, key_ratio=0.1, merge_threshold=0.75, decode_stage=False)
    prefill, logits = run(model, inputs, compressor)
    assert (logits - uncompressed)[:, -1].abs().max() > 1e-3, (
        "compression changes nothing: the test shows nothing"
    )
    tc.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokencompress_config.json"]
    config = json.loads((tmp_path / "tokencompress_config.json").read_text())
    assert config["compressors"] == [compressor.to_dict()]
    assert config["compressors"][0]["budget"] == 100 and config["compressors"][0]["merge_threshold"] == 0.75

    fresh = fresh_model()
    assert tc.from_pretrained(fresh, tmp_path) is fresh
    (loaded,) = tc.compressors_of(fresh)
    assert isinstance(loaded, tc.MustDrop) and loaded is not compressor and loaded == compressor
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, logits)
    reloaded = tc.stats(fresh).prefill
    assert [layer.visual for layer in reloaded.layers] == [layer.visual for layer in prefill.layers]
    assert reloaded.tokens_per_stage() == prefill.tokens_per_stage()
