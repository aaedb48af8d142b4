"""The invariants of DESIGN.md on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL models (M-RoPE, variable grids,
several images per sample, video, Qwen3-VL DeepStack), for FastV and RandomDrop.

Every comparison is against the uncompressed model or `reference.MaskingReference` (own hooks, own masks). The
reference lets the uncompressed model compute its own M-RoPE ids; `test_reference_positions_are_generates`
checks that those are the ids `generate` uses.
"""

from __future__ import annotations

import functools

import helpers
import pytest
import torch
from helpers import (
    ATOL,
    assert_close_at,
    assert_generate_matches_reference,
    assert_steps_match,
    assert_untouched,
    check_flops_match_counter,
    check_pruned_cache,
    check_raises_before_vision,
    dropped_from_stats,
    extend,
    forward_hooks,
    kept_sets,
    kept_visual,
    make_compressor,
    reference_logits,
    second_turn,
)
from reference import MaskingReference, fastv_kept, generation_positions

import tokencompress as tc
from tokencompress.tiny_qwen import (
    FAMILIES,
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    tiny_qwen_inputs,
    tiny_qwen_vl,
)

NUM_LAYERS = 4
IMPLEMENTATIONS = ["eager", "sdpa"]
METHODS = ["fastv", "random"]
VISUAL_IDS = (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)
# A random model may generate a placeholder id; a full forward over prompt + generated tokens would then count
# more placeholders than features and fail inside transformers.
GENERATE = {"suppress_tokens": list(VISUAL_IDS)}

# One sample per row: ("text", n), ("image", (h, w)), ("video", (t, h, w)), grids in patches before the 2 x 2 merge.
BATCH_1 = [[("text", 3), ("image", (4, 6)), ("text", 5)]]
BATCH_3 = [  # different image sizes, two images in a sample, a video, a sample with no media
    [("text", 2), ("image", (4, 4)), ("text", 2), ("image", (2, 6)), ("text", 4)],
    [("text", 3), ("video", (2, 4, 4)), ("text", 4)],
    [("text", 5)],
]
BATCH_3B = [  # an image and a video in one sample
    [("text", 1), ("image", (6, 4)), ("text", 1), ("video", (3, 2, 4)), ("text", 3)],
    [("text", 4), ("image", (2, 2)), ("text", 6)],
    [("text", 2), ("video", (1, 4, 6)), ("text", 2)],
]
BATCH_VIDEO = [  # videos only (Qwen3-VL: DeepStack features of videos alone), one of a single token
    [("text", 2), ("video", (2, 4, 4)), ("text", 3)],
    [("text", 1), ("video", (1, 2, 2)), ("text", 4)],
]
BATCHES = {"b1": BATCH_1, "b3": BATCH_3, "b3b": BATCH_3B, "video": BATCH_VIDEO}
# (layer, keep): layer 1 drops while Qwen3-VL's DeepStack still injects into layer 1 (vision depth 2)
SETTINGS = [(1, 0.5), (2, 0.25), (3, 1)]


def fresh_model(family: str, implementation: str = "sdpa") -> torch.nn.Module:
    """A new, never compressed model; the same weights under every implementation."""
    return tiny_qwen_vl(family, layers=NUM_LAYERS, attn_implementation=implementation, seed=0)


def make_inputs(model, batch, seed: int = 0) -> dict[str, torch.Tensor]:
    return tiny_qwen_inputs(model, batch, seed=seed)


visual_mask, text_mask, check_kept_accounting = helpers.bind(VISUAL_IDS, NUM_LAYERS)


greedy = functools.partial(helpers.greedy, **GENERATE)


# -- 1. identity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_keep_all(family, method, implementation):
    """keep=1.0 changes nothing (Qwen3-VL: the DeepStack injection the engine takes over included), and
    uncompress restores the exact model."""
    model = fresh_model(family, implementation)
    inputs = make_inputs(model, BATCH_3B)
    where = inputs["attention_mask"].bool()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
    expected_tokens = greedy(model, inputs).sequences
    hooks = forward_hooks(model)

    assert tc.compress(model, make_compressor(method, 1, 1.0)) is model
    with torch.no_grad():
        logits = model(**inputs).logits
    check_kept_accounting(model, inputs, 1, 1.0)
    tokens = greedy(model, inputs).sequences
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, where, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)

    assert tc.uncompress(model) is model
    with torch.no_grad():
        again = model(**inputs).logits
    assert torch.equal(again, expected)
    assert torch.equal(greedy(model, inputs).sequences, expected_tokens)
    assert_untouched(model, state, hooks)


def test_deepstack_is_not_vacuous():
    """Qwen3-VL's DeepStack features change the logits, so identity and removal-equals-masking at layer 1 (it
    injects into layers 0 and 1) really check that the engine adds them at the kept tokens."""
    model = fresh_model("qwen3_vl")
    assert model.config.vision_config.deepstack_visual_indexes == [0, 1]
    inputs = make_inputs(model, BATCH_3B)
    with torch.no_grad():
        plain = model(**inputs).logits
    for merger in model.model.visual.deepstack_merger_list:  # the features added after layer 0, then layer 1
        handle = merger.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        try:
            with torch.no_grad():
                without = model(**inputs).logits
        finally:
            handle.remove()
        assert (plain - without)[text_mask(inputs)].abs().max() > 1e-3


# -- 2. removal equals masking ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("layer,keep", SETTINGS)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_removal_equals_masking(family, method, implementation, layer, keep, batch):
    model, ref_model = fresh_model(family, implementation), fresh_model(family, implementation)
    inputs = make_inputs(model, BATCHES[batch])
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        logits = model(**inputs).logits
    kept = check_kept_accounting(model, inputs, layer, keep)
    visual = visual_mask(inputs)
    if method == "fastv":
        independent = fastv_kept(fresh_model(family, "eager"), inputs, layer, keep, VISUAL_IDS)
        assert kept_visual(kept, visual) == independent

    dropped = dropped_from_stats(model, layer, visual)
    assert dropped.any(), "the setting should drop something"
    expected = reference_logits(ref_model, layer, dropped, inputs)
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, inputs["attention_mask"].bool() & ~dropped)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_batch_is_untouched(family):
    """A batch without images or videos runs as the bare model does, forward and generate."""
    model = fresh_model(family)
    inputs = make_inputs(model, [[("text", 4)], [("text", 7)]])
    with torch.no_grad():
        expected = model(**inputs).logits
    expected_tokens = greedy(model, inputs).sequences
    tc.compress(model, tc.FastV(layer=1, keep=0.25))
    with torch.no_grad():
        logits = model(**inputs).logits
    assert_close_at(logits, expected, inputs["attention_mask"].bool(), atol=1e-5)
    assert torch.equal(greedy(model, inputs).sequences, expected_tokens)


def test_reference_is_not_vacuous():
    """Masking dropped keys changes the logits; masking nothing is the model itself."""
    model = fresh_model("qwen2_5_vl")
    inputs = make_inputs(model, BATCH_3)
    with torch.no_grad():
        plain = model(**inputs).logits
    visual = visual_mask(inputs)
    dropped = visual & (torch.arange(visual.shape[1]) % 2 == 0)
    masked = reference_logits(model, 2, dropped, inputs)
    where = text_mask(inputs) & visual.any(1, keepdim=True)
    assert (plain - masked)[where].abs().max() > 1e-3
    same = reference_logits(model, 2, torch.zeros_like(visual), inputs)
    assert_close_at(same, plain, inputs["attention_mask"].bool(), atol=1e-5)


# -- positions ----------------------------------------------------------------------------------------------


def _capture_text_positions(model) -> tuple[list[torch.Tensor], object]:
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"])

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_positions_are_generates(family):
    """The M-RoPE ids an uncompressed model computes for itself over prompt + generated tokens (what the masking
    reference uses) are the ids `generate` gave the prompt and every decode step."""
    model = fresh_model(family)
    inputs = make_inputs(model, BATCH_3)
    seen, handle = _capture_text_positions(model)
    try:
        out = greedy(model, inputs, new_tokens=4)
        steps = len(seen)
        with torch.no_grad():
            model(**extend(inputs, out.sequences))
    finally:
        handle.remove()
    assert steps == 4
    # (4, B, L - 1): text row, then t, h, w; the last generated token is never fed back
    by_generate = torch.cat(seen[:steps], dim=-1)
    length = by_generate.shape[-1]
    assert by_generate.shape[0] == 4 and length == out.sequences.shape[1] - 1
    full = extend(inputs, out.sequences)
    real = full["attention_mask"].bool()[:, :length]
    own = seen[steps]  # (3, B, L): the model's own M-RoPE ids, text tokens included
    assert own.shape == (3, *out.sequences.shape)
    assert torch.equal(by_generate[1:][:, real], own[:, :, :length][:, real])
    assert torch.equal(by_generate[0][real], generation_positions(full["attention_mask"])[:, :length][real])
    # the ids are really 3-D at visual tokens (else the check below would be 1-D RoPE in disguise)
    visual = visual_mask(inputs)
    prompt = own[:, :, : visual.shape[1]]
    assert (prompt[1][visual] != prompt[0][visual]).any() and (prompt[2][visual] != prompt[1][visual]).any()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_keep_their_mrope_ids(family, method):
    """The layers after the drop see, at each kept token, the rotary embedding (and text position id) that
    token has in the uncompressed model: its own (t, h, w) M-RoPE ids, not those of a shorter sequence."""
    layer, keep = 2, 0.25
    model, ref_model = fresh_model(family), fresh_model(family)
    inputs = make_inputs(model, BATCH_3B)
    # the 4-row ids generate passes (text row first), so the layers also receive a text position_ids
    rope, _ = ref_model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    positions = torch.cat([generation_positions(inputs["attention_mask"])[None], rope])
    inputs = {**inputs, "position_ids": positions}

    def capture(model):
        seen = {}

        def hook(index):
            def record(module, args, kwargs):
                seen[index] = (kwargs["position_embeddings"], kwargs.get("position_ids"))

            return record

        handles = [
            decoder.register_forward_pre_hook(hook(i), with_kwargs=True)
            for i, decoder in enumerate(model.model.language_model.layers)
        ]
        return seen, handles

    full, handles = capture(ref_model)
    with torch.no_grad():
        ref_model(**inputs)
    for handle in handles:
        handle.remove()

    tc.compress(model, make_compressor(method, layer, keep))
    short, handles = capture(model)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    prefill = tc.stats(model).prefill
    for index in range(layer, NUM_LAYERS):
        where = prefill.layers[index].positions  # (B, slots): input position of each slot, -1 for filler
        (cos, sin), text_ids = short[index]
        (full_cos, full_sin), full_text_ids = full[index]
        assert cos.shape[1] == where.shape[1] < inputs["input_ids"].shape[1]
        for b in range(where.shape[0]):
            slots = torch.nonzero(where[b] >= 0).flatten()
            source = where[b, slots]
            assert torch.equal(cos[min(b, cos.shape[0] - 1), slots], full_cos[b, source])
            assert torch.equal(sin[min(b, sin.shape[0] - 1), slots], full_sin[b, source])
            if text_ids is not None:
                assert full_text_ids is not None
                assert torch.equal(text_ids[b, slots], full_text_ids[b, source])
        # the kept visual tokens include some whose spatial ids differ from their temporal id
        kept_visual = torch.zeros_like(where, dtype=torch.bool)
        kept_visual[where >= 0] = visual_mask(inputs).gather(1, where.clamp(min=0))[where >= 0]
        ids = rope.gather(2, where.clamp(min=0).expand(3, -1, -1))
        assert (ids[1][kept_visual] != ids[0][kept_visual]).any()


# -- 3. cache -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_greedy(family, method, implementation, batch):
    """Every decode step's logits with the pruned cache equal a full forward over prompt + generated tokens with
    the same tokens masked (its M-RoPE ids computed by the uncompressed model itself)."""
    layer, keep, new_tokens = 1, 0.25, 5
    model, ref_model = fresh_model(family, implementation), fresh_model(family, implementation)
    inputs = make_inputs(model, BATCHES[batch])
    tc.compress(model, make_compressor(method, layer, keep))
    out = greedy(model, inputs, new_tokens)
    assert len(out.logits) == new_tokens
    check_kept_accounting(model, inputs, layer, keep)
    dropped = dropped_from_stats(model, layer, visual_mask(inputs))
    assert dropped.any()
    prompt = inputs["input_ids"].shape[1]
    expected = reference_logits(ref_model, layer, dropped, extend(inputs, out.sequences))
    assert_steps_match(out.logits, expected, prompt)
    # the pruned cache holds only kept tokens from layer K on, and the stats say so
    check_pruned_cache(model, out.past_key_values, layer, prompt + new_tokens - 1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_beam_search(family, method):
    """Beam search (Qwen repeats pixels and grids per beam, several images per sample included): every beam of a
    sample keeps the same tokens, and the result is the reference's."""
    layer, keep, beams = 1, 0.25, 3
    model, ref_model = fresh_model(family), fresh_model(family)
    inputs = make_inputs(model, BATCH_3B)
    kwargs = dict(
        max_new_tokens=5,
        num_beams=beams,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        **GENERATE,
    )
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    dropped = dropped_from_stats(model, layer, visual_mask(inputs).repeat_interleave(beams, dim=0))
    assert dropped.any()
    assert torch.equal(dropped, dropped[::beams].repeat_interleave(beams, dim=0))
    assert_generate_matches_reference(out, ref_model, layer, dropped, inputs, kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn(family, method):
    """A second generate continuing from the pruned cache (transformers then adds its stored rope_deltas to the
    text positions) equals the reference over the whole conversation, media included."""
    layer, keep = 1, 0.25
    model, ref_model = fresh_model(family), fresh_model(family)
    inputs = make_inputs(model, BATCH_3)
    tc.compress(model, make_compressor(method, layer, keep))
    first = greedy(model, inputs, new_tokens=4)
    dropped = dropped_from_stats(model, layer, visual_mask(inputs))
    conversation, second = second_turn(
        model, inputs, first, GENERATE, 8, ["pixel_values", "pixel_values_videos"]
    )
    assert torch.equal(second.sequences[:, : conversation.shape[1]], conversation)
    expected = reference_logits(ref_model, layer, dropped, extend(inputs, second.sequences))
    assert_steps_match(second.logits, expected, conversation.shape[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_decode_loop_default_positions(family):
    """Prefill then decode steps by hand with neither position_ids nor attention_mask (batch 1): transformers
    derives the M-RoPE ids from the cache length and rope_deltas, so the cache must report the logical length."""
    layer, keep = 1, 0.25
    model, ref_model = fresh_model(family), fresh_model(family)
    inputs = make_inputs(model, BATCH_1)
    inputs.pop("attention_mask")
    steps = torch.tensor([[17], [42], [99]])
    tc.compress(model, make_compressor("fastv", layer, keep))

    def run(model):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            logits = [out.logits[:, -1]]
            for token in steps:
                out = model(input_ids=token[None], past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits[:, -1])
        return logits

    actual = run(model)
    dropped = dropped_from_stats(model, layer, torch.isin(inputs["input_ids"], torch.tensor(VISUAL_IDS)))
    assert dropped.any()
    with MaskingReference(ref_model, layer, dropped):
        expected = run(ref_model)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        difference = (a - e).abs().max().item()
        assert difference <= ATOL, f"step {step}: max |difference| {difference:.3g} > {ATOL}"


# -- 4. backends --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_matches_sdpa(family, method):
    layer, keep = 2, 0.25
    results = {}
    for implementation in IMPLEMENTATIONS:
        model = fresh_model(family, implementation)
        inputs = make_inputs(model, BATCH_3B)
        tc.compress(model, make_compressor(method, layer, keep))
        with torch.no_grad():
            logits = model(**inputs).logits
        results[implementation] = (logits, kept_sets(model, layer, logits.shape[0]))
    (eager, eager_kept), (sdpa, sdpa_kept) = results["eager"], results["sdpa"]
    assert eager_kept == sdpa_kept
    assert_close_at(eager, sdpa, text_mask(inputs))


# -- 5. accounting ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_flops_match_counter(family, implementation):
    model = fresh_model(family, implementation)
    inputs = make_inputs(model, BATCH_3)

    def decode_positions(mask):
        # explicit ids as generate passes them: transformers 5.23 derives (B, L + 1) ids from a 2-D mask on a
        # cached step without them, which fails on the bare model too (rope_deltas: set by the prefill)
        position = generation_positions(mask)[:, -1:] + model.model.rope_deltas
        return position[None].expand(3, -1, -1)

    check_flops_match_counter(model, inputs, inputs["attention_mask"], decode_positions)


# -- 6. bad input -------------------------------------------------------------------------------------------


def _mismatched(model, kind: str) -> dict[str, torch.Tensor]:
    """Inputs whose grids disagree with their placeholders (pixels consistent with the grids)."""
    if kind == "total":  # the grid of the first image claims 4 x 8 patches, the prompt has 4 x 4 / 4 tokens
        inputs = make_inputs(model, BATCH_3)
        grid = inputs["image_grid_thw"].clone()
        grid[0] = torch.tensor([1, 4, 8])
    elif kind == "split":  # the same total, split differently between the two images of a sample
        inputs = make_inputs(
            model, [[("text", 2), ("image", (2, 2)), ("text", 1), ("image", (4, 4)), ("text", 2)]]
        )
        grid = inputs["image_grid_thw"].flip(0)
    else:  # a video with one temporal patch more than its placeholders
        inputs = make_inputs(model, BATCH_3B)
        grid = inputs["video_grid_thw"].clone()
        grid[0, 0] += 1
    key = "image_grid_thw" if kind != "video" else "video_grid_thw"
    pixels = "pixel_values" if kind != "video" else "pixel_values_videos"
    patches = int(grid.prod(-1).sum())
    return {
        **inputs,
        key: grid,
        pixels: torch.randn(patches, inputs[pixels].shape[1], generator=torch.Generator().manual_seed(1)),
    }


@pytest.mark.parametrize("kind", ["total", "split", "video"])
@pytest.mark.parametrize("family", FAMILIES)
def test_grid_placeholder_mismatch_raises_before_vision(family, kind):
    model = fresh_model(family)
    inputs = _mismatched(model, kind)
    check_raises_before_vision(model, [model.model.visual], inputs)


def test_inputs_follow_the_processor_layout():
    """tiny_qwen_inputs: placeholders per grid, vision_start/end around each span (Qwen3-VL: per frame), token
    types 1/2 at image/video tokens, flattened patches, grids in patches."""
    for family in FAMILIES:
        model = fresh_model(family)
        inputs = make_inputs(model, BATCH_3B)
        ids, types, real = inputs["input_ids"], inputs["mm_token_type_ids"], inputs["attention_mask"].bool()
        assert torch.equal(types == 1, ids == IMAGE_TOKEN_ID)
        assert torch.equal(types == 2, ids == VIDEO_TOKEN_ID)
        assert int((ids == IMAGE_TOKEN_ID).sum()) == int(inputs["image_grid_thw"].prod(-1).sum()) // 4
        assert int((ids == VIDEO_TOKEN_ID).sum()) == int(inputs["video_grid_thw"].prod(-1).sum()) // 4
        spans = int((ids == VISION_START_TOKEN_ID).sum())
        frames = int(inputs["video_grid_thw"][:, 0].sum()) if family == "qwen3_vl" else 2
        assert spans == int((ids == VISION_END_TOKEN_ID).sum()) == 2 + frames
        vision = model.config.vision_config
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        assert inputs["pixel_values"].shape == (int(inputs["image_grid_thw"].prod(-1).sum()), width)
        assert inputs["pixel_values_videos"].shape == (int(inputs["video_grid_thw"].prod(-1).sum()), width)
        assert not real[:, 0].all() and real[:, -1].all()  # left padding
