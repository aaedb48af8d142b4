"""Pooling pyramids (StaticPyramid, DPN) on tiny LLaVA-1.5 and Qwen2-VL / Qwen2.5-VL / Qwen3-VL models.

Every pooled result is compared with `pooling_reference.PoolingReference`, an independent hand implementation
(own grids, own pooling loops, own position ids, own masks, decoder layers called directly) fed with the kernels
(and, for DPN, the experts and probabilities the stats report), or with the uncompressed model (identity).

Qwen3-VL adds DeepStack features to the outputs of decoder layers 0 and 1 (vision depth 2). The reference
starts from the hidden states entering the first pooling layer and then runs the layers as they are, so every
Qwen pyramid here pools after layer 1 or later (before layer 2 or later), past the DeepStack layers. The
identity tests use the default schedule (after layers 0, 1, 2), so they also cover pooling before layer 1 with
1 x 1 groups. (Pooling before layer 1 with real windows: the engine adds layer 1's DeepStack feature of each
group's first member, its top-left cell, to the pooled token; that choice is not tested here.)
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from helpers import (
    assert_close_at,
    assert_flops_close,
    assert_untouched,
    extend,
    forward_hooks,
    greedy,
    measure_flops,
)
from pooling_reference import PoolingReference, Stage
from reference import generation_positions
from torch.nn import functional as F

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID as LLAVA_IMAGE_TOKEN_ID
from tokencompress.tiny import tiny_llava, tiny_llava_inputs
from tokencompress.tiny_qwen import FAMILIES as QWEN_FAMILIES
from tokencompress.tiny_qwen import IMAGE_TOKEN_ID as QWEN_IMAGE_TOKEN_ID
from tokencompress.tiny_qwen import VIDEO_TOKEN_ID, tiny_qwen_inputs, tiny_qwen_vl

NUM_LAYERS = 4
FAMILIES = ("llava", *QWEN_FAMILIES)
IMPLEMENTATIONS = ("eager", "sdpa")
# Logits against the reference: observed within 5e-6 (exactly equal under eager at most settings). Kept this
# tight because in these tiny Qwen2-VL / Qwen2.5-VL models the h and w axes get only low rotary frequencies, so
# an off-by-one spatial id moves the logits by only ~1e-4 (test_pooled_positions checks the ids directly).
REF_ATOL = 2e-5
ATOL = 1e-4  # eager against sdpa
PATCH_SIZE = 8  # LLaVA: 48 px images -> 6 x 6 grids, 40 px -> 5 x 5

# LLaVA: (prefix, suffix) text lengths and image count per sample
LLAVA_BATCHES = {
    "b1": ([(3, 5)], [1]),
    "b3": ([(2, 4), (5, 2), (1, 6)], [1, 2, 0]),
    "b4": ([(3, 5), (2, 4), (1, 6), (4, 2)], [1, 2, 0, 1]),
}
# Qwen: parts per sample, grids in patches before the 2 x 2 merger; (10, 14) patches -> a 5 x 7 grid
QWEN_BATCHES = {
    "b1": [[("text", 3), ("image", (10, 14)), ("text", 4)]],
    "b3": [
        [("text", 2), ("image", (10, 14)), ("text", 2), ("image", (8, 8)), ("text", 3)],
        [("text", 3), ("video", (2, 8, 10)), ("text", 4)],
        [("text", 5)],
    ],
    "b4": [
        [("text", 2), ("image", (10, 14)), ("text", 2), ("image", (8, 8)), ("text", 3)],
        [("text", 3), ("video", (2, 8, 10)), ("text", 4)],
        [("text", 5)],
        [("text", 4), ("image", (8, 12)), ("text", 2)],
    ],
}
# A random model may generate a placeholder id; the reference's full forward would then count more
# placeholders than features.
GENERATE = {"suppress_tokens": [LLAVA_IMAGE_TOKEN_ID, QWEN_IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]}
EXPERTS = ((1, 1), (1, 2), (2, 2))
# The seed of `tune_routers` under which the samples with images of batch "b4" choose different experts at both
# stages of `dpn_for`, for every family, max and avg pooling (checked where it matters); found by trying seeds.
ROUTER_SEED = 20


# -- models and inputs ----------------------------------------------------------------------------------------


@functools.cache
def _pristine(family: str, implementation: str, image_size: int) -> torch.nn.Module:
    if family == "llava":
        return tiny_llava(
            layers=NUM_LAYERS,
            image_size=image_size,
            patch_size=PATCH_SIZE,
            attn_implementation=implementation,
            seed=0,
        )
    return tiny_qwen_vl(family, layers=NUM_LAYERS, attn_implementation=implementation, seed=0)


def fresh_model(family: str, implementation: str = "sdpa", image_size: int = 48) -> torch.nn.Module:
    """A new, never compressed model; the same weights under every implementation."""
    return copy.deepcopy(_pristine(family, implementation, image_size))


def make_inputs(model, family: str, batch: str, padding_side: str = "left") -> dict[str, torch.Tensor]:
    if family == "llava":
        lengths, images = LLAVA_BATCHES[batch]
        return tiny_llava_inputs(model, lengths, images, padding_side=padding_side)
    return tiny_qwen_inputs(model, QWEN_BATCHES[batch], padding_side=padding_side)


def visual_ids(family: str) -> list[int]:
    return [LLAVA_IMAGE_TOKEN_ID] if family == "llava" else [QWEN_IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]


def text_mask(inputs: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    visual = torch.isin(inputs["input_ids"], torch.tensor(visual_ids(family)))
    return inputs["attention_mask"].bool() & ~visual


def media_grids(model, family: str, batch: str) -> list[list[tuple[int, int]]]:
    """Per sample, the (rows, cols) of each grid, from the batch description: LLaVA side x side per image; Qwen
    (h / 2, w / 2) per image and per video temporal patch."""
    if family == "llava":
        side = model.config.vision_config.image_size // PATCH_SIZE
        return [[(side, side)] * images for images in LLAVA_BATCHES[batch][1]]
    grids = []
    for sample in QWEN_BATCHES[batch]:
        grids.append([])
        for kind, value in sample:
            if kind == "image":
                grids[-1].append((value[0] // 2, value[1] // 2))
            elif kind == "video":
                grids[-1].extend([(value[1] // 2, value[2] // 2)] * value[0])
    return grids


def hand_counts(grids, kernels: list[list[tuple[int, int]]], min_grid_tokens: int) -> list[list[int]]:
    """Visual tokens per sample after each stage; kernels[stage][sample]."""
    counts = []
    for stage in kernels:
        grids = [
            [
                (r // kh, c // kw) if r * c >= min_grid_tokens and r >= kh and c >= kw else (r, c)
                for r, c in sample
            ]
            for sample, (kh, kw) in zip(grids, stage, strict=True)
        ]
        counts.append([sum(r * c for r, c in sample) for sample in grids])
    return counts


def check_visual_counts(model, inputs, family, grids, layers, kernels, min_grid_tokens) -> None:
    """stats: every layer's per-sample visual (and total) token counts are the hand counts of the stage in force."""
    prefill = tc.stats(model).prefill
    visual = (
        torch.isin(inputs["input_ids"], torch.tensor(visual_ids(family))) & inputs["attention_mask"].bool()
    )
    text = (inputs["attention_mask"].sum(1) - visual.sum(1)).tolist()
    expected = [visual.sum(1).tolist()]
    expected += hand_counts(grids, kernels, min_grid_tokens)
    assert expected[0] == [sum(r * c for r, c in sample) for sample in grids]
    assert len(prefill.layers) == NUM_LAYERS
    for stats in prefill.layers:
        stage = sum(stats.layer >= layer for layer in layers)
        assert stats.visual == expected[stage], (stats.layer, stats.visual, expected[stage])
        assert stats.tokens == [t + v for t, v in zip(text, expected[stage], strict=True)]


def default_after_layers(num_layers: int) -> list[int]:
    """floor(L x k / 4) - 1 for k = 1, 2, 3, deduplicated, clipped to L - 2."""
    return sorted({min(max(num_layers * k // 4 - 1, 0), num_layers - 2) for k in (1, 2, 3)})


def compress_eval(model, compressor):
    """Compress a model in eval mode; the DPN routers (now its submodules) take the model's mode."""
    model.eval()
    tc.compress(model, compressor)
    assert not getattr(compressor, "training", False), "a DPN on an eval model must route by argmax"
    return compressor


# -- DPN helpers ----------------------------------------------------------------------------------------------


def tune_routers(dpn: tc.DPN, seed: int, gain: float = 20.0) -> None:
    """Random router weights (norm affine included) spread enough that samples pick different experts; random
    conv kernels (not the averaging init)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn(shape, generator=generator)

    with torch.no_grad():
        for router in dpn.routers:
            router.norm.weight.copy_(1 + 0.1 * rand(router.norm.weight.shape))
            router.norm.bias.copy_(0.1 * rand(router.norm.bias.shape))
            down, up = router.down.weight, router.up.weight
            down.copy_(rand(down.shape) / down.shape[1] ** 0.5)
            up.copy_(gain * rand(up.shape) / up.shape[1] ** 0.5)
        for weight in dpn.conv_weights:
            weight.copy_(0.5 + 0.3 * rand(weight.shape))


def dpn_for(family: str, pooling: str = "max", **kwargs) -> tc.DPN:
    after = [0, 2] if family == "llava" else [1, 2]
    return tc.DPN(after_layers=after, experts=EXPERTS, pooling=pooling, **kwargs)


def router_by_hand(router, states: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(Linear(GELU(Linear(LayerNorm(states)))) / T), written out."""
    norm = router.norm
    x = F.layer_norm(states, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    x = x @ router.down.weight.T
    x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return torch.softmax((x @ router.up.weight.T) / temperature, dim=-1)


def stages_for(model, compressor, layers: list[int], batch: int) -> list[Stage]:
    """The reference's stages: StaticPyramid's kernels; DPN's experts and probabilities as the stats report."""
    if isinstance(compressor, tc.StaticPyramid):
        kernels = list(compressor.kernels)
        return [
            Stage(
                layer=layer,
                kernels=[tuple(kernels[s] if len(kernels) > 1 else kernels[0])] * batch,
                mode=compressor.pooling,
                min_grid_tokens=compressor.min_grid_tokens,
            )
            for s, layer in enumerate(layers)
        ]
    decisions = tc.stats(model).prefill.decisions
    assert sorted(decisions) == layers
    stages = []
    for s, layer in enumerate(layers):
        experts = decisions[layer]["expert"]
        probability = decisions[layer]["probability"]
        assert experts.dtype == torch.long and experts.shape == (batch,)
        assert probability.is_floating_point() and probability.shape == (batch,)
        conv = None
        if compressor.pooling == "conv":
            conv = [compressor.conv_weights[s][e].detach() for e in experts.tolist()]
        stages.append(
            Stage(
                layer=layer,
                kernels=[EXPERTS[e] for e in experts.tolist()],
                mode=compressor.pooling,
                scales=probability.tolist(),
                conv=conv,
                min_grid_tokens=compressor.min_grid_tokens,
            )
        )
    return stages


def mixed_experts(model, inputs, family: str) -> dict[int, list[int]]:
    """Each stage's experts; asserts that the samples with images do not all agree at any stage, and that
    every expert is used somewhere."""
    decisions = tc.stats(model).prefill.decisions
    with_images = torch.isin(inputs["input_ids"], torch.tensor(visual_ids(family))).any(1).tolist()
    chosen = {layer: d["expert"].tolist() for layer, d in decisions.items()}
    used = set()
    for layer, experts in chosen.items():
        here = {e for e, images in zip(experts, with_images, strict=True) if images}
        assert len(here) > 1, f"precondition: the samples chose the same expert at layer {layer}: {experts}"
        used |= here
    assert used == set(range(len(EXPERTS))), f"precondition: not every expert is used: {chosen}"
    return chosen


def reference_logits(ref_model, inputs, stages, routing=None):
    return PoolingReference(ref_model).run(inputs, stages, routing=routing)


# -- 1. identity ----------------------------------------------------------------------------------------------


def identity_compressor(kind: str) -> tc.Compressor:
    if kind == "static":
        return tc.StaticPyramid(kernels=(1, 1), pooling="max")
    return tc.DPN(experts=((1, 1),), pooling="max", temperature=3.0)


@pytest.mark.parametrize("kind", ["static", "dpn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity(family, kind):
    """A (1, 1) kernel (DPN: a single (1, 1) expert, probability 1) changes nothing, at the default schedule
    (after layers 0, 1, 2 of 4); uncompress restores the exact model."""
    model = fresh_model(family)
    inputs = make_inputs(model, family, "b3")
    where = inputs["attention_mask"].bool()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
    expected_tokens = greedy(model, inputs, 6, **GENERATE).sequences
    hooks = forward_hooks(model)

    compressor = identity_compressor(kind)
    assert tc.compress(model, compressor) is model
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    layers = [a + 1 for a in default_after_layers(NUM_LAYERS)]
    assert layers == [1, 2, 3]
    grids = media_grids(model, family, "b3")
    check_visual_counts(model, inputs, family, grids, layers, [[(1, 1)] * len(grids)] * 3, 16)
    if kind == "dpn":
        decisions = tc.stats(model).prefill.decisions
        assert sorted(decisions) == layers
        for decision in decisions.values():
            assert decision["expert"].tolist() == [0] * len(grids)
            assert decision["probability"].tolist() == [1.0] * len(grids)
    tokens = greedy(model, inputs, 6, **GENERATE).sequences
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, where, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)

    assert tc.uncompress(model) is model
    with torch.no_grad():
        again = model(**inputs).logits
    assert torch.equal(again, expected)
    assert torch.equal(greedy(model, inputs, 6, **GENERATE).sequences, expected_tokens)
    assert_untouched(model, state, hooks)


# -- 2. StaticPyramid equals the reference ----------------------------------------------------------------------

# (pooling, kernels, after_layers, min_grid_tokens, LLaVA image size)
LLAVA_STATIC = {
    "avg22-1stage": ("avg", (2, 2), [1], 16, 48),
    "max12-2stages": ("max", (1, 2), [0, 2], 16, 48),  # 6 x 6 -> 6 x 3 -> 6 x 1
    "avg-3kernels-default": (
        "avg",
        [(1, 2), (2, 2), (1, 2)],
        None,
        16,
        48,
    ),  # 6x6 -> 6x3 -> 3x1 (floored) -> kept
    "max22-3stages-small": ("max", (2, 2), [0, 1, 2], 4, 48),  # 6x6 -> 3x3 -> 1x1 (floored) -> too small
    "odd-avg22": ("avg", (2, 2), [0, 1], 4, 40),  # 5 x 5 -> 2 x 2 (last row and column dropped) -> 1 x 1
    "odd-max12": ("max", [(1, 2), (2, 1)], [0, 2], 16, 40),  # 5 x 5 -> 5 x 2 -> 5 x 2 (10 cells < 16)
}
QWEN_STATIC = {
    "avg22": ("avg", (2, 2), [1], 16),  # 5 x 7 -> 2 x 3; 4 x 4 -> 2 x 2; frames 4 x 5 -> 2 x 2
    "max-12-22": ("max", [(1, 2), (2, 2)], [1, 2], 1),  # 5 x 7 -> 5 x 3 -> 2 x 1
}


def check_static(model, ref_model, family, inputs, grids, spec, layers) -> None:
    pooling, kernels, after, min_grid = spec
    compressor = tc.StaticPyramid(
        after_layers=after, kernels=kernels, pooling=pooling, min_grid_tokens=min_grid
    )
    compress_eval(model, compressor)
    with torch.no_grad():
        logits = model(**inputs).logits
    batch = len(grids)
    per_stage = [kernels] * len(layers) if isinstance(kernels[0], int) else kernels
    check_visual_counts(
        model, inputs, family, grids, layers, [[tuple(k)] * batch for k in per_stage], min_grid
    )
    assert tc.stats(model).prefill.decisions == {}  # a static pyramid makes no per-sample decisions
    expected = reference_logits(ref_model, inputs, stages_for(model, compressor, layers, batch))
    assert torch.equal(expected.text, text_mask(inputs, family))
    assert_close_at(logits, expected.logits, expected.text, atol=REF_ATOL)


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(LLAVA_STATIC))
def test_static_llava_equals_reference(case, implementation, batch):
    pooling, kernels, after, min_grid, image_size = LLAVA_STATIC[case]
    model = fresh_model("llava", implementation, image_size)
    ref_model = fresh_model("llava", implementation, image_size)
    inputs = make_inputs(model, "llava", batch)
    layers = [a + 1 for a in (after if after is not None else default_after_layers(NUM_LAYERS))]
    grids = media_grids(model, "llava", batch)
    check_static(model, ref_model, "llava", inputs, grids, (pooling, kernels, after, min_grid), layers)


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(QWEN_STATIC))
@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_static_qwen_equals_reference(family, case, implementation, batch):
    pooling, kernels, after, min_grid = QWEN_STATIC[case]
    model, ref_model = fresh_model(family, implementation), fresh_model(family, implementation)
    inputs = make_inputs(model, family, batch)
    grids = media_grids(model, family, batch)
    check_static(model, ref_model, family, inputs, grids, QWEN_STATIC[case], [a + 1 for a in after])


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_static_right_padding(family):
    model, ref_model = fresh_model(family), fresh_model(family)
    inputs = make_inputs(model, family, "b3", padding_side="right")
    assert not inputs["attention_mask"][:, -1].all()
    grids = media_grids(model, family, "b3")
    check_static(model, ref_model, family, inputs, grids, ("max", [(1, 2), (2, 2)], [1, 2], 1), [2, 3])


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_reference_is_not_vacuous(family):
    """Pooling changes the logits, and so do positions other than the floor of the mean: a comparison with the
    reference would notice an engine that pooled nothing or placed pooled tokens at their first member. (With
    M-RoPE a 2 x 2 window's floored mean row and column are its first member's; they differ from the second
    stage on. Qwen2-VL / Qwen2.5-VL: see test_pooled_positions.)"""
    model, ref_model = fresh_model(family), fresh_model(family)
    inputs = make_inputs(model, family, "b3")
    stages = [Stage(layer=layer, kernels=[(2, 2)] * 3, mode="avg", min_grid_tokens=1) for layer in (2, 3)]
    pooled = PoolingReference(ref_model).run(inputs, stages)
    first = PoolingReference(ref_model, positions="first").run(inputs, stages)
    identity = PoolingReference(ref_model).run(inputs, [Stage(layer=2, kernels=[(1, 1)] * 3)])
    with torch.no_grad():
        plain = ref_model(**inputs).logits
    assert_close_at(identity.logits, plain, identity.text, atol=1e-5)
    where = pooled.text & torch.tensor([True, True, False])[:, None]  # samples with media
    assert (pooled.logits - plain)[where].abs().max() > 1e-2
    assert (pooled.logits - first.logits)[where].abs().max() > 1e-2
    compress_eval(
        model, tc.StaticPyramid(after_layers=[1, 2], kernels=(2, 2), pooling="avg", min_grid_tokens=1)
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    assert_close_at(logits, pooled.logits, pooled.text, atol=REF_ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_positions(family):
    """The layers after each stage get, at every slot, the reference's rotary embedding (LLaVA: and position
    id): the floor of the members' mean id, per axis for M-RoPE, text keeping its own. Checked directly, not
    through the logits: tiny Qwen2-VL / Qwen2.5-VL models give h and w only low rotary frequencies."""
    model, ref_model = fresh_model(family, "eager"), fresh_model(family, "eager")
    inputs = make_inputs(model, family, "b3")
    if family == "llava":  # generate's ids: not the column index under left padding
        inputs["position_ids"] = generation_positions(inputs["attention_mask"])
    after = [0, 2] if family == "llava" else [1, 2]
    # LLaVA 6 x 6 -> 2 x 2 -> 2 x 1; Qwen 5 x 7 -> 1 x 2 -> 1 x 1, 4 x 4 -> 1 x 1, frames 4 x 5 -> 1 x 1
    compressor = tc.StaticPyramid(
        after_layers=after, kernels=[(3, 3), (1, 2)], pooling="avg", min_grid_tokens=1
    )
    layers = [a + 1 for a in after]
    expected = PoolingReference(ref_model).run(inputs, stages_for(model, compressor, layers, 3))
    compress_eval(model, compressor)
    seen = {}
    handles = [
        model.model.language_model.layers[k].register_forward_pre_hook(
            lambda m, args, kwargs, k=k: seen.__setitem__(
                k, (kwargs["position_embeddings"], kwargs["position_ids"])
            ),
            with_kwargs=True,
        )
        for k in layers
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    prefill = tc.stats(model).prefill
    for k in layers:
        # the engine's real slots are the reference's real (unpadded) slots, in order
        real = expected.real[k]
        assert prefill.layers[k].tokens == real.sum(1).tolist()
        (cos, sin), ids = seen[k]
        want_cos, want_sin = expected.rotary[k]
        for b in range(real.shape[0]):
            n, row = int(real[b].sum()), min(b, cos.shape[0] - 1)
            torch.testing.assert_close(cos[row, :n], want_cos[b, real[b]], atol=1e-6, rtol=0)
            torch.testing.assert_close(sin[row, :n], want_sin[b, real[b]], atol=1e-6, rtol=0)
            if family == "llava":
                assert torch.equal(ids[min(b, ids.shape[0] - 1), :n], expected.position_ids[k][0, b, real[b]])
    # the floored mean differs from the first member's ids somewhere (else this would check nothing)
    first = PoolingReference(ref_model, positions="first").run(
        inputs, stages_for(model, compressor, layers, 3)
    )
    assert any(not torch.equal(first.position_ids[k], expected.position_ids[k]) for k in layers)


def test_output_hidden_states_are_layer_outputs():
    """Why the reference captures the first pooling layer's input with a pre-hook: `hidden_states[k]` is layer
    k - 1's output, before Qwen3-VL adds its DeepStack features (after layers 0 and 1)."""
    model = fresh_model("qwen3_vl")
    inputs = make_inputs(model, "qwen3_vl", "b1")
    seen = {}
    handles = [
        model.model.language_model.layers[k].register_forward_pre_hook(
            lambda m, args, kwargs, k=k: seen.__setitem__(k, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for k in range(NUM_LAYERS)
    ]
    try:
        with torch.no_grad():
            states = model(**inputs, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(states[0], seen[0]) and torch.equal(states[3], seen[3])
    assert not torch.equal(states[2], seen[2])


# -- 3. DPN equals the reference ------------------------------------------------------------------------------


def run_dpn(family, implementation, batch, pooling="max", padding_side="left", **kwargs):
    """A compressed model with a tuned DPN after its forward on `batch`: (model, dpn, inputs, logits)."""
    model = fresh_model(family, implementation)
    inputs = make_inputs(model, family, batch, padding_side)
    dpn = compress_eval(model, dpn_for(family, pooling, **kwargs))
    tune_routers(dpn, ROUTER_SEED)
    with torch.no_grad():
        logits = model(**inputs).logits
    return model, dpn, inputs, logits


def check_dpn(model, dpn, inputs, logits, family, batch, implementation) -> None:
    layers = [a + 1 for a in dpn.after_layers]
    rows = inputs["input_ids"].shape[0]
    stages = stages_for(model, dpn, layers, rows)
    grids = media_grids(model, family, batch)
    check_visual_counts(
        model, inputs, family, grids, layers, [s.kernels for s in stages], dpn.min_grid_tokens
    )
    expected = reference_logits(fresh_model(family, implementation), inputs, stages)
    counts = hand_counts(grids, [s.kernels for s in stages], dpn.min_grid_tokens)
    assert [expected.visual[layer] for layer in layers] == counts
    assert all(0 < p < 0.99 for stage in stages for p in stage.scales)
    assert_close_at(logits, expected.logits, expected.text, atol=REF_ATOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("pooling", ["max", "avg", "conv"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dpn_equals_reference(family, pooling, implementation):
    """DPN in eval: each sample pooled by its argmax expert, scaled by that expert's probability (a padded batch
    with a sample without media; conv: random per-expert kernels)."""
    model, dpn, inputs, logits = run_dpn(family, implementation, "b3", pooling)
    check_dpn(model, dpn, inputs, logits, family, "b3", implementation)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpn_batch_1(family):
    model, dpn, inputs, logits = run_dpn(family, "sdpa", "b1", "avg")
    check_dpn(model, dpn, inputs, logits, family, "b1", "sdpa")


@pytest.mark.parametrize("family", FAMILIES)
def test_dpn_mixed_experts(family):
    """Samples of one padded batch choose different experts (precondition checked), so they keep different
    numbers of tokens; the per-sample visual counts in the stats are the hand counts, the logits the reference's."""
    model, dpn, inputs, logits = run_dpn(family, "sdpa", "b4", "max")
    mixed_experts(model, inputs, family)
    check_dpn(model, dpn, inputs, logits, family, "b4", "sdpa")


def test_dpn_right_padding():
    model, dpn, inputs, logits = run_dpn("llava", "eager", "b4", "avg", padding_side="right")
    assert not inputs["attention_mask"][:, -1].all()
    mixed_experts(model, inputs, "llava")
    check_dpn(model, dpn, inputs, logits, "llava", "b4", "eager")


# -- 4. router probabilities ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["left", "right", "labels"])
@pytest.mark.parametrize("family", FAMILIES)
def test_router_probabilities(family, case):
    """At the first stage, softmax(router(h) / T) recomputed by hand from the uncompressed hidden state of the
    routing token (the last real token; with labels the token before the first supervised label) is the
    probability the stats report, and its argmax the expert; at the second stage the same from the reference's
    hidden states."""
    temperature = 3.0
    model = fresh_model(family)
    inputs = make_inputs(model, family, "b4", "right" if case == "right" else "left")
    mask = inputs["attention_mask"]
    rows, length = mask.shape
    last_real = [int(torch.nonzero(mask[b]).max()) for b in range(rows)]
    routing = last_real
    labels = None
    if case == "labels":  # supervise each sample's last token; the one before it is text in every sample
        labels = torch.full_like(inputs["input_ids"], -100)
        for b, last in enumerate(last_real):
            labels[b, last] = inputs["input_ids"][b, last]
        routing = [last - 1 for last in last_real]
        assert text_mask(inputs, family)[torch.arange(rows), torch.tensor(routing)].all()
    layers = [a + 1 for a in dpn_for(family).after_layers]

    ref_model = fresh_model(family)
    seen = {}
    handle = ref_model.model.language_model.layers[layers[0]].register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("h", args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        ref_model(**inputs)
    handle.remove()
    states = seen["h"][torch.arange(rows), torch.tensor(routing)]

    dpn = compress_eval(model, dpn_for(family, temperature=temperature))
    tune_routers(dpn, ROUTER_SEED)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    if labels is not None:
        assert out.loss is not None and out.routing_loss is not None
    decisions = tc.stats(model).prefill.decisions

    with torch.no_grad():
        probabilities = router_by_hand(dpn.routers[0], states, temperature)
    expert = decisions[layers[0]]["expert"]
    assert torch.equal(expert, probabilities.argmax(1))
    chosen = probabilities.gather(1, expert[:, None])[:, 0]
    torch.testing.assert_close(decisions[layers[0]]["probability"], chosen, atol=1e-5, rtol=0)
    assert chosen.min() < 0.9  # the scale is far from 1, so a missing multiplication would show

    reference = reference_logits(ref_model, inputs, stages_for(model, dpn, layers, rows), routing=routing)
    torch.testing.assert_close(reference.routing[layers[0]], states, atol=0, rtol=0)
    with torch.no_grad():
        later = router_by_hand(dpn.routers[1], reference.routing[layers[1]], temperature)
    expert = decisions[layers[1]]["expert"]
    assert torch.equal(expert, later.argmax(1))
    torch.testing.assert_close(
        decisions[layers[1]]["probability"], later.gather(1, expert[:, None])[:, 0], atol=1e-4, rtol=0
    )
    assert_close_at(out.logits, reference.logits, reference.text, atol=REF_ATOL)


# -- 5. cache -------------------------------------------------------------------------------------------------


def make_pyramid(kind: str, family: str) -> tc.Compressor:
    if kind == "static":
        return tc.StaticPyramid(
            after_layers=[1, 2], kernels=[(1, 2), (2, 2)], pooling="max", min_grid_tokens=1
        )
    return dpn_for(family, "avg")


@pytest.mark.parametrize("batch", ["b1", "b4"])
@pytest.mark.parametrize("kind", ["static", "dpn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_greedy(family, kind, batch):
    """Every decode step's logits with the pooled cache equal the reference over prompt + generated tokens, with
    the prefill's pooling (LLaVA: generate's positions cumsum(mask) - 1; Qwen: the model's own M-RoPE ids)."""
    new_tokens = 5
    model, ref_model = fresh_model(family), fresh_model(family)
    inputs = make_inputs(model, family, batch)
    compressor = compress_eval(model, make_pyramid(kind, family))
    if kind == "dpn":
        tune_routers(compressor, ROUTER_SEED)
    out = greedy(model, inputs, new_tokens, **GENERATE)
    assert len(out.logits) == new_tokens
    layers = [a + 1 for a in compressor.after_layers]
    rows = inputs["input_ids"].shape[0]
    stages = stages_for(model, compressor, layers, rows)
    if kind == "dpn" and batch == "b4":
        mixed_experts(model, inputs, family)
    check_visual_counts(
        model,
        inputs,
        family,
        media_grids(model, family, batch),
        layers,
        [s.kernels for s in stages],
        stages[0].min_grid_tokens,
    )
    full = extend(inputs, out.sequences)
    if family == "llava":
        full["position_ids"] = generation_positions(full["attention_mask"])
    expected = reference_logits(ref_model, full, stages)
    prompt = inputs["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):  # step t predicts from position prompt - 1 + t
        assert_close_at(
            logits, expected.logits[:, prompt - 1 + step], torch.ones(rows, dtype=torch.bool), REF_ATOL
        )
    # the cache holds the pooled tokens: fewer entries from the first stage on
    held = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert tc.stats(model).kv_cache_entries == held
    total = inputs["input_ids"].shape[1] + new_tokens - 1
    assert held[: layers[0]] == [total] * layers[0]
    assert held[layers[0]] < total


# -- 6. eager vs sdpa -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_matches_sdpa(family):
    results = {}
    for implementation in IMPLEMENTATIONS:
        model, _, inputs, logits = run_dpn(family, implementation, "b4", "max")
        decisions = tc.stats(model).prefill.decisions
        results[implementation] = (logits, decisions)
    (eager, eager_decisions), (sdpa, sdpa_decisions) = results["eager"], results["sdpa"]
    assert sorted(eager_decisions) == sorted(sdpa_decisions)
    for layer, decision in eager_decisions.items():
        assert torch.equal(decision["expert"], sdpa_decisions[layer]["expert"])
        torch.testing.assert_close(
            decision["probability"], sdpa_decisions[layer]["probability"], atol=1e-5, rtol=0
        )
    assert_close_at(eager, sdpa, text_mask(inputs, family), atol=ATOL)


# -- 7. accounting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["static", "dpn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_flops_match_counter(family, kind):
    """The stats' analytic FLOPs (prefill, its uncompressed baseline, a decode step on the pooled cache) agree
    with torch's FLOP counter within 2%; DPN's router matmuls are the stats' extra_flops, and the counter sees
    them too (they run inside the language model)."""
    model = fresh_model(family)
    inputs = make_inputs(model, family, "b4")
    if family == "llava":
        inputs["position_ids"] = generation_positions(inputs["attention_mask"])
    bare, _ = measure_flops(lambda: model(**inputs))
    compressor = make_pyramid(kind, family)
    with tc.compressed(model, compressor):
        model.eval()
        if kind == "dpn":
            tune_routers(compressor, ROUTER_SEED)
        prefill, out = measure_flops(lambda: model(**inputs, use_cache=True))
        stats = tc.stats(model).prefill
        assert_flops_close(stats.flops, prefill)
        assert_flops_close(stats.baseline_flops, bare)
        assert prefill < 0.9 * bare
        hidden, rows = model.config.get_text_config().hidden_size, inputs["input_ids"].shape[0]
        if kind == "dpn":
            router = 2 * rows * (hidden * (hidden // 4) + (hidden // 4) * len(EXPERTS))
            assert stats.extra_flops == 2 * router
        else:
            assert stats.extra_flops == 0
        step = torch.full((rows, 1), 9)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
        position = generation_positions(mask)[:, -1:]
        if family != "llava":
            # the M-RoPE ids generate passes (see test_qwen_vl.test_flops_match_counter)
            position = (position + model.model.rope_deltas)[None].expand(3, -1, -1)
        decode_inputs = {
            "input_ids": step,
            "attention_mask": mask,
            "position_ids": position,
            "past_key_values": out.past_key_values,
        }
        decode, _ = measure_flops(lambda: model(**decode_inputs, use_cache=True))
        last = tc.stats(model).last
        assert last.kind == "decode"
        assert_flops_close(last.flops, decode)


@pytest.mark.parametrize("training", [False, True])
def test_dpn_takes_the_models_mode(training: bool) -> None:
    """A DPN is an nn.Module created in training mode; attached to a model it follows the model's mode, so an
    eval model routes by argmax (the same experts on every forward) and a training model samples."""
    model = fresh_model("llava").train(training)
    dpn = tc.DPN(after_layers=[0], experts=EXPERTS)
    tc.compress(model, dpn)
    assert dpn.training is training
    model.train(not training)
    assert dpn.training is (not training)


def test_router_reads_the_pooled_token_holding_a_pooled_routing_token() -> None:
    """When the answer starts right after the image, the routing token (the one before the first label) is the
    image's last visual token. The first stage reads it; once it is pooled, the next stage reads the pooled token
    that holds it: the last pooled token of that image (raster order), never an unrelated slot."""
    model = fresh_model("llava")
    inputs = make_inputs(model, "llava", "b3")
    image = inputs["input_ids"] == LLAVA_IMAGE_TOKEN_ID
    positions = torch.arange(image.shape[1]).expand_as(image)
    last_image = torch.where(image, positions, -1).amax(1)
    with_image = last_image >= 0
    labels = torch.where(positions > last_image[:, None], inputs["input_ids"], -100)
    labels[~with_image] = torch.where(
        positions[~with_image] >= image.shape[1] - 2, inputs["input_ids"][~with_image], -100
    )
    labels[inputs["attention_mask"] == 0] = -100
    dpn = tc.DPN(after_layers=[0, 1], experts=((2, 2), (1, 2)), temperature=3.0)
    compress_eval(model, dpn)
    tune_routers(dpn, 20)
    seen = {}  # the hidden states the second stage decides on: layer 1's output, one token per stage-1 group
    model.model.language_model.layers[1].register_forward_hook(
        lambda module, args, output: seen.__setitem__(
            "hidden", output[0] if isinstance(output, tuple) else output
        )
    )
    with torch.no_grad():
        model(**inputs, labels=labels)
    stats = tc.stats(model).prefill
    layer = next(s for s in stats.layers if s.layer == 1)  # the slots after the first stage
    decision = stats.decisions[2]
    for b in torch.nonzero(with_image)[:, 0].tolist():
        visual_columns = torch.nonzero(layer.visual_mask[b])[:, 0]
        holder = int(visual_columns.max())  # the last pooled token of the sample's last image
        assert int(layer.positions[b, holder]) <= int(last_image[b])
        expected = router_by_hand(dpn.routers[1], seen["hidden"][b, holder], 3.0)
        chosen = int(decision["expert"][b])
        assert chosen == int(expected.argmax())
        torch.testing.assert_close(decision["probability"][b], expected[chosen], rtol=1e-5, atol=1e-6)
