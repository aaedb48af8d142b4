"""The invariants of DESIGN.md on tiny random LLaVA-NeXT and LLaVA-OneVision models (any-res images: a base view
plus an unpadded crop grid whose rows each end in a newline token; OneVision videos: pooled frames and one
trailing newline), for FastV and RandomDrop.

Newline tokens carry the image (or video) placeholder id but are structural: never a compressor's candidate,
always kept. Which placeholder positions are newlines, and every token's grid, row and column, are computed here
from the image sizes with transformers' own formulas (select_best_resolution, unpad_image, OneVision's
anyres_max down-scaling and video pooling), independently of the adapter. Every logit comparison is against the
uncompressed model or `reference.MaskingReference` (own hooks, own masks).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import helpers
import pytest
import torch
from helpers import (
    ViewRecorder,
    assert_close_at,
    assert_steps_match,
    assert_untouched,
    check_flops_match_counter,
    check_pruned_cache,
    check_raises_before_vision,
    extend,
    forward_hooks,
    kept_sets,
    make_compressor,
)
from helpers import reference_logits as masked_logits
from reference import expected_keep_count, generation_positions

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_llava_next, tiny_llava_next_inputs

FAMILIES = ("llava_next", "llava_onevision")
NUM_LAYERS = 4
IMPLEMENTATIONS = ["eager", "sdpa"]
METHODS = ["fastv", "random"]
VISUAL_IDS = (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)
# A random model may generate a placeholder id; a full forward over prompt + generated tokens would then count
# more placeholders than features and fail inside transformers.
GENERATE = {"suppress_tokens": list(VISUAL_IDS)}

# The tiny models' any-res setup (tokencompress.tiny): 32 px views of 8 px patches, pinpoints (height, width).
TILE = 32
SIDE = 4  # tokens per side of a view
PINPOINTS = [(32, 32), (32, 64), (64, 32), (64, 64)]
ANYRES_MAX = 1  # OneVision's vision_aspect_ratio "anyres_max_1"

# One sample per row: ("text", n), ("image", (height_px, width_px)), ("video", frames; OneVision only).
BATCH_1 = [[("text", 3), ("image", (32, 64)), ("text", 4)]]
BATCH_3 = {  # left-padded; aspect ratios wide, tall (width unpadded), wide (height unpadded), square
    "llava_next": [
        [("text", 2), ("image", (32, 64)), ("text", 1), ("image", (64, 48)), ("text", 3)],
        [("text", 4), ("image", (40, 64)), ("text", 1), ("image", (32, 32)), ("text", 2)],
        [("text", 5)],
    ],
    "llava_onevision": [
        [("text", 2), ("image", (32, 64)), ("text", 1), ("image", (64, 48)), ("text", 3)],
        [("text", 1), ("image", (32, 32)), ("text", 1), ("video", 2), ("text", 2)],
        [("text", 5)],
    ],
}


def batch_of(family: str, name: str):
    return BATCH_1 if name == "b1" else BATCH_3[family]


@functools.cache
def _pristine(family: str, implementation: str) -> torch.nn.Module:
    return tiny_llava_next(family, layers=NUM_LAYERS, attn_implementation=implementation, seed=0)


def fresh_model(family: str, implementation: str = "sdpa") -> torch.nn.Module:
    """A new, never compressed model; the same weights under every implementation."""
    return copy.deepcopy(_pristine(family, implementation))


def make_inputs(model, samples) -> dict[str, torch.Tensor]:
    return tiny_llava_next_inputs(model, samples, seed=0)


def with_positions(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs with the position ids `generate` uses (a plain forward would count left padding)."""
    return {**inputs, "position_ids": generation_positions(inputs["attention_mask"])}


# -- the layout, computed independently from the image sizes ------------------------------------------------


def best_pinpoint(height: int, width: int) -> tuple[int, int]:
    """transformers' select_best_resolution: most effective pixels, then least waste."""
    best, best_effective, best_waste = None, 0, math.inf
    for pin_height, pin_width in PINPOINTS:
        scale = min(pin_width / width, pin_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = pin_height * pin_width - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (pin_height, pin_width), effective, waste
    return best


def crop_grid(family: str, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of an image's crop grid: the pinpoint's tiles of SIDE x SIDE tokens, unpadded to the
    image's aspect ratio (unpad_image), and for OneVision down-scaled to at most ANYRES_MAX views' worth."""
    pin_height, pin_width = best_pinpoint(height, width)
    rows, cols = pin_height // TILE * SIDE, pin_width // TILE * SIDE
    if width / height > cols / rows:  # wider than the grid: padding rows top and bottom
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    if family == "llava_onevision":
        ratio = math.sqrt(rows * cols / (ANYRES_MAX * SIDE**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


def sample_layout(family: str, sample) -> tuple[list[tuple], list[tuple[int, int]]]:
    """Per token of one sample: ("text",), ("newline",) or ("content", grid, row, col); and the grid shapes.
    An image is its base view (SIDE x SIDE, raster) then its crop grid, each crop row ending in a newline; a
    video is its frames' pooled grids (raster) then one newline."""
    tokens: list[tuple] = []
    shapes: list[tuple[int, int]] = []

    def grid(rows, cols, newline_rows=False):
        index = len(shapes)
        shapes.append((rows, cols))
        for r in range(rows):
            tokens.extend(("content", index, r, c) for c in range(cols))
            if newline_rows:
                tokens.append(("newline",))

    for kind, value in sample:
        if kind == "text":
            tokens.extend([("text",)] * value)
        elif kind == "image":
            grid(SIDE, SIDE)
            grid(*crop_grid(family, *value), newline_rows=True)
        else:
            pooled = math.ceil(SIDE / 2)
            for _ in range(value):
                grid(pooled, pooled)
            tokens.append(("newline",))
    return tokens, shapes


@dataclass
class Layout:
    """The batch's layout at input positions (left padding)."""

    content: torch.Tensor  # (B, L) bool
    newline: torch.Tensor  # (B, L) bool
    cells: list[dict[int, tuple[int, int, int]]]  # per sample: position -> (grid, row, col)
    shapes: list[list[tuple[int, int]]]


def batch_layout(family: str, samples, inputs) -> Layout:
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    batch, width = ids.shape
    content = torch.zeros(batch, width, dtype=torch.bool)
    newline = torch.zeros_like(content)
    cells, shapes = [], []
    for b, sample in enumerate(samples):
        tokens, grid_shapes = sample_layout(family, sample)
        offset = width - len(tokens)
        assert int(real[b].sum()) == len(tokens), "the inputs disagree with the independent token count"
        sample_cells = {}
        for i, token in enumerate(tokens):
            if token[0] == "content":
                content[b, offset + i] = True
                sample_cells[offset + i] = token[1:]
            elif token[0] == "newline":
                newline[b, offset + i] = True
        cells.append(sample_cells)
        shapes.append(grid_shapes)
    placeholders = torch.isin(ids, torch.tensor(VISUAL_IDS)) & real
    assert torch.equal(content | newline, placeholders), (
        "the independent layout misses the model's placeholders"
    )
    return Layout(content, newline, cells, shapes)


def layout_of(family: str, samples, inputs) -> Layout:
    return batch_layout(family, samples, inputs)


# -- shared checks ------------------------------------------------------------------------------------------


def check_kept(model, layout: Layout, inputs, layer: int, keep) -> list[set[int]]:
    """Stats agree with the budget: every real token before `layer`; from `layer` on every text and newline
    token and ceil(N x keep) of the N content visual tokens per sample (images and video together), the same
    set at every later layer. Returns the kept positions at `layer`."""
    prefill = tc.stats(model).prefill
    real = inputs["attention_mask"].bool()
    batch = real.shape[0]
    counts = layout.content.sum(1).tolist()
    assert len(prefill.layers) == NUM_LAYERS
    for stats in prefill.layers:
        positions = [set(stats.kept_positions(b)) for b in range(batch)]
        if stats.layer < layer:
            assert positions == [set(torch.nonzero(real[b]).flatten().tolist()) for b in range(batch)]
            assert stats.visual == counts
            continue
        assert stats.visual == [expected_keep_count(n, keep) for n in counts]
        for b in range(batch):
            always = set(torch.nonzero(real[b] & ~layout.content[b]).flatten().tolist())
            newlines = set(torch.nonzero(layout.newline[b]).flatten().tolist())
            assert newlines <= positions[b], f"layer {stats.layer}: a newline token was dropped"
            assert always <= positions[b], f"layer {stats.layer}: a text token was dropped"
            assert positions[b] <= set(torch.nonzero(real[b]).flatten().tolist())
            assert len(positions[b] - always) == expected_keep_count(counts[b], keep)
        assert positions == kept_sets(model, layer, batch)
    return kept_sets(model, layer, batch)


def dropped_of(layout: Layout, kept: list[set[int]]) -> torch.Tensor:
    dropped = layout.content.clone()
    for b, positions in enumerate(kept):
        for position in positions:
            dropped[b, position] = False
    return dropped


def reference_logits(ref_model, layer, dropped, inputs):
    """The masking reference at the position ids `generate` uses."""
    return masked_logits(ref_model, layer, dropped, with_positions(inputs))


def fastv_content_kept(eager_model, inputs, content: torch.Tensor, layer: int, keep) -> list[set[int]]:
    """FastV recomputed with eager attention on an uncompressed model, over the CONTENT visual tokens only:
    score = attention from the sample's last real token at layer `layer - 1`, mean over heads; top ceil(N x
    keep)."""
    with torch.no_grad():
        attention = eager_model(**with_positions(inputs), output_attentions=True).attentions[layer - 1]
    real = inputs["attention_mask"].bool()
    kept = []
    for b in range(real.shape[0]):
        last = int(torch.nonzero(real[b])[-1])
        scores = attention[b, :, last].float().mean(0)
        columns = torch.nonzero(content[b]).flatten()
        count = expected_keep_count(len(columns), keep)
        top = torch.topk(scores[columns], count).indices if count else columns[:0]
        kept.append({int(c) for c in columns[top]})
    return kept


greedy = functools.partial(helpers.greedy, **GENERATE)


# -- 0. the independent layout agrees with the model -------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_formula_matches_the_models_packing(family):
    """The independent layout's newline positions are exactly where the model splices `image_newline`: the
    check that the formulas above (not the adapter) describe what the model really does."""
    model = fresh_model(family)
    samples = BATCH_3[family]
    inputs = make_inputs(model, samples)
    layout = layout_of(family, samples, inputs)
    spliced = []
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: spliced.append(k["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    is_newline = (spliced[0] == model.model.image_newline).all(-1)
    assert torch.equal(is_newline & inputs["attention_mask"].bool(), layout.newline)
    assert layout.newline.any() and layout.content.any()


# -- 1. identity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_keep_all(family, method, implementation):
    """keep=1.0 changes nothing, forward and generate, and uncompress restores the exact model."""
    model = fresh_model(family, implementation)
    samples = BATCH_3[family]
    inputs = make_inputs(model, samples)
    layout = layout_of(family, samples, inputs)
    where = inputs["attention_mask"].bool()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
    expected_tokens = greedy(model, inputs).sequences
    hooks = forward_hooks(model)

    assert tc.compress(model, make_compressor(method, 1, 1.0)) is model
    with torch.no_grad():
        logits = model(**inputs).logits
    check_kept(model, layout, inputs, 1, 1.0)
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, where, atol=1e-5)
    assert torch.equal(greedy(model, inputs).sequences, expected_tokens)

    assert tc.uncompress(model) is model
    with torch.no_grad():
        again = model(**inputs).logits
    assert torch.equal(again, expected)
    assert torch.equal(greedy(model, inputs).sequences, expected_tokens)
    assert_untouched(model, state, hooks)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_batch_is_untouched(family):
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


# -- 2. removal equals masking ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("layer,keep", [(1, 0.5), (2, 0.25)])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_removal_equals_masking(family, method, implementation, layer, keep, batch):
    model, ref_model = fresh_model(family, implementation), fresh_model(family, implementation)
    samples = batch_of(family, batch)
    inputs = make_inputs(model, samples)
    layout = layout_of(family, samples, inputs)
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        logits = model(**with_positions(inputs)).logits
    kept = check_kept(model, layout, inputs, layer, keep)
    if method == "fastv":
        independent = fastv_content_kept(fresh_model(family, "eager"), inputs, layout.content, layer, keep)
        assert [k & set(torch.nonzero(layout.content[b]).flatten().tolist()) for b, k in enumerate(kept)] == (
            independent
        )
    dropped = dropped_of(layout, kept)
    assert dropped.any(), "the setting should drop something"
    expected = reference_logits(ref_model, layer, dropped, inputs)
    assert logits.shape == expected.shape
    text = inputs["attention_mask"].bool() & ~layout.content & ~layout.newline
    assert_close_at(logits, expected, text)
    assert_close_at(logits, expected, inputs["attention_mask"].bool() & ~dropped)


def test_reference_is_not_vacuous():
    """Masking dropped content changes the text logits; so does masking only the newline tokens (they matter,
    so keeping them is a real property)."""
    family = "llava_next"
    model = fresh_model(family)
    samples = BATCH_3[family]
    inputs = make_inputs(model, samples)
    layout = layout_of(family, samples, inputs)
    with torch.no_grad():
        plain = model(**with_positions(inputs)).logits
    text = inputs["attention_mask"].bool() & ~layout.content & ~layout.newline
    where = text & layout.content.any(1, keepdim=True)
    half = layout.content & (torch.arange(layout.content.shape[1]) % 2 == 0)
    assert (plain - reference_logits(model, 2, half, inputs))[where].abs().max() > 1e-3
    assert (plain - reference_logits(model, 2, layout.newline, inputs))[where].abs().max() > 1e-3
    same = reference_logits(model, 2, torch.zeros_like(half), inputs)
    assert_close_at(same, plain, inputs["attention_mask"].bool(), atol=1e-5)


# -- 3. cache -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_greedy(family, method, implementation, batch):
    """Every decode step's logits with the pruned cache equal a full forward over prompt + generated tokens with
    the same tokens masked."""
    layer, keep, new_tokens = 1, 0.25, 5
    model, ref_model = fresh_model(family, implementation), fresh_model(family, implementation)
    samples = batch_of(family, batch)
    inputs = make_inputs(model, samples)
    layout = layout_of(family, samples, inputs)
    tc.compress(model, make_compressor(method, layer, keep))
    out = greedy(model, inputs, new_tokens)
    assert len(out.logits) == new_tokens
    kept = check_kept(model, layout, inputs, layer, keep)
    dropped = dropped_of(layout, kept)
    assert dropped.any()
    prompt = inputs["input_ids"].shape[1]
    expected = reference_logits(ref_model, layer, dropped, extend(inputs, out.sequences))
    assert_steps_match(out.logits, expected, prompt)
    check_pruned_cache(model, out.past_key_values, layer, prompt + new_tokens - 1)


# -- 4. backends --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_matches_sdpa(family, method):
    layer, keep = 2, 0.25
    samples = BATCH_3[family]
    results = {}
    for implementation in IMPLEMENTATIONS:
        model = fresh_model(family, implementation)
        inputs = make_inputs(model, samples)
        tc.compress(model, make_compressor(method, layer, keep))
        with torch.no_grad():
            logits = model(**with_positions(inputs)).logits
        results[implementation] = (logits, kept_sets(model, layer, logits.shape[0]))
    layout = layout_of(family, samples, inputs)
    (eager, eager_kept), (sdpa, sdpa_kept) = results["eager"], results["sdpa"]
    assert eager_kept == sdpa_kept
    assert_close_at(eager, sdpa, inputs["attention_mask"].bool() & ~layout.content)


# -- 5. accounting ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_flops_match_counter(family, implementation):
    model = fresh_model(family, implementation)
    inputs = with_positions(make_inputs(model, BATCH_3[family]))
    check_flops_match_counter(
        model, inputs, inputs["attention_mask"], lambda mask: generation_positions(mask)[:, -1:]
    )


# -- the grid view ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_grids_in_forward_and_generate(family):
    """Each image is its base grid (4 x 4) then its crop grid (shape from the image size), each video frame a
    pooled grid, numbered per sample in sequence order, rows and columns raster within each grid; newline
    tokens are structural (never in the view, image_index -1). The same in a forward and inside `generate`,
    where transformers has already encoded the images and dropped their sizes."""
    model = fresh_model(family)
    samples = BATCH_3[family]
    inputs = make_inputs(model, samples)
    layout = layout_of(family, samples, inputs)
    recorder = ViewRecorder()
    tc.compress(model, recorder)
    adapter = model._tokencompress_engine.adapter
    derive, derived = adapter.visual_tokens, []

    def spy(inputs):
        tokens = derive(inputs)
        if tokens is not None:
            derived.append((inputs.get("pixel_values") is not None, tokens))
        return tokens

    adapter.visual_tokens = spy
    with torch.no_grad():
        model(**inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False, **GENERATE)

    # the adapter's own layouts: from image_sizes (forward) and from the encoded features (inside generate)
    assert [from_pixels for from_pixels, _ in derived].count(False) >= 1, "generate's encoded path not taken"
    assert len(derived) >= 2
    for _, tokens in derived:
        assert tokens.grid_shape == layout.shapes
        assert torch.equal(tokens.structural, layout.newline)
        assert torch.equal(tokens.image_index >= 0, layout.content)
        for b, cells in enumerate(layout.cells):
            for position, (grid, row, col) in cells.items():
                assert tokens.image_index[b, position] == grid
                assert (tokens.grid_row[b, position], tokens.grid_col[b, position]) == (row, col)
        assert bool((tokens.image_index[layout.newline] == -1).all())
    first = derived[0][1]
    for _, tokens in derived[1:]:
        for name in ("image_index", "grid_row", "grid_col", "structural"):
            assert torch.equal(getattr(tokens, name), getattr(first, name))

    # what the compressor sees (no compression before layer 1, so slot = input position)
    views = [view for view in recorder.views if view.is_visual.any()]
    assert len(views) == 2  # the forward's and generate's prefill
    for view in views:
        assert torch.equal(view.is_visual, layout.content)
        for b, cells in enumerate(layout.cells):
            positions = sorted(cells)
            observed = list(
                zip(
                    view.image_index[b, positions].tolist(),
                    view.grid_row[b, positions].tolist(),
                    view.grid_col[b, positions].tolist(),
                    strict=True,
                )
            )
            assert observed == [cells[p] for p in positions]
    tc.uncompress(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_crop_grid_shapes(family):
    """The independent crop-grid formula on a few sizes (values worked out by hand from transformers' rules)."""
    expected = {
        "llava_next": {
            (32, 64): (4, 8),
            (64, 48): (8, 6),
            (40, 64): (6, 8),
            (32, 32): (4, 4),
            (64, 64): (8, 8),
        },
        "llava_onevision": {(32, 64): (2, 5), (64, 48): (4, 3), (32, 32): (4, 4), (64, 64): (4, 4)},
    }[family]
    for size, shape in expected.items():
        assert crop_grid(family, *size) == shape


# -- 6. bad input -------------------------------------------------------------------------------------------


def _mismatched(model, family: str, kind: str) -> dict[str, torch.Tensor]:
    """Inputs whose image sizes (or video frames) disagree with their placeholders; pixels match the sizes."""
    generator = torch.Generator().manual_seed(1)
    if kind == "video":  # one frame more than the placeholders
        inputs = make_inputs(model, BATCH_3["llava_onevision"])
        videos = inputs["pixel_values_videos"]
        extra = torch.randn(videos.shape[0], 1, *videos.shape[2:], generator=generator)
        return {**inputs, "pixel_values_videos": torch.cat([videos, extra], dim=1)}
    if kind == "total":  # the first image claims 64 x 64 px: more tokens than its placeholders
        inputs = make_inputs(model, BATCH_3[family])
        sizes = inputs["image_sizes"].clone()
        sizes[0] = torch.tensor([64, 64])
    else:  # the two images of a sample swapped: the same total, split differently
        inputs = make_inputs(model, [[("text", 2), ("image", (32, 64)), ("text", 1), ("image", (64, 48))]])
        sizes = inputs["image_sizes"].flip(0)
    pixels = inputs["pixel_values"]
    patches = 1 + (64 // TILE) ** 2  # the most any size can take
    grown = torch.randn(pixels.shape[0], patches, *pixels.shape[2:], generator=generator)
    return {**inputs, "image_sizes": sizes, "pixel_values": grown}


@pytest.mark.parametrize(
    "family,kind",
    [(f, k) for f in FAMILIES for k in ("total", "split")] + [("llava_onevision", "video")],
)
def test_size_placeholder_mismatch_raises_before_vision(family, kind):
    model = fresh_model(family)
    inputs = _mismatched(model, family, kind)
    check_raises_before_vision(model, [model.model.vision_tower], inputs)


# -- OneVision multi-image prompts as its processor builds them ---------------------------------------------


def test_onevision_multi_image_sample_without_patching():
    """LlavaOnevisionImageProcessor always returns `batch_num_images`; a sample with several images then gets no
    any-res crops (transformers' `need_patching`): each image is its base view plus one trailing newline. The
    adapter must read that layout, not the any-res one its image_sizes alone would imply."""
    family = "llava_onevision"
    model, ref_model = fresh_model(family), fresh_model(family)
    per_image = SIDE * SIDE + 1
    generator = torch.Generator().manual_seed(3)
    ids = torch.cat(
        [
            torch.randint(5, 128, (2,), generator=generator),
            torch.full((per_image,), IMAGE_TOKEN_ID),
            torch.randint(5, 128, (1,), generator=generator),
            torch.full((per_image,), IMAGE_TOKEN_ID),
            torch.randint(5, 128, (3,), generator=generator),
        ]
    )[None]
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 1 + 4, 3, TILE, TILE, generator=generator),
        "image_sizes": torch.tensor([[32, 64], [64, 48]]),
        "batch_num_images": torch.tensor([2]),
    }
    with torch.no_grad():
        expected = ref_model(**inputs).logits  # the bare model accepts these inputs
    expected_tokens = greedy(ref_model, inputs).sequences
    content = (ids == IMAGE_TOKEN_ID).clone()
    newline = torch.zeros_like(content)
    for end in torch.nonzero(content[0]).flatten().tolist():
        if end + 1 == ids.shape[1] or not content[0, end + 1]:
            newline[0, end] = True
    content &= ~newline
    tc.compress(model, tc.FastV(layer=1, keep=1.0))
    with torch.no_grad():
        logits = model(**inputs).logits
    assert_close_at(logits, expected, inputs["attention_mask"].bool(), atol=1e-5)
    assert tc.stats(model).prefill.layers[1].visual == [int(content.sum())]
    assert torch.equal(greedy(model, inputs).sequences, expected_tokens)
