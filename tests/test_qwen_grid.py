"""Qwen-VL visual-token view: each image, and each video frame, is one grid in sequence order, with the raster
coordinates implied by its image_grid_thw / video_grid_thw (independent of how the adapter derives them)."""

from __future__ import annotations

import pytest
import torch
from helpers import ViewRecorder

import tokencompress as tc
from tokencompress.tiny_qwen import tiny_qwen_inputs, tiny_qwen_vl

MERGE = 2
SAMPLES = [
    [("text", 3), ("image", (4, 6)), ("text", 5)],
    [("text", 2), ("image", (4, 4)), ("text", 1), ("image", (2, 4)), ("text", 3)],
    [("text", 2), ("video", (2, 4, 4)), ("text", 3), ("image", (2, 2)), ("text", 1)],
]


def expected_grids(sample):
    """(grid index, row, col) of every visual token of one sample, in sequence order, and the grid shapes."""
    tokens, shapes = [], []
    for kind, value in sample:
        if kind == "text":
            continue
        frames, h, w = (1, *value) if kind == "image" else value
        for _ in range(frames):
            rows, cols = h // MERGE, w // MERGE
            grid = len(shapes)
            shapes.append((rows, cols))
            tokens += [(grid, r, c) for r in range(rows) for c in range(cols)]
    return tokens, shapes


def observed(view, sample_index):
    visual = view.is_visual[sample_index]
    grid = view.image_index[sample_index][visual].tolist()
    rows = view.grid_row[sample_index][visual].tolist()
    cols = view.grid_col[sample_index][visual].tolist()
    return list(zip(grid, rows, cols, strict=True))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_grids_follow_grid_thw_in_forward_and_generate(family, padding_side):
    model = tiny_qwen_vl(family, layers=2)
    inputs = tiny_qwen_inputs(model, SAMPLES, padding_side=padding_side)
    recorder = ViewRecorder()
    with tc.compressed(model, recorder), torch.no_grad():
        model(**inputs)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # grids popped: taken from features
    prefill_views = [v for v in recorder.views if v.is_visual.any()]
    assert len(prefill_views) == 2
    for view in prefill_views:
        for b, sample in enumerate(SAMPLES):
            tokens, _ = expected_grids(sample)
            assert observed(view, b) == tokens


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_grid_shapes_reach_the_engine(family):
    model = tiny_qwen_vl(family, layers=2)
    inputs = tiny_qwen_inputs(model, SAMPLES)
    engine_shapes = []
    with tc.compressed(model, ViewRecorder()), torch.no_grad():
        adapter = model._tokencompress_engine.adapter
        tokens = adapter.visual_tokens(inputs)
        complete = adapter.complete_visual_tokens
        # the position ids the text model receives are the model's own M-RoPE ids
        position_ids, _ = model.model.get_rope_index(
            inputs["input_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs["attention_mask"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
        )
        engine_shapes = complete(tokens, {"position_ids": position_ids}).grid_shape
    assert engine_shapes == [expected_grids(sample)[1] for sample in SAMPLES]
