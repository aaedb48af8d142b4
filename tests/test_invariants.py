"""The invariants of DESIGN.md for token droppers (FastV, RandomDrop) on tiny random LLaVA models.

Every comparison is against the uncompressed model or against `reference.MaskingReference`, an independent
implementation (own hooks, own masks) of "keep the full sequence, mask the dropped keys from layer K on".
"""

from __future__ import annotations

import copy

import helpers
import pytest
import torch
from conftest import NUM_LAYERS, fresh_model
from helpers import (
    ATOL,
    assert_close_at,
    assert_generate_matches_reference,
    assert_steps_match,
    assert_untouched,
    check_pruned_cache,
    dropped_from_stats,
    extend,
    forward_hooks,
    kept_sets,
    kept_visual,
    make_compressor,
    second_turn,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import MaskingReference, fastv_kept, generation_positions

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, tiny_llava_inputs

IMPLEMENTATIONS = ["eager", "sdpa"]
METHODS = ["fastv", "random"]

# (prompt lengths (prefix, suffix) per sample, images per sample)
BATCH_1 = ([(3, 5)], [1])
BATCH_3 = ([(2, 4), (5, 2), (1, 6)], [1, 2, 0])
BATCH_3B = ([(4, 3), (1, 5), (3, 2)], [2, 1, 1])
# Beam search repeats pixel_values image by image, which misassigns images when a sample has several: one image
# at most per sample there (a transformers limitation, not tokencompress's).
BATCH_3_BEAM = ([(2, 4), (5, 2), (1, 6)], [1, 0, 1])
BATCHES = {"b1": BATCH_1, "b3": BATCH_3, "b3b": BATCH_3B}

SETTINGS = [(1, 0.5), (2, 0.25), (3, 0.1), (2, 5)]

# A random model sometimes generates the image placeholder id; a full forward over prompt + generated tokens
# (the references below) would then find more placeholders than image features and fail inside transformers.
# Generation tests suppress it; test_generated_placeholder_id_decodes_as_text covers that case on its own.
GENERATE = {"suppress_tokens": [IMAGE_TOKEN_ID]}
VISUAL_IDS = (IMAGE_TOKEN_ID,)


def make_inputs(model, batch, padding_side: str = "left", seed: int = 0) -> dict[str, torch.Tensor]:
    lengths, images = batch
    return tiny_llava_inputs(model, lengths, images, seed=seed, padding_side=padding_side)


def with_positions(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}


visual_mask, text_mask, check_kept_accounting = helpers.bind(VISUAL_IDS, NUM_LAYERS)


def last_real(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token."""
    index = torch.arange(attention_mask.shape[1]).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), index, -1).amax(1)


def reference_logits(
    ref_model, layer: int, dropped: torch.Tensor, inputs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The masking reference at the position ids `generate` uses."""
    return helpers.reference_logits(ref_model, layer, dropped, with_positions(inputs))


def check_steps_against_reference(out, ref_model, layer, dropped, inputs, first_position: int) -> None:
    """Logits of decode step t (out.logits[t]) == reference logits at position first_position - 1 + t."""
    full = extend(inputs, out.sequences)
    logits = reference_logits(ref_model, layer, dropped, full)
    assert len(out.logits) >= 1
    assert_steps_match(out.logits, logits, first_position)


# -- 1. identity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_keep_all(method, implementation):
    model = fresh_model(implementation)
    inputs = make_inputs(model, BATCH_3)
    where = inputs["attention_mask"].bool()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, **GENERATE)
    hooks = forward_hooks(model)

    assert tc.compress(model, make_compressor(method, 2, 1.0)) is model
    with torch.no_grad():
        logits = model(**inputs).logits
        check_kept_accounting(model, inputs, 2, 1.0)
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, **GENERATE)
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, where, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)

    assert tc.uncompress(model) is model
    with torch.no_grad():
        again = model(**inputs).logits
        again_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False, **GENERATE)
    assert torch.equal(again, expected)
    assert torch.equal(again_tokens, expected_tokens)
    assert_untouched(model, state, hooks)


# -- 2. removal equals masking ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("layer,keep", SETTINGS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_removal_equals_masking(method, implementation, layer, keep, batch):
    model = fresh_model(implementation)
    ref_model = fresh_model(implementation)
    inputs = make_inputs(model, BATCHES[batch])
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        logits = model(**with_positions(inputs)).logits
    kept = check_kept_accounting(model, inputs, layer, keep)
    visual = visual_mask(inputs)
    if method == "fastv":
        independent = fastv_kept(fresh_model("eager"), with_positions(inputs), layer, keep, IMAGE_TOKEN_ID)
        assert kept_visual(kept, visual) == independent

    dropped = dropped_from_stats(model, layer, visual)
    assert dropped.any(), "the setting should drop something"
    expected = reference_logits(ref_model, layer, dropped, inputs)
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, text_mask(inputs))
    # kept visual tokens went through the same attention as in the reference too
    assert_close_at(logits, expected, inputs["attention_mask"].bool() & ~dropped)
    rows = torch.arange(logits.shape[0])
    last = last_real(inputs["attention_mask"])
    assert_close_at(logits[rows, last], expected[rows, last], torch.ones(len(rows), dtype=torch.bool))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_removal_equals_masking_default_positions(method, implementation):
    """A plain forward without position_ids (transformers then uses 0..L-1, padding included)."""
    layer, keep = 2, 0.25
    model, ref_model = fresh_model(implementation), fresh_model(implementation)
    inputs = make_inputs(model, BATCH_3B)
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        logits = model(**inputs).logits
    dropped = dropped_from_stats(model, layer, visual_mask(inputs))
    positions = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"])
    with torch.no_grad(), MaskingReference(ref_model, layer, dropped):
        expected = ref_model(**inputs, position_ids=positions).logits
    assert_close_at(logits, expected, inputs["attention_mask"].bool() & ~dropped)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_manual_decode_loop_default_positions(method, implementation):
    """Prefill then decode steps by hand, with neither position_ids nor attention_mask (batch 1): transformers
    derives positions from the cache length, which must stay the uncompressed one."""
    layer, keep = 2, 0.25
    model, ref_model = fresh_model(implementation), fresh_model(implementation)
    inputs = make_inputs(model, BATCH_1)
    inputs.pop("attention_mask")
    steps = torch.tensor([[17], [42], [99]])
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        dropped = dropped_from_stats(model, layer, inputs["input_ids"] == IMAGE_TOKEN_ID)
        actual = [out.logits[:, -1]]
        for token in steps:
            out = model(input_ids=token[None], past_key_values=out.past_key_values, use_cache=True)
            actual.append(out.logits[:, -1])
    with torch.no_grad(), MaskingReference(ref_model, layer, dropped):
        out = ref_model(**inputs, use_cache=True)
        expected = [out.logits[:, -1]]
        for token in steps:
            out = ref_model(input_ids=token[None], past_key_values=out.past_key_values, use_cache=True)
            expected.append(out.logits[:, -1])
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        difference = (a - e).abs().max().item()
        assert difference <= ATOL, f"step {step}: max |difference| {difference:.3g} > {ATOL}"


def test_reference_is_not_vacuous():
    """Masking dropped keys changes the logits: the comparisons above would catch an engine that drops nothing."""
    model = fresh_model("sdpa")
    inputs = make_inputs(model, BATCH_3)
    with torch.no_grad():
        plain = model(**with_positions(inputs)).logits
    visual = visual_mask(inputs)
    dropped = visual & (torch.arange(visual.shape[1]) % 2 == 0)
    masked = reference_logits(model, 2, dropped, inputs)
    where = text_mask(inputs) & visual.any(1, keepdim=True)
    assert (plain - masked)[where].abs().max() > 1e-3
    # and the reference with nothing dropped is the model itself
    same = reference_logits(model, 2, torch.zeros_like(visual), inputs)
    assert_close_at(same, plain, inputs["attention_mask"].bool(), atol=1e-5)


# -- 3. cache -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_cache_greedy(method, implementation, batch):
    layer, keep = 2, 0.25
    model, ref_model = fresh_model(implementation), fresh_model(implementation)
    inputs = make_inputs(model, BATCHES[batch])
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **GENERATE,
        )
    assert len(out.logits) == 6
    check_kept_accounting(model, inputs, layer, keep)
    dropped = dropped_from_stats(model, layer, visual_mask(inputs))
    check_steps_against_reference(out, ref_model, layer, dropped, inputs, inputs["input_ids"].shape[1])
    # the pruned cache holds only kept tokens from layer K on, and the stats say what the cache holds
    check_pruned_cache(model, out.past_key_values, layer, inputs["input_ids"].shape[1] + 5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_cache_sampling(method, implementation):
    layer, keep = 1, 0.5
    model, ref_model = fresh_model(implementation), fresh_model(implementation)
    inputs = make_inputs(model, BATCH_3B)
    tc.compress(model, make_compressor(method, layer, keep))
    torch.manual_seed(1234)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=6,
            do_sample=True,
            top_k=0,
            output_logits=True,
            return_dict_in_generate=True,
            **GENERATE,
        )
    dropped = dropped_from_stats(model, layer, visual_mask(inputs))
    check_steps_against_reference(out, ref_model, layer, dropped, inputs, inputs["input_ids"].shape[1])


@pytest.mark.parametrize("batch", ["b1", "b3beam"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_cache_beam_search(method, implementation, batch):
    layer, keep, beams = 2, 0.25, 3
    model, ref_model = fresh_model(implementation), fresh_model(implementation)
    inputs = make_inputs(model, BATCH_1 if batch == "b1" else BATCH_3_BEAM)
    kwargs = dict(
        max_new_tokens=6, num_beams=beams, do_sample=False, return_dict_in_generate=True, **GENERATE
    )
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    # prefill ran on batch x beams rows; every beam of a sample kept the same tokens
    visual = visual_mask(inputs).repeat_interleave(beams, dim=0)
    dropped = dropped_from_stats(model, layer, visual)
    assert torch.equal(dropped, dropped[::beams].repeat_interleave(beams, dim=0)), (
        "the beams of one sample were pruned differently: beam search reorders cache rows among them, so they "
        "must share the prompt's kept set"
    )
    assert dropped.any()
    assert_generate_matches_reference(out, ref_model, layer, dropped, inputs, kwargs)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_generated_placeholder_id_decodes_as_text(method, implementation):
    """A decode step whose token is the image placeholder id (a model can generate any id) carries no image:
    transformers embeds it as an ordinary token, and the compressed model must do the same."""
    layer, keep = 2, 0.5
    model, ref_model = fresh_model(implementation), fresh_model(implementation)
    inputs = make_inputs(model, BATCH_3)
    step = torch.full((inputs["input_ids"].shape[0], 1), IMAGE_TOKEN_ID)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
    position = generation_positions(mask)[:, -1:]
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        prefill = model(**with_positions(inputs), use_cache=True)
        dropped = dropped_from_stats(model, layer, visual_mask(inputs))
        logits = model(
            input_ids=step,
            attention_mask=mask,
            position_ids=position,
            past_key_values=prefill.past_key_values,
        ).logits
    with torch.no_grad(), MaskingReference(ref_model, layer, dropped):
        cache = ref_model(**with_positions(inputs), use_cache=True).past_key_values
        expected = ref_model(
            input_ids=step, attention_mask=mask, position_ids=position, past_key_values=cache
        ).logits
    assert_close_at(logits, expected, torch.ones(logits.shape[:2], dtype=torch.bool))


# -- 4. multi-turn ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_multi_turn(method, implementation):
    layer, keep = 2, 0.25
    model, ref_model = fresh_model(implementation), fresh_model(implementation)
    inputs = make_inputs(model, BATCH_3)
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        first = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **GENERATE,
        )
    dropped = dropped_from_stats(model, layer, visual_mask(inputs))
    check_steps_against_reference(first, ref_model, layer, dropped, inputs, inputs["input_ids"].shape[1])

    conversation, second = second_turn(model, inputs, first, GENERATE, 4, ["pixel_values"])
    assert torch.equal(second.sequences[:, : conversation.shape[1]], conversation)
    # the reference sees the whole conversation, images included, with the turn-1 drops masked from layer K on
    check_steps_against_reference(second, ref_model, layer, dropped, inputs, conversation.shape[1])


# -- 5. backends ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("method", METHODS)
def test_eager_matches_sdpa(method, batch):
    layer, keep = 2, 0.25
    results = {}
    for implementation in IMPLEMENTATIONS:
        model = fresh_model(implementation)
        inputs = make_inputs(model, BATCHES[batch])
        tc.compress(model, make_compressor(method, layer, keep))
        with torch.no_grad():
            logits = model(**with_positions(inputs)).logits
        results[implementation] = (logits, kept_sets(model, layer, logits.shape[0]), inputs)
    (eager, eager_kept, inputs), (sdpa, sdpa_kept, _) = results["eager"], results["sdpa"]
    assert eager_kept == sdpa_kept
    assert_close_at(eager, sdpa, text_mask(inputs))


# -- 6. properties ------------------------------------------------------------------------------------------

_MODELS: dict[str, torch.nn.Module] = {}


def _shared_model(implementation: str) -> torch.nn.Module:
    """One uncompressed model per implementation for all hypothesis examples (each example uncompresses)."""
    if implementation not in _MODELS:
        _MODELS[implementation] = fresh_model(implementation)
    return _MODELS[implementation]


def _at_least_one_image(rows: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    if any(images for _, _, images in rows):
        return rows
    prefix, suffix, _ = rows[0]
    return [(prefix, suffix, 1), *rows[1:]]


# (prefix length, suffix length, images) per sample
samples = st.lists(
    st.tuples(st.integers(0, 5), st.integers(1, 5), st.integers(0, 2)), min_size=1, max_size=3
).map(_at_least_one_image)
keeps = st.one_of(st.integers(1, 1000).map(lambda k: k / 1000), st.integers(1, 16))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    method=st.sampled_from(METHODS),
    implementation=st.sampled_from(IMPLEMENTATIONS),
    layer=st.integers(1, NUM_LAYERS - 1),
    keep=keeps,
    rows=samples,
    padding_side=st.sampled_from(["left", "right"]),
    seed=st.integers(0, 2**16),
)
def test_property_removal_equals_masking(method, implementation, layer, keep, rows, padding_side, seed):
    model = _shared_model(implementation)
    batch = ([(prefix, suffix) for prefix, suffix, _ in rows], [images for _, _, images in rows])
    inputs = make_inputs(model, batch, padding_side=padding_side, seed=seed)
    tc.compress(model, make_compressor(method, layer, keep))
    try:
        with torch.no_grad():
            logits = model(**with_positions(inputs)).logits
        kept = check_kept_accounting(model, inputs, layer, keep)
        visual = visual_mask(inputs)
        dropped = dropped_from_stats(model, layer, visual)
    finally:
        tc.uncompress(model)
    if method == "fastv":
        independent = fastv_kept(_shared_model("eager"), with_positions(inputs), layer, keep, IMAGE_TOKEN_ID)
        assert kept_visual(kept, visual) == independent
    expected = reference_logits(copy.deepcopy(model), layer, dropped, inputs)
    assert_close_at(logits, expected, text_mask(inputs))
    assert_close_at(logits, expected, inputs["attention_mask"].bool() & ~dropped)
