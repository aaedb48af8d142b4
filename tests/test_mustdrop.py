"""MustDrop (prefill dual-attention filter, key tokens, output-aware decode cache) on tiny LLaVA-1.5 (8 decoder
layers, 36 visual tokens per image), Qwen2-VL and Qwen2.5-VL (4 decoder layers: default filter layers 0, 1, 2).

Every decision is checked against `multistage_reference.mustdrop_by_hand`, which recomputes each stage from eager
attention maps (`output_attentions=True`) of an uncompressed model, and every logit against
`reference.MultiStageReference`, an independent implementation (own hooks, own masks) of "keep the full
sequence, mask each dropped token's key column from the layer after its stage on" (and, for the decode stage,
"mask the finally dropped visual tokens for the generated tokens' queries from the first filter layer on").

Random tiny models attend almost uniformly, so every visual token would score within a percent of the others; the
models here have their query and key projections scaled by GAIN (sharper attention), so thresholds drop a sizable,
robust share of the tokens and the hand computation asserts that no decision hinges on float noise. (Qwen3-VL
is left out: its tiny model's scores need other thresholds to drop at several stages; its DeepStack path is
covered by the FastV/RandomDrop tests.)

These tests isolate the prefill and decode stages (`vision_stage=False`); tests/test_mustdrop_vision.py covers the
vision stage and the stages together.
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
    assert_steps_match,
    extend,
    forward_hooks,
    measure_flops,
    second_turn,
)
from multistage_reference import mustdrop_by_hand
from reference import NEVER, MultiStageReference, expected_keep_count, generation_positions

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID as LLAVA_IMAGE_TOKEN_ID
from tokencompress.tiny import tiny_llava, tiny_llava_inputs
from tokencompress.tiny_qwen import IMAGE_TOKEN_ID as QWEN_IMAGE_TOKEN_ID
from tokencompress.tiny_qwen import VIDEO_TOKEN_ID, tiny_qwen_inputs, tiny_qwen_vl

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
IMPLEMENTATIONS = ("eager", "sdpa")
LAYERS = {"llava": 8, "qwen2_vl": 4, "qwen2_5_vl": 4}
# The authors' filter layers 2, 6, 10, 14 of 32, scaled: floor(x L / 32 + 0.5), deduplicated, at most L - 2.
DEFAULT_FILTERS = {"llava": [1, 2, 3, 4], "qwen2_vl": [0, 1, 2], "qwen2_5_vl": [0, 1, 2]}
GAIN = 10.0  # query and key projections scaled: sharper attention than a random init
# Thresholds that drop roughly 25-75 % of each sample's visual tokens at the first stage and more at later ones,
# with tokens kept by either test alone (every family here, both padding sides)
THRESHOLDS = {"global_threshold": 0.02, "individual_threshold": 0.03}
ATOL = 1e-4
# LLaVA: 48 px images of 8 px patches -> 36 visual tokens per image; (prefix, suffix) text lengths, images per sample
LLAVA_BATCHES = {"b1": ([(3, 5)], [1]), "b3": ([(2, 4), (5, 3), (1, 6)], [1, 2, 0])}
# Qwen: grids in patches before the 2 x 2 merger; 36 (two images) and 32 (a video) visual tokens
QWEN_BATCHES = {
    "b1": [[("text", 3), ("image", (8, 12)), ("text", 5)]],
    "b3": [
        [("text", 2), ("image", (8, 12)), ("text", 2), ("image", (6, 8)), ("text", 4)],
        [("text", 3), ("video", (2, 8, 8)), ("text", 4)],
        [("text", 5)],
    ],
}
VISUAL_IDS = {
    "llava": (LLAVA_IMAGE_TOKEN_ID,),
    **dict.fromkeys(FAMILIES[1:], (QWEN_IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)),
}
# A random model may generate a placeholder id; a full forward over prompt + generated tokens would then count
# more placeholders than features.
GENERATE = {"suppress_tokens": [LLAVA_IMAGE_TOKEN_ID, QWEN_IMAGE_TOKEN_ID, VIDEO_TOKEN_ID]}

PrefillMustDrop = functools.partial(tc.MustDrop, vision_stage=False)


# -- models, inputs, hand decisions ------------------------------------------------------------------------------


def sharpen(model: torch.nn.Module, gain: float) -> torch.nn.Module:
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                projection.weight.mul_(gain)
                if projection.bias is not None:
                    projection.bias.mul_(gain)
    return model


@functools.cache
def _pristine(family: str, implementation: str, layers: int) -> torch.nn.Module:
    if family == "llava":
        model = tiny_llava(
            layers=layers, image_size=48, patch_size=8, attn_implementation=implementation, seed=0
        )
    else:
        model = tiny_qwen_vl(family, layers=layers, attn_implementation=implementation, seed=0)
    return sharpen(model, GAIN)


def fresh_model(family: str, implementation: str = "sdpa") -> torch.nn.Module:
    """A new, never compressed model; the same weights under every implementation."""
    return copy.deepcopy(_pristine(family, implementation, LAYERS[family]))


def make_inputs(model, family: str, batch: str, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """The batch as `generate` runs it: LLaVA with generate's position ids (Qwen computes its own M-RoPE ids)."""
    if family == "llava":
        lengths, images = LLAVA_BATCHES[batch]
        inputs = tiny_llava_inputs(model, lengths, images, padding_side=padding_side)
        return with_positions(inputs)
    return tiny_qwen_inputs(model, QWEN_BATCHES[batch], padding_side=padding_side)


def with_positions(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}


def generate_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in inputs.items() if key != "position_ids"}


def full_inputs(
    family: str, inputs: dict[str, torch.Tensor], sequences: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The prompt's inputs over prompt + generated tokens, with generate's positions."""
    full = extend(generate_inputs(inputs), sequences)
    return with_positions(full) if family == "llava" else full


def visual_mask(inputs: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    ids = inputs["input_ids"]
    return torch.isin(ids, torch.tensor(VISUAL_IDS[family])) & inputs["attention_mask"].bool()


def positions(mask_row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask_row).flatten().tolist())


def by_hand(family: str, inputs, compressor: tc.MustDrop):
    """MustDrop's decisions recomputed on an uncompressed eager model (the compressor only lends its settings)."""
    return mustdrop_by_hand(
        fresh_model(family, "eager"),
        inputs,
        visual_mask(inputs, family),
        list(compressor.filter_layers or DEFAULT_FILTERS[family]),
        compressor.global_threshold,
        compressor.individual_threshold,
        keep=compressor.keep,
        key_ratio=compressor.key_ratio,
    )


def layer_sets(drop: torch.Tensor, real: torch.Tensor, layer: int) -> list[set[int]]:
    """Per sample, the real positions a layer processes given each position's drop layer."""
    return [positions(real[b] & (drop[b] > layer)) for b in range(real.shape[0])]


def check_against_hand(model, inputs, family: str, hand) -> None:
    """Every layer of the compressed prefill processed exactly the real tokens the hand decisions leave there:
    everything before the first stage, then each stage's survivors (text always), the same until the next."""
    prefill = tc.stats(model).prefill
    real, visual = inputs["attention_mask"].bool(), visual_mask(inputs, family)
    assert len(prefill.layers) == LAYERS[family]
    for stats in prefill.layers:
        expected = layer_sets(hand.drop, real, stats.layer)
        for b, kept in enumerate(expected):
            assert set(stats.kept_positions(b)) == kept, f"layer {stats.layer}, sample {b}"
            marked = stats.positions[b][stats.visual_mask[b]].tolist()
            assert set(marked) == kept & positions(visual[b]), (
                f"layer {stats.layer}, sample {b}: visual marks"
            )
        assert stats.visual == [len(k & positions(visual[b])) for b, k in enumerate(expected)]


def run_prefill(family, implementation, batch, compressor, padding_side="left"):
    model = fresh_model(family, implementation)
    inputs = make_inputs(model, family, batch, padding_side)
    tc.compress(model, compressor)
    with torch.no_grad():
        logits = model(**inputs).logits
    return model, inputs, logits


def reference_logits(family: str, implementation: str, inputs, drop, later=None) -> torch.Tensor:
    ref_model = fresh_model(family, implementation)
    with torch.no_grad(), MultiStageReference(ref_model, drop, later) as reference:
        logits = ref_model(**inputs).logits
    assert reference.calls > 0
    return logits


# -- 1. the filter, by hand ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_when_every_token_passes(family):
    """global_threshold=0: every visual token passes, at every stage; logits, greedy tokens and cache sizes are the
    uncompressed model's, and uncompress restores it exactly."""
    model = fresh_model(family)
    inputs = make_inputs(model, family, "b3")
    real = inputs["attention_mask"].bool()
    kwargs = dict(max_new_tokens=4, do_sample=False, **GENERATE)
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_tokens = model.generate(**generate_inputs(inputs), **kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = forward_hooks(model)
    tc.compress(model, PrefillMustDrop(global_threshold=0.0, individual_threshold=1.0))
    with torch.no_grad():
        assert_close_at(model(**inputs).logits, expected, real, atol=1e-5)
        assert all(
            stats.visual == tc.stats(model).prefill.layers[0].visual
            for stats in tc.stats(model).prefill.layers
        )
        out = model(**inputs, use_cache=True)
        assert tc.stats(model).kv_cache_entries == [inputs["input_ids"].shape[1]] * LAYERS[family]
        assert out.past_key_values.get_seq_length() == inputs["input_ids"].shape[1]
        assert torch.equal(model.generate(**generate_inputs(inputs), **kwargs), expected_tokens)
    tc.uncompress(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert forward_hooks(model) == hooks


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_thresholds_by_hand(family, padding_side):
    """Each stage drops a visual token iff global < g x sum(global) and individual < i (key tokens excepted),
    from the attention of its filter layer over the survivors of the earlier stages."""
    compressor = PrefillMustDrop(**THRESHOLDS)
    model, inputs, _ = run_prefill(family, "sdpa", "b3", compressor, padding_side)
    hand = by_hand(family, inputs, compressor)
    check_against_hand(model, inputs, family, hand)

    # not vacuous: the first stage drops 20-80 % of each sample's visual tokens, later stages drop more, and
    # tokens are kept by either test alone
    counts = visual_mask(inputs, family).sum(1).tolist()
    first, last = hand.stages[0], hand.stages[-1]
    for b, count in enumerate(counts):
        if count:
            assert 0.2 * count <= count - len(first.kept[b]) <= 0.8 * count
            assert len(last.kept[b]) < len(first.kept[b])
    only_global = only_individual = 0
    for stage in hand.stages:
        for b, columns in enumerate(stage.candidates):
            if not columns:
                continue
            total = float(stage.global_score[b].sum())
            by_global = stage.global_score[b] >= THRESHOLDS["global_threshold"] * total
            by_individual = stage.individual[b] >= THRESHOLDS["individual_threshold"]
            only_global += int((by_global & ~by_individual).sum())
            only_individual += int((by_individual & ~by_global).sum())
    assert only_global and only_individual


@pytest.mark.parametrize("keep", [0.6, 20])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_budget_by_hand(family, keep):
    """With `keep`, each stage keeps its top count(N_stage, keep) by max(global / (g x sum), individual / i),
    plus the key tokens."""
    compressor = PrefillMustDrop(keep=keep, **THRESHOLDS)
    model, inputs, _ = run_prefill(family, "sdpa", "b3", compressor)
    hand = by_hand(family, inputs, compressor)
    check_against_hand(model, inputs, family, hand)
    for stage in hand.stages:
        for b, columns in enumerate(stage.candidates):
            assert len(stage.by_rule[b]) == expected_keep_count(len(columns), keep)
    if isinstance(keep, float):  # a ratio compounds over the stages
        counts = [len(c) for c in hand.stages[0].candidates]
        assert all(len(k) < n for k, n in zip(hand.final, counts, strict=True) if n)


@pytest.mark.parametrize("family", FAMILIES)
def test_key_tokens_survive_every_stage(family):
    """Thresholds no token passes: only the key tokens (the top ceil(key_ratio x N) by global score at the first
    filter layer) survive, at every stage."""
    compressor = PrefillMustDrop(global_threshold=1.0, individual_threshold=1.0, key_ratio=0.25)
    model, inputs, _ = run_prefill(family, "sdpa", "b3", compressor)
    hand = by_hand(family, inputs, compressor)
    check_against_hand(model, inputs, family, hand)
    visual = visual_mask(inputs, family)
    for b in range(visual.shape[0]):
        count = int(visual[b].sum())
        assert len(hand.keys[b]) == math.ceil(0.25 * count)
        for stage in hand.stages:
            assert stage.by_rule[b] == set() and stage.kept[b] == hand.keys[b]


@pytest.mark.parametrize("family", FAMILIES)
def test_key_tokens_protected_against_later_stages(family):
    """Real thresholds: some key tokens fall below both thresholds at some stage and stay anyway."""
    compressor = PrefillMustDrop(key_ratio=0.25, **THRESHOLDS)
    model, inputs, _ = run_prefill(family, "sdpa", "b3", compressor)
    hand = by_hand(family, inputs, compressor)
    check_against_hand(model, inputs, family, hand)
    rescued = [
        (s, b)
        for s, stage in enumerate(hand.stages)
        for b in range(len(stage.kept))
        if hand.keys[b] - stage.by_rule[b]
    ]
    assert rescued, "no key token would have been dropped: the protection is untested"
    for b, keys in enumerate(hand.keys):
        assert keys <= hand.final[b]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_key_tokens_can_drop_everything(family):
    """key_ratio=0 and thresholds no token passes: every visual token goes after the first filter layer; later
    stages see samples without visual tokens, and the logits are the masked reference's."""
    compressor = PrefillMustDrop(global_threshold=1.0, individual_threshold=1.0, key_ratio=0.0)
    model, inputs, logits = run_prefill(family, "sdpa", "b3", compressor)
    hand = by_hand(family, inputs, compressor)
    check_against_hand(model, inputs, family, hand)
    assert hand.final == [set()] * len(hand.final)
    expected = reference_logits(family, "sdpa", inputs, hand.drop)
    real = inputs["attention_mask"].bool()
    assert_close_at(logits, expected, real & ~visual_mask(inputs, family))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_prompt_ending_with_the_image_queries_from_the_last_token(implementation):
    """A sample with no text after its image: the query row is its last token still in the sequence. Here the
    first stage drops that token itself (a visual token), so later stages query from the last surviving one."""
    compressor = PrefillMustDrop(**THRESHOLDS)
    model = fresh_model("llava", implementation)
    inputs = with_positions(tiny_llava_inputs(model, [(4, 0), (2, 5)], [1, 1]))
    tc.compress(model, compressor)
    with torch.no_grad():
        logits = model(**inputs).logits
    hand = by_hand("llava", inputs, compressor)
    check_against_hand(model, inputs, "llava", hand)
    assert int(hand.drop[0, -1]) == DEFAULT_FILTERS["llava"][0] + 1, "the last token should go at stage 1"
    assert len(hand.final[0]) < len(hand.stages[0].kept[0])
    expected = reference_logits("llava", implementation, inputs, hand.drop)
    assert_close_at(logits, expected, inputs["attention_mask"].bool() & (hand.drop == NEVER))


def test_key_token_count_is_ceil_of_the_decimal_ratio():
    """25 visual tokens, key_ratio=0.28: ceil(0.28 x 25) = 7 key tokens (the only survivors: no token passes
    thresholds of 1)."""
    model = fresh_model("qwen2_vl")
    inputs = tiny_qwen_inputs(model, [[("text", 2), ("image", (10, 10)), ("text", 3)]])
    tc.compress(model, PrefillMustDrop(global_threshold=1.0, individual_threshold=1.0, key_ratio=0.28))
    with torch.no_grad():
        model(**inputs)
    assert [stats.visual for stats in tc.stats(model).prefill.layers] == [[25], [7], [7], [7]]


@pytest.mark.parametrize(
    ("depth", "filters"), [(2, [0]), (3, [0, 1]), (8, [1, 2, 3, 4]), (12, [1, 2, 4, 5]), (32, [2, 6, 10, 14])]
)
def test_default_filter_layers_scale_with_depth(depth, filters):
    """Default filter layers: floor(x L / 32 + 0.5) of the authors' 2, 6, 10, 14, deduplicated, at most L - 2.
    With keep=0.5 (no key tokens) every stage halves the visual tokens, so the counts change exactly after them."""
    model = tiny_llava(layers=depth, seed=1)  # 16 visual tokens per image
    inputs = tiny_llava_inputs(model, [(2, 3)], [1])
    tc.compress(model, PrefillMustDrop(keep=0.5, key_ratio=0.0))
    with torch.no_grad():
        model(**inputs)
    counts = [stats.visual[0] for stats in tc.stats(model).prefill.layers]
    expected, count = [], 16
    for layer in range(depth):
        if layer - 1 in filters:
            count = math.ceil(count / 2)
        expected.append(count)
    assert counts == expected
    # the layer-averaged visual tokens ("N tokens" budgets) count what each layer ran on
    assert tc.stats(model).prefill.average_visual_tokens() == [sum(expected) / depth]


# -- 2. removal equals masking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_removal_equals_masking(family, implementation, batch):
    """Logits of the compressed prefill equal the uncompressed model's with each dropped token masked from the
    layer after its stage on (text positions and kept visual positions)."""
    compressor = PrefillMustDrop(**THRESHOLDS)
    model, inputs, logits = run_prefill(family, implementation, batch, compressor)
    hand = by_hand(family, inputs, compressor)
    check_against_hand(model, inputs, family, hand)
    assert len({int(layer) for layer in hand.drop[hand.drop < NEVER]}) > 1, (
        "a single stage dropped everything"
    )
    expected = reference_logits(family, implementation, inputs, hand.drop)
    real, visual = inputs["attention_mask"].bool(), visual_mask(inputs, family)
    assert_close_at(logits, expected, real & ~visual)
    assert_close_at(logits, expected, real & (hand.drop == NEVER))


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_equals_masking_right_padding_with_budget(family):
    """Right padding, explicit filter layers, a keep ratio (which compounds over the stages), eager attention."""
    compressor = PrefillMustDrop(
        keep=0.6, filter_layers=[0, 2] if family != "llava" else [1, 3, 5], **THRESHOLDS
    )
    model, inputs, logits = run_prefill(family, "eager", "b3", compressor, padding_side="right")
    hand = by_hand(family, inputs, compressor)
    check_against_hand(model, inputs, family, hand)
    expected = reference_logits(family, "eager", inputs, hand.drop)
    real = inputs["attention_mask"].bool()
    assert_close_at(logits, expected, real & (hand.drop == NEVER))


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_not_vacuous(family):
    """Each stage's masking changes the logits: masking only the first stage's drops is not enough."""
    compressor = PrefillMustDrop(**THRESHOLDS)
    model, inputs, logits = run_prefill(family, "sdpa", "b3", compressor)
    hand = by_hand(family, inputs, compressor)
    first_only = torch.where(hand.drop == hand.drop.min(), hand.drop, NEVER)
    partial = reference_logits(family, "sdpa", inputs, first_only)
    text = inputs["attention_mask"].bool() & ~visual_mask(inputs, family)
    where = text & visual_mask(inputs, family).any(1, keepdim=True)
    assert (partial - logits)[where].abs().max() > 1e-3
    plain = reference_logits(family, "sdpa", inputs, torch.full_like(hand.drop, NEVER))
    with torch.no_grad():
        bare = fresh_model(family, "sdpa")(**inputs).logits
    assert_close_at(plain, bare, inputs["attention_mask"].bool(), atol=1e-5)


# -- 3. decode stage ---------------------------------------------------------------------------------------------


def expected_cache(hand, inputs, family: str, layer: int, first_filter: int | None) -> list[list[int]] | None:
    """Per sample, the positions a layer's cache holds after the prefill, in order; None: all of the prompt (the
    layer ran before any drop and keeps padding entries too)."""
    real, visual = inputs["attention_mask"].bool(), visual_mask(inputs, family)
    acting = int(hand.drop[hand.drop < NEVER].min()) if bool((hand.drop < NEVER).any()) else NEVER
    if first_filter is not None and layer >= first_filter:
        final = [positions(real[b] & ~visual[b]) | hand.final[b] for b in range(real.shape[0])]
        return [sorted(kept) for kept in final]
    if layer < acting:
        return None
    return [sorted(kept) for kept in layer_sets(hand.drop, real, layer)]


@pytest.mark.parametrize("decode_stage", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_stage_cache(family, decode_stage):
    """After prefill every layer's cache holds: before the first filter layer K0, the whole prompt; from K0 on,
    the text and the visual tokens that reached the last layer (decode_stage) or the layer's own stage's
    survivors (not). Entries are checked against the reference cache's keys, position by position."""
    compressor = PrefillMustDrop(decode_stage=decode_stage, **THRESHOLDS)
    model, inputs, _ = run_prefill(family, "sdpa", "b3", compressor)
    hand = by_hand(family, inputs, compressor)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    check_against_hand(model, inputs, family, hand)
    ref_model = fresh_model(family, "sdpa")
    with torch.no_grad(), MultiStageReference(ref_model, hand.drop):
        ref_cache = ref_model(**inputs, use_cache=True).past_key_values
    first_filter = max(DEFAULT_FILTERS[family][0], 1) if decode_stage else None  # layer 0 is never trimmed
    held = [cache_layer.keys.shape[2] for cache_layer in out.past_key_values.layers]
    assert tc.stats(model).kv_cache_entries == held
    length = inputs["input_ids"].shape[1]
    for layer, cache_layer in enumerate(out.past_key_values.layers):
        expected = expected_cache(hand, inputs, family, layer, first_filter)
        reference = ref_cache.layers[layer]
        if expected is None:  # every column in place, padding included: compare the real ones
            assert held[layer] == length, f"layer {layer}"
            expected = [sorted(positions(row)) for row in inputs["attention_mask"].bool()]
            slots = expected
        else:  # the kept entries, in order, left-aligned
            assert held[layer] == max(len(p) for p in expected), f"layer {layer}"
            slots = [list(range(len(kept))) for kept in expected]
        for b, kept in enumerate(expected):
            for mine, theirs in ((cache_layer.keys, reference.keys), (cache_layer.values, reference.values)):
                difference = (mine[b, :, slots[b]] - theirs[b, :, kept]).abs().max().item()
                assert difference <= ATOL, f"layer {layer}, sample {b}: {difference:.3g}"
    if decode_stage:
        last = tc.stats(model).prefill.layers[-1]
        final = [set(last.kept_positions(b)) for b in range(len(hand.final))]
        assert held[first_filter:] == [max(len(f) for f in final)] * (len(held) - first_filter)
        assert all(count < length for count in held[first_filter:])


@pytest.mark.parametrize(("implementation", "batch"), [("sdpa", "b1"), ("sdpa", "b3"), ("eager", "b3")])
@pytest.mark.parametrize("decode_stage", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_equal_reference(family, decode_stage, implementation, batch):
    """Greedy decode steps equal the full-sequence reference where the generated tokens' queries do not see the
    finally dropped visual tokens in any layer >= K0 (decode_stage) or see what each layer's stage kept (not),
    while the prompt's queries keep the prefill masking."""
    compressor = PrefillMustDrop(decode_stage=decode_stage, **THRESHOLDS)
    model = fresh_model(family, implementation)
    inputs = make_inputs(model, family, batch)
    tc.compress(model, compressor)
    with torch.no_grad():
        out = model.generate(
            **generate_inputs(inputs),
            max_new_tokens=5,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **GENERATE,
        )
    assert len(out.logits) == 5
    hand = by_hand(family, inputs, compressor)
    check_against_hand(model, inputs, family, hand)
    first_filter = max(DEFAULT_FILTERS[family][0], 1)  # layer 0 is never trimmed: it gives the cache's length
    visual = visual_mask(inputs, family)
    finally_dropped = visual & (hand.drop < NEVER)
    later = torch.where(finally_dropped, first_filter, NEVER) if decode_stage else hand.drop
    full = full_inputs(family, inputs, out.sequences)
    expected = reference_logits(family, implementation, full, hand.drop, later)
    assert_steps_match(out.logits, expected, inputs["input_ids"].shape[1])
    # the two references differ: the decode stage is visible in the logits
    other = torch.where(finally_dropped, first_filter, NEVER) if not decode_stage else hand.drop
    alternative = reference_logits(family, implementation, full, hand.drop, other)
    step = inputs["input_ids"].shape[1] - 1
    assert (alternative[:, step:] - expected[:, step:]).abs().max() > 1e-3
    # the caches generate returns: the prefill's entries plus the 4 decode steps that were fed back
    length = inputs["input_ids"].shape[1]
    held = [cache_layer.keys.shape[2] for cache_layer in out.past_key_values.layers]
    assert tc.stats(model).kv_cache_entries == held
    for layer, count in enumerate(held):
        kept = expected_cache(hand, inputs, family, layer, first_filter if decode_stage else None)
        assert count == (length if kept is None else max(len(p) for p in kept)) + 4, f"layer {layer}"


@pytest.mark.parametrize("filters", [[1, 2, 3, 4], [0, 2, 4]])
def test_multi_turn(filters):
    """A second generate continuing from the trimmed caches equals the reference over the whole conversation:
    every query after the first prompt misses the finally dropped visual tokens from the first filter layer on."""
    compressor = PrefillMustDrop(filter_layers=filters, **THRESHOLDS)
    model = fresh_model("llava")
    inputs = make_inputs(model, "llava", "b3")
    tc.compress(model, compressor)
    kwargs = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, **GENERATE)
    with torch.no_grad():
        first = model.generate(**generate_inputs(inputs), max_new_tokens=4, **kwargs)
    hand = by_hand("llava", inputs, compressor)
    check_against_hand(model, inputs, "llava", hand)
    # trimmed from the first filter layer on, but never layer 0 (transformers reads the length from its cache)
    later = torch.where(visual_mask(inputs, "llava") & (hand.drop < NEVER), max(filters[0], 1), NEVER)
    expected = reference_logits(
        "llava", "sdpa", full_inputs("llava", inputs, first.sequences), hand.drop, later
    )
    assert_steps_match(first.logits, expected, inputs["input_ids"].shape[1])

    conversation, second = second_turn(model, generate_inputs(inputs), first, GENERATE, 4, ["pixel_values"])
    assert torch.equal(second.sequences[:, : conversation.shape[1]], conversation)
    full = full_inputs("llava", inputs, second.sequences)
    expected = reference_logits("llava", "sdpa", full, hand.drop, later)
    assert_steps_match(second.logits, expected, conversation.shape[1])


# -- 4. backends, FLOPs, bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_matches_sdpa(family):
    compressor = {"keep": None, **THRESHOLDS}
    results = {}
    for implementation in IMPLEMENTATIONS:
        model, inputs, logits = run_prefill(family, implementation, "b3", PrefillMustDrop(**compressor))
        prefill = tc.stats(model).prefill
        kept = [[stats.kept_positions(b) for b in range(3)] for stats in prefill.layers]
        results[implementation] = (logits, kept, inputs)
    (eager, eager_kept, inputs), (sdpa, sdpa_kept, _) = results["eager"], results["sdpa"]
    assert eager_kept == sdpa_kept
    assert eager_kept[-1] != eager_kept[0]
    assert_close_at(eager, sdpa, inputs["attention_mask"].bool() & ~visual_mask(inputs, family))


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_match_counter(family):
    """The stats' analytic FLOPs (prefill with the filters' score recomputation, its uncompressed baseline, one
    decode step over the trimmed caches) agree with torch's FlopCounterMode within 2 %."""
    model = fresh_model(family, "sdpa")
    inputs = make_inputs(model, family, "b3")
    bare, _ = measure_flops(lambda: model(**inputs))
    with tc.compressed(model, PrefillMustDrop(**THRESHOLDS)):
        prefill, out = measure_flops(lambda: model(**inputs, use_cache=True))
        stats = tc.stats(model)
        assert stats.prefill.scoring_flops > 0
        assert_flops_close(stats.prefill.flops, prefill)
        assert_flops_close(stats.prefill.baseline_flops, bare)
        step = torch.full((out.logits.shape[0], 1), 9)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
        position = generation_positions(mask)[:, -1:]
        if family != "llava":  # explicit M-RoPE ids, as generate passes them
            position = (position + model.model.rope_deltas)[None].expand(3, -1, -1)
        decode_inputs = {
            "input_ids": step,
            "attention_mask": mask,
            "position_ids": position,
            "past_key_values": out.past_key_values,
        }
        decode, _ = measure_flops(lambda: model(**decode_inputs, use_cache=True))
        stats = tc.stats(model)
        assert stats.last.kind == "decode"
        assert_flops_close(stats.last.flops, decode)
        assert stats.last.flops < stats.last.baseline_flops
    assert prefill < 0.9 * bare


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"filter_layers": [3, 2]}, ValueError, r"filter_layers=\[3, 2\] must be increasing"),
        ({"filter_layers": [2, 2]}, ValueError, r"must be increasing"),
        ({"filter_layers": [-1, 2]}, ValueError, r"must be increasing and >= 0"),
        ({"filter_layers": []}, ValueError, r"non-empty list of ints"),
        ({"filter_layers": [1.0, 2]}, ValueError, r"non-empty list of ints"),
        ({"filter_layers": [True]}, ValueError, r"non-empty list of ints"),
        ({"global_threshold": -0.1}, ValueError, r"global_threshold must be in \[0, 1\]"),
        ({"global_threshold": 1.5}, ValueError, r"global_threshold must be in \[0, 1\]"),
        ({"global_threshold": float("nan")}, ValueError, r"global_threshold must be in \[0, 1\]"),
        ({"individual_threshold": 2}, ValueError, r"individual_threshold must be in \[0, 1\]"),
        ({"individual_threshold": True}, ValueError, r"individual_threshold must be in \[0, 1\]"),
        ({"individual_threshold": "0.1"}, ValueError, r"individual_threshold must be in \[0, 1\]"),
        ({"keep": 0.0}, ValueError, r"keep=0\.0 is outside \(0, 1\]"),
        ({"keep": 1.5}, ValueError, r"keep=1\.5 is outside \(0, 1\]"),
        ({"keep": 0}, ValueError, r"keep=0 must be a count >= 1"),
        ({"keep": True}, TypeError, r"keep must be a float ratio"),
        ({"key_ratio": 1.5}, ValueError, r"key_ratio must be in \[0, 1\]"),
        ({"key_ratio": -0.1}, ValueError, r"key_ratio must be in \[0, 1\]"),
    ],
)
def test_invalid_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        PrefillMustDrop(**kwargs)
    with pytest.raises(error, match=match):
        tc.build("mustdrop", **kwargs)


def _snapshot(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return logits, state, forward_hooks(model)


def _assert_untouched(model, inputs, snapshot):
    logits, state, hooks = snapshot
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert forward_hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)


@pytest.mark.parametrize(
    ("family", "filters", "match"),
    [
        ("llava", [1, 7], r"filter_layers=\[1, 7\] is outside this model; allowed 0\.\.6"),
        ("llava", [9], r"filter_layers=\[9\] is outside this model; allowed 0\.\.6"),
        ("qwen2_vl", [0, 3], r"filter_layers=\[0, 3\] is outside this model; allowed 0\.\.2"),
    ],
)
def test_filter_layers_outside_the_model(family, filters, match):
    model = fresh_model(family)
    inputs = make_inputs(model, family, "b1")
    snapshot = _snapshot(model, inputs)
    with pytest.raises(ValueError, match=match):
        tc.compress(model, PrefillMustDrop(filter_layers=filters))
    _assert_untouched(model, inputs, snapshot)


TOO_MANY = r"keep=37 tokens is more than the 36 visual tokens of a sample in this batch"


def test_keep_count_larger_than_a_sample():
    """keep=37 with a 36-token sample: a clear error in forward and generate before the vision tower runs; the
    model stays usable and unchanged."""
    model = fresh_model("llava")
    inputs = make_inputs(model, "llava", "b3")
    snapshot = _snapshot(model, inputs)
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        with tc.compressed(model, PrefillMustDrop(keep=37)):
            with pytest.raises(ValueError, match=TOO_MANY), torch.no_grad():
                model(**inputs)
            with pytest.raises(ValueError, match=TOO_MANY), torch.no_grad():
                model.generate(**generate_inputs(inputs), max_new_tokens=2, do_sample=False)
            assert not calls, "the vision tower ran before the error"
            one = {key: value[1:2] for key, value in inputs.items() if key != "pixel_values"}
            with torch.no_grad():  # the count fits the two-image sample (72 visual tokens) alone
                model(**one, pixel_values=inputs["pixel_values"][1:])
            assert tc.stats(model).prefill.layers[2].visual[0] == 37  # the budget exactly, keys included
    finally:
        handle.remove()
    _assert_untouched(model, inputs, snapshot)
