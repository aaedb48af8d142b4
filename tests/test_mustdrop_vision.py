"""MustDrop's vision stage: 3 x 3 windows of near-identical patches merged after the vision encoder's layer 0,
key tokens by the CLS token's attention at its last layer, the copies of a merged token made one token after
decoder layer 0; and, where the adapter does not expose the encoder, the same windows merged on decoder layer 0's
output.

Everything is compared with `vision_reference` (no tokencompress inside): the CLIP encoder run by hand image by
image with pair-by-pair cosine loops, and `MergeReference`, which continues an uncompressed decoder by hand from
its layer-0 output with the merged groups (mean, first member's slot, floor-mean position ids). Random images give
windows of cosine similarity ~0.05, so the LLaVA images have constant (or noisy constant) pixel blocks that make
some windows near-identical; every merge decision and key-token ranking is checked to be away from float noise.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from pooling_reference import Layout
from reference import generation_positions
from vision_reference import (
    MergeReference,
    ceil_ratio,
    clip_by_hand,
    drop_stage,
    grid_similarities,
    merge_stage,
    windows_of,
)

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs

ATOL = 1e-4
FEATURE_ATOL = 1e-5
MARGIN = 0.02  # how far every similarity must be from the threshold
LAYERS = 4
IMAGE_SIZE = 56  # 7 x 7 patches of 8 px: 4 whole windows, the last row and column in none
SIDE = 7
LENGTHS, IMAGES = [(2, 4), (5, 3), (1, 6)], [1, 2, 0]
VisionOnly = functools.partial(tc.MustDrop, prefill_stage=False)
# a filter that drops every visual token but the key tokens (no score reaches 1 x the total or 1)
KeysOnly = functools.partial(tc.MustDrop, global_threshold=1.0, individual_threshold=1.0)


# -- tiny LLaVA-1.5 with crafted images ---------------------------------------------------------------------------


@functools.cache
def _pristine(implementation: str) -> torch.nn.Module:
    return tiny_llava(
        layers=LAYERS, image_size=IMAGE_SIZE, patch_size=8, attn_implementation=implementation, seed=0
    )


def llava_model(implementation: str = "sdpa") -> torch.nn.Module:
    return copy.deepcopy(_pristine(implementation))


def crafted(pixels: torch.Tensor) -> torch.Tensor:
    """Image 0: window 0 constant (~1.0), window 3 constant + noise (~0.7: merges at 0.5, not at 0.8); image 1:
    windows 0 and 1 constant; image 2: window 2 constant. The rest stays random (~0.05)."""
    pixels = pixels.clone()
    noise = torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(1))
    pixels[0, :, :24, :24] = 1.5
    pixels[0, :, 24:48, 24:48] = 0.7 + 0.5 * noise
    if len(pixels) > 2:
        pixels[1, :, :24, :] = -1.0
        pixels[2, :, 24:48, :24] = 2.0
    return pixels


def llava_inputs(model, lengths=LENGTHS, images=IMAGES, positions: bool = True) -> dict[str, torch.Tensor]:
    inputs = tiny_llava_inputs(model, lengths, images)
    inputs["pixel_values"] = crafted(inputs["pixel_values"])
    if positions:
        inputs["position_ids"] = generation_positions(inputs["attention_mask"])
    return inputs


def image_places(inputs) -> list[tuple[int, list[int]]]:
    """Per image (in batch order): its sample and the input positions of its patches in raster order."""
    ids = inputs["input_ids"]
    out = []
    for b in range(ids.shape[0]):
        places = torch.nonzero(ids[b] == IMAGE_TOKEN_ID).flatten().tolist()
        out += [(b, places[i : i + SIDE * SIDE]) for i in range(0, len(places), SIDE * SIDE)]
    return out


def encoder_by_hand(model, inputs, threshold: float):
    hands = [clip_by_hand(model.model.vision_tower, p, threshold) for p in inputs["pixel_values"]]
    for i, hand in enumerate(hands):
        assert all(abs(s - threshold) > MARGIN for s in hand.similarities), (i, hand.similarities)
        assert 0 < len(hand.merged) < len(hand.similarities), f"image {i}: windows {hand.similarities}"
    return hands


def per_sample(inputs, hands, value) -> list:
    """Per sample, the concatenation of `value(hand, positions)` over its images."""
    out = [[] for _ in range(inputs["input_ids"].shape[0])]
    for (b, places), hand in zip(image_places(inputs), hands, strict=True):
        out[b] += value(hand, places)
    return out


def merged_groups(inputs, hands) -> list[list[list[int]]]:
    return per_sample(inputs, hands, lambda hand, places: [[places[c] for c in t] for t in hand.copies()])


def key_positions(inputs, hands) -> list[set[int]]:
    return [set(k) for k in per_sample(inputs, hands, lambda hand, places: [places[c] for c in hand.keys])]


def hand_counts(inputs, hands) -> list[int]:
    return [sum(c) for c in per_sample(inputs, hands, lambda hand, places: [hand.count])]


def check_key_margins(hands) -> None:
    """The key tokens are not a float-noise decision: the last key and the first non-key differ clearly."""
    for hand in hands:
        ranked = sorted(hand.received, reverse=True)
        count = ceil_ratio(hand.count, 0.08)
        assert ranked[count - 1] - ranked[count] > 1e-5, ranked[: count + 1]


def feature_hook(model, features: torch.Tensor):
    """Make `model`'s projector read `features` (the reference's expanded encoder output)."""
    return model.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: (features,))


def llava_reference(inputs, hands, implementation: str, drop=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, text mask) of the uncompressed model fed the hand encoder's features, continued by hand."""
    model = llava_model(implementation)
    features = torch.stack([hand.outputs[-1][1:] for hand in hands])
    handle = feature_hook(model, features)
    stages = [merge_stage(1, merged_groups(inputs, hands))]
    if drop is not None:
        stages.append(drop_stage(*drop))
    try:
        out = MergeReference(model).run(inputs, stages)
    finally:
        handle.remove()
    return out.logits, out.text


def real_positions(inputs) -> list[set[int]]:
    mask = inputs["attention_mask"].bool()
    return [set(torch.nonzero(mask[b]).flatten().tolist()) for b in range(mask.shape[0])]


def after_merge(inputs, groups) -> list[set[int]]:
    """Real positions left when every group's members but the first leave."""
    return [
        real - {p for group in sample for p in sorted(group)[1:]}
        for real, sample in zip(real_positions(inputs), groups, strict=True)
    ]


def kept(model, layer: int, rows: int) -> list[set[int]]:
    prefill = tc.stats(model).prefill
    return [set(prefill.layers[layer].kept_positions(b)) for b in range(rows)]


# -- 1. the encoder side on LLaVA-1.5 --------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.8, 0.5])
def test_encoder_features_and_stage_counts(threshold):
    """The projector receives the hand encoder's re-expanded features (windows merged after layer 0, the rest of
    the encoder on the short sequence), for a batch whose images merge different numbers of windows; the decoder
    processes one token per merged window from layer 1 on; the stage counts are the hand counts."""
    model = llava_model()
    inputs = llava_inputs(model)
    hands = encoder_by_hand(model, inputs, threshold)
    assert len({len(h.merged) for h in hands}) > 1 or threshold == 0.5
    tc.compress(model, VisionOnly(merge_threshold=threshold))
    seen = []
    model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        model(**inputs)
    expected = torch.stack([hand.outputs[-1][1:] for hand in hands])
    assert len(seen) == 1 and seen[0].shape == expected.shape
    torch.testing.assert_close(seen[0], expected, atol=FEATURE_ATOL, rtol=0)
    counts = hand_counts(inputs, hands)
    stages = tc.stats(model).prefill.tokens_per_stage()
    assert stages == {"input": [49, 98, 0], "vision encoder": counts, "layer 1": counts}
    groups = merged_groups(inputs, hands)
    assert kept(model, 0, 3) == real_positions(inputs)
    for layer in range(1, LAYERS):
        assert kept(model, layer, 3) == after_merge(inputs, groups)


def test_encoder_batch_with_an_unmerged_image():
    """A batch where one image merges a window and another merges none: the short sequences are padded to the
    longest row, which is then as long as the full sequence; the features must still be re-expanded."""
    model = llava_model()
    inputs = llava_inputs(model, [(2, 4), (1, 3)], [1, 1])
    inputs["pixel_values"][1] = torch.randn(
        3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3)
    )
    hands = [clip_by_hand(model.model.vision_tower, p, 0.8) for p in inputs["pixel_values"]]
    assert [len(h.merged) for h in hands] == [1, 0]
    assert all(abs(s - 0.8) > MARGIN for h in hands for s in h.similarities)
    tc.compress(model, VisionOnly())
    seen = []
    model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        model(**inputs)
    assert tc.stats(model).prefill.tokens_per_stage()["vision encoder"] == [41, 49]
    expected = torch.stack([hand.outputs[-1][1:] for hand in hands])
    torch.testing.assert_close(seen[0], expected, atol=FEATURE_ATOL, rtol=0)


def test_merge_decisions_are_not_vacuous():
    """The two thresholds merge different windows (image 0's noisy window), and a different image merges
    differently: the hand encoder's decisions matter for the feature comparison."""
    model = llava_model()
    inputs = llava_inputs(model)
    strict, loose = encoder_by_hand(model, inputs, 0.8), encoder_by_hand(model, inputs, 0.5)
    assert [h.count for h in strict] == [41, 33, 41] and [h.count for h in loose] == [33, 33, 41]
    assert not torch.allclose(strict[0].outputs[-1], loose[0].outputs[-1], atol=1e-3)
    unmerged = clip_by_hand(model.model.vision_tower, inputs["pixel_values"][0], 1.01)
    assert unmerged.count == SIDE * SIDE
    # without any merge the hand encoder is the model's own tower (CLIP hidden_states[-1])
    with torch.no_grad():
        own = model.model.vision_tower(inputs["pixel_values"][:1], output_hidden_states=True).hidden_states[
            -1
        ]
    torch.testing.assert_close(unmerged.outputs[-1], own[0], atol=FEATURE_ATOL, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_key_tokens_are_the_cls_top_merged_tokens(implementation):
    """With a filter that drops every non-key visual token, the visual tokens from the first filter on are
    exactly the hand key tokens (top ceil(0.08 M) merged tokens by CLS attention at the encoder's last layer, at
    their first member's position); the logits equal the reference with those drops."""
    model = llava_model(implementation)
    inputs = llava_inputs(model)
    hands = encoder_by_hand(model, inputs, 0.8)
    check_key_margins(hands)
    compressor = KeysOnly(filter_layers=[1, 2])
    tc.compress(model, compressor)
    with torch.no_grad():
        logits = model(**inputs).logits
    keys = key_positions(inputs, hands)
    groups = merged_groups(inputs, hands)
    merged = after_merge(inputs, groups)
    visual = inputs["input_ids"] == IMAGE_TOKEN_ID
    text = [real - set(torch.nonzero(visual[b]).flatten().tolist()) for b, real in enumerate(merged)]
    per_image = per_sample(inputs, hands, lambda hand, places: [ceil_ratio(hand.count, 0.08)])
    assert [len(k) for k in keys] == [sum(c) for c in per_image] == [4, 7, 0]  # ceil per image
    assert kept(model, 1, 3) == merged
    for layer in (2, 3):
        assert kept(model, layer, 3) == [t | k for t, k in zip(text, keys, strict=True)], layer
    stages = tc.stats(model).prefill.tokens_per_stage()
    assert stages["layer 2"] == [len(k) for k in keys] and stages["layer 3"] == stages["layer 2"]
    drop = [m - t - k for m, t, k in zip(merged, text, keys, strict=True)]
    expected, where = llava_reference(inputs, hands, implementation, drop=(2, drop))
    difference = (logits - expected)[where].abs().max().item()
    assert difference <= ATOL, difference


# -- 2. the decoder side equals the reference ----------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_logits_equal_reference(implementation):
    """Vision stage only, left-padded batch of three (1, 2 and no images, different merge counts)."""
    model = llava_model(implementation)
    inputs = llava_inputs(model)
    hands = encoder_by_hand(model, inputs, 0.8)
    tc.compress(model, VisionOnly())
    with torch.no_grad():
        logits = model(**inputs).logits
    expected, where = llava_reference(inputs, hands, implementation)
    difference = (logits - expected)[where].abs().max().item()
    assert difference <= ATOL, difference


def test_reference_notices_positions_and_merging():
    """The reference is not vacuous: first-member instead of floor-mean positions, or the copies left unmerged,
    change the logits."""
    model = llava_model()
    inputs = llava_inputs(model)
    hands = encoder_by_hand(model, inputs, 0.8)
    expected, where = llava_reference(inputs, hands, "sdpa")
    features = torch.stack([hand.outputs[-1][1:] for hand in hands])
    handle = feature_hook(model, features)
    try:
        groups = [merge_stage(1, merged_groups(inputs, hands))]
        first = MergeReference(model, positions="first").run(inputs, groups).logits
        copies = MergeReference(model).run(inputs, [merge_stage(1, [[], [], []])]).logits
    finally:
        handle.remove()
    assert (first - expected)[where].abs().max().item() > 1e-3
    assert (copies - expected)[where].abs().max().item() > 1e-3


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_greedy_generate_equals_reference(implementation):
    """4 greedy tokens: each step's logits equal the reference on prompt + generated tokens."""
    model = llava_model(implementation)
    inputs = llava_inputs(model, positions=False)
    hands = encoder_by_hand(model, inputs, 0.8)
    tc.compress(model, VisionOnly())
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            suppress_tokens=[IMAGE_TOKEN_ID],
        )
    length = inputs["input_ids"].shape[1]
    full = {
        **inputs,
        "input_ids": out.sequences,
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(3, 4, dtype=torch.long)], 1),
    }
    full["position_ids"] = generation_positions(full["attention_mask"])
    expected, _ = llava_reference(full, hands, implementation)
    for step, step_logits in enumerate(out.logits):
        reference = expected[:, length - 1 + step]
        allowed = torch.arange(reference.shape[-1]) != IMAGE_TOKEN_ID
        difference = (step_logits[:, allowed] - reference[:, allowed]).abs().max().item()
        assert difference <= ATOL, (step, difference)
    assert torch.equal(
        out.sequences[:, length:],
        torch.stack(
            [expected[:, length - 1 + s].masked_fill(~allowed, -torch.inf).argmax(-1) for s in range(4)], 1
        ),
    )


def test_beam_search_and_sampling_run():
    model = llava_model()
    inputs = llava_inputs(model, positions=False)
    tc.compress(model, tc.MustDrop(filter_layers=[1, 2]))
    with torch.no_grad():
        beams = model.generate(
            **inputs, max_new_tokens=3, num_beams=2, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID]
        )
        torch.manual_seed(0)
        sampled = model.generate(
            **inputs,
            max_new_tokens=3,
            do_sample=True,
            num_return_sequences=2,
            suppress_tokens=[IMAGE_TOKEN_ID],
        )
    length = inputs["input_ids"].shape[1]
    assert beams.shape == (3, length + 3)
    assert sampled.shape == (6, length + 3)
    assert "vision encoder" in tc.stats(model).prefill.tokens_per_stage()


# -- 3. the decoder-side fallback (adapters without the encoder) -------------------------------------------------

QWEN_BATCH = [
    [("text", 3), ("image", (12, 12)), ("text", 4)],  # 6 x 6 after the 2 x 2 merger: 4 windows
    [
        ("text", 2),
        ("image", (6, 8)),
        ("text", 1),
        ("image", (4, 12)),
        ("text", 1),
        ("image", (8, 14)),
        ("text", 3),
    ],
    [("text", 5)],
]
NEXT_BATCH = [
    [("text", 2), ("image", (32, 64)), ("text", 1), ("image", (64, 48)), ("text", 3)],
    [("text", 4), ("image", (40, 64)), ("text", 2)],
]


def decoder_windows(hidden: torch.Tensor, cells, grids) -> list[list[tuple[float, list[int]]]]:
    """Per sample, (mean pairwise cosine, member positions) of every whole window of every grid, from the decoder's
    layer-0 output `hidden` (B, L, C); `cells` per sample {position: (grid, row, col)}, `grids` (rows, cols)."""
    out = []
    for b, (sample_cells, shapes) in enumerate(zip(cells, grids, strict=True)):
        windows = []
        for g, (rows, cols) in enumerate(shapes):
            position = {(r, c): p for p, (grid, r, c) in sample_cells.items() if grid == g}
            raster = [position[(k // cols, k % cols)] for k in range(rows * cols)]
            similarities = grid_similarities(hidden[b, raster], rows, cols)
            for similarity, window in zip(similarities, windows_of(rows, cols), strict=True):
                windows.append((similarity, [raster[c] for c in window]))
        out.append(windows)
    return out


def split_threshold(windows) -> float:
    """A threshold in the widest gap between the windows' similarities, some windows on either side."""
    values = sorted(s for sample in windows for s, _ in sample)
    assert len(values) >= 2
    middle = range(len(values) // 4, len(values) - 1 - len(values) // 4)
    gap, at = max((values[i + 1] - values[i], i) for i in middle)
    assert gap > 2e-3, values
    return (values[at] + values[at + 1]) / 2


def layer0_output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[1]


def check_decoder_side(model, reference_model, inputs, cells, grids, layout=None):
    """Windows merged by hand on the uncompressed layer-0 output: kept positions at layer 1 on, stage counts and
    logits against MergeReference."""
    windows = decoder_windows(layer0_output(reference_model, inputs), cells, grids)
    threshold = split_threshold(windows)
    groups = [[members for s, members in sample if s >= threshold] for sample in windows]
    assert any(groups) and any(s < threshold for sample in windows for s, _ in sample)
    tc.compress(model, VisionOnly(merge_threshold=threshold))
    with torch.no_grad():
        logits = model(**inputs).logits
    rows = inputs["input_ids"].shape[0]
    assert kept(model, 0, rows) == real_positions(inputs)
    for layer in range(1, LAYERS):
        assert kept(model, layer, rows) == after_merge(inputs, groups), layer
    stages = tc.stats(model).prefill.tokens_per_stage()
    assert tuple(stages) == ("input", "layer 1")
    assert stages["input"] == [len(cells[b]) for b in range(rows)]  # LLaVA-NeXT's row newlines not counted
    assert stages["layer 1"] == [stages["input"][b] - 8 * len(groups[b]) for b in range(rows)]
    out = MergeReference(reference_model).run(inputs, [merge_stage(1, groups)], layout=layout)
    difference = (logits - out.logits)[out.text].abs().max().item()
    assert difference <= ATOL, difference
    return groups


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_qwen2_vl_decoder_side_windows(implementation):
    """Qwen2-VL (no encoder hooks): windows of each image grid (6 x 6, 3 x 4, 2 x 6: too small, 4 x 7: the last
    column in no window) merged on decoder layer 0's output; the merged token takes the floor-mean cell's M-RoPE
    ids."""
    from tokencompress.tiny_qwen import tiny_qwen_inputs, tiny_qwen_vl

    model = tiny_qwen_vl("qwen2_vl", layers=LAYERS, attn_implementation=implementation, seed=0)
    reference_model = copy.deepcopy(model)
    inputs = tiny_qwen_inputs(model, QWEN_BATCH)
    cells, grids = MergeReference(reference_model).grid_cells(inputs)
    shapes = [[(g.rows, g.cols) for g in sample] for sample in grids]
    assert shapes == [[(6, 6)], [(3, 4), (2, 6), (4, 7)], []]
    check_decoder_side(model, reference_model, inputs, cells, shapes)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_llava_next_decoder_side_windows(implementation):
    """LLaVA-NeXT: the base 4 x 4 grid and the unpadded crop grids (rows separated by newline tokens, which are
    never merged) merged on decoder layer 0's output; the merged token's position is its members' floor mean."""
    from test_llava_next import batch_layout

    from tokencompress.tiny import tiny_llava_next, tiny_llava_next_inputs

    model = tiny_llava_next("llava_next", layers=LAYERS, attn_implementation=implementation, seed=0)
    reference_model = copy.deepcopy(model)
    inputs = tiny_llava_next_inputs(model, NEXT_BATCH)
    inputs["position_ids"] = generation_positions(inputs["attention_mask"])
    layout = batch_layout("llava_next", NEXT_BATCH, inputs)
    assert any(r >= 3 and c >= 3 for shapes in layout.shapes for r, c in shapes[1:])
    reference_layout = Layout(inputs["attention_mask"].bool(), layout.cells, layout.shapes)
    check_decoder_side(model, reference_model, inputs, layout.cells, layout.shapes, layout=reference_layout)


# -- 4. the LLaVA codebase families and LLaVA-HR ----------------------------------------------------------------


def codebase_views(images: torch.Tensor) -> torch.Tensor:
    """(views, 3, S, S) every CLIP view of the batch's images (Mini-Gemini HD: 5 per image), every other view
    made constant (its one 4 x 4 window merges), the others random (none merges)."""
    views = images.flatten(0, -4)
    for v in range(0, len(views), 2):
        views[v] = 0.5 + v / 4
    return views


@pytest.mark.parametrize("family", ["llava", "mgm"])
def test_codebase_families_merge_in_the_encoder(family):
    """llava-torch and the Mini-Gemini stand-ins: the encoder merges (the "vision encoder" counts are the hand
    counts per sample, a text-only sample's dummy image counting nothing) and the decoder processes the merged
    layout from layer 1 on; for llava-torch the logits equal the reference fed the hand encoder's features."""
    pytest.importorskip("llava_codebase")
    import test_llava_codebase as codebase

    model = codebase.fresh_model(family)
    inputs = codebase.make_inputs(family, model, "b3", "right")
    views = codebase_views(inputs["images"])
    tower = model.get_vision_tower().vision_tower
    hands = [clip_by_hand(tower, view, 0.8) for view in views]
    assert all(abs(s - 0.8) > MARGIN for hand in hands for s in hand.similarities)
    assert [len(hand.merged) for hand in hands] == [1 - v % 2 for v in range(len(views))]
    layout = codebase.expected_layout(family, model, inputs, "right")
    images = [1, 2, 0]
    per_image = len(views) // 4  # b3: 1 + 2 images and a dummy
    grids = [len({t[1] for t in tokens}) for tokens in layout.tokens]
    assert grids == [n * per_image for n in images]
    # views image by image, images sample by sample (the encoder's own batch order does not matter here)
    owner = [b for b, n in enumerate(images) for _ in range(max(n, 1))]
    owner = [owner[v // per_image] for v in range(len(views))]
    counts = [
        sum(h.count for h, o in zip(hands, owner, strict=True) if o == b) if images[b] else 0
        for b in range(3)
    ]
    reference_model = codebase.fresh_model(family)
    tc.compress(model, VisionOnly())
    with torch.no_grad():
        logits = model(**inputs).logits
    stages = tc.stats(model).prefill.tokens_per_stage()
    assert stages["input"] == [16 * g for g in grids]
    assert stages["vision encoder"] == counts == stages["layer 1"]
    if family != "llava":
        return
    # llava-torch: the features of CLIP layer -2 (the last but one), merged and re-expanded by hand
    features = torch.stack([hand.outputs[-2][1:] for hand in hands])
    handle = reference_model.get_model().mm_projector.register_forward_pre_hook(lambda m, a: (features,))
    try:
        embeds, mask, _ = codebase.splice(reference_model, inputs)
        cells = [{p: (g, r, c) for p, g, r, c in tokens} for tokens in layout.tokens]
        image_of = [(b, g) for b, n in enumerate(images) for g in range(max(n, 1))]
        groups = [[] for _ in range(3)]
        for (b, g), hand in zip(image_of, hands, strict=True):
            if images[b]:
                for window in hand.copies():
                    groups[b].append(
                        [p for p, grid, r, c in layout.tokens[b] if grid == g and r * 4 + c in window]
                    )
        reference_layout = Layout(layout.real, cells, [[(4, 4)] * n for n in grids])
        out = MergeReference(reference_model).run(
            {"inputs_embeds": embeds, "attention_mask": mask},
            [merge_stage(1, groups)],
            layout=reference_layout,
        )
    finally:
        handle.remove()
    assert kept(model, 1, 3) == [
        set(torch.nonzero(layout.real[b]).flatten().tolist()) - {p for g in groups[b] for p in sorted(g)[1:]}
        for b in range(3)
    ]
    difference = (logits - out.logits)[out.text].abs().max().item()
    assert difference <= ATOL, difference


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_llava_hr_merges_in_its_clip_encoder(implementation):
    """LLaVA-HR's tower runs its CLIP model's forward (with its own embeddings), so the encoder is exposed and the
    windows merge there: with merge_threshold=-1 every whole 3 x 3 window of each 4 x 4 grid merges (16 -> 8
    tokens per image), the copies become one token at the window's first cell from decoder layer 1 on."""
    import test_llava_hr as hr

    model = hr.fresh_model(implementation)
    inputs = hr.make_inputs(model, ([(3, 5)], [3]))
    layout = hr.expected_layout(model, inputs)
    tc.compress(model, VisionOnly(merge_threshold=-1.0))
    with torch.no_grad():
        model(**inputs)
    stages = tc.stats(model).prefill.tokens_per_stage()
    assert stages == {"input": [48], "vision encoder": [24], "layer 1": [24]}
    real = set(torch.nonzero(layout.real[0]).flatten().tolist())
    copies = {p for p, g, r, c in layout.tokens[0] if r < 3 and c < 3 and (r, c) != (0, 0)}
    assert kept(model, 1, 1) == [real - copies]


def test_minigemini_hd_merges_on_the_decoder_side():
    """Mini-Gemini-HD encodes every image's crops before all global views, out of prompt order: the adapter does
    not expose its encoder, so the windows merge on decoder layer 0's output (no "vision encoder" stage); with
    merge_threshold=-1 every whole window of each 4 x 4 grid merges."""
    import test_llava_codebase as codebase

    model = codebase.fresh_model("mgm_hd")
    inputs = codebase.make_inputs("mgm_hd", model, "b3", "right")
    tc.compress(model, VisionOnly(merge_threshold=-1.0))
    with torch.no_grad():
        model(**inputs)
    stages = tc.stats(model).prefill.tokens_per_stage()
    assert "vision encoder" not in stages
    assert stages["input"] == [80, 160, 0]
    assert stages["layer 1"] == [80 - 8 * 5, 160 - 8 * 10, 0]
