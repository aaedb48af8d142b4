"""The public API: compress/uncompress/compressed, pipelines, registry, configs, save/load, stats."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn.modules import module as torch_module

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs

PROMPTS = [(3, 2), (2, 5), (4, 3)]
IMAGES = [1, 2, 1]


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=4, seed=0)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_llava_inputs(model, PROMPTS, IMAGES, seed=1)


@pytest.fixture(scope="module")
def bare_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, new_tokens):
    # a random model may emit the placeholder id; keep these tests about what they test (see
    # test_decode_step_with_the_placeholder_token_id for that case)
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            suppress_tokens=[IMAGE_TOKEN_ID],
        )


def hooks(model):
    """Every hook dict of every submodule, plus the global ones."""
    per_module = {
        name: tuple(
            tuple(getattr(module, attr).keys())
            for attr in (
                "_forward_pre_hooks",
                "_forward_hooks",
                "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called",
                "_backward_hooks",
                "_backward_pre_hooks",
            )
        )
        for name, module in model.named_modules()
    }
    glob = (len(torch_module._global_forward_hooks), len(torch_module._global_forward_pre_hooks))
    return per_module, glob


def visual_positions(inputs, b):
    return set((inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().flatten().tolist())


def visual_counts(inputs):
    return [len(visual_positions(inputs, b)) for b in range(inputs["input_ids"].shape[0])]


# -- compress / uncompress / compressed ----------------------------------------------------------------------


def test_compress_returns_the_model_and_changes_outputs(model, inputs, bare_logits):
    before = hooks(model)
    returned = tc.compress(model, tc.FastV(layer=2, keep=0.25))
    try:
        assert returned is model
        assert hooks(model) != before
        mask = inputs["attention_mask"].bool()
        assert not torch.allclose(logits(model, inputs)[mask], bare_logits[mask], atol=1e-4)
    finally:
        tc.uncompress(model)


def test_uncompress_restores_hooks_state_dict_and_outputs(model, inputs, bare_logits):
    before_hooks = hooks(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_attributes = set(vars(model))
    tc.compress(model, [tc.FastV(layer=1, keep=0.5), tc.RandomDrop(layer=3, keep=0.5)])
    try:
        assert hooks(model) != before_hooks
        generate(model, inputs, 3)
    finally:
        assert tc.uncompress(model) is model
    assert hooks(model) == before_hooks
    assert set(vars(model)) == before_attributes
    after_state = model.state_dict()
    assert list(after_state) == list(before_state)
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert torch.equal(logits(model, inputs), bare_logits)
    with pytest.raises(RuntimeError, match="not compressed"):
        tc.stats(model)


def test_compressed_context_undoes_on_exit(model, inputs, bare_logits):
    before = hooks(model)
    with tc.compressed(model, tc.FastV(layer=2, keep=0.25)) as inside:
        assert inside is model
        assert hooks(model) != before
        assert tc.stats(model).prefill is None
        logits(model, inputs)
        assert tc.stats(model).prefill.layers[2].visual == [
            math.ceil(n * 0.25) for n in visual_counts(inputs)
        ]
    assert hooks(model) == before
    assert torch.equal(logits(model, inputs), bare_logits)


def test_compressed_context_undoes_on_exception(model, inputs, bare_logits):
    before = hooks(model)
    with pytest.raises(KeyError, match="boom"), tc.compressed(model, tc.FastV(layer=2, keep=0.25)):
        logits(model, inputs)
        raise KeyError("boom")
    assert hooks(model) == before
    assert torch.equal(logits(model, inputs), bare_logits)
    tc.compress(model, tc.FastV())  # compressible again: nothing was left behind
    tc.uncompress(model)


def test_decode_step_with_the_placeholder_token_id(model, inputs):
    """A decode step whose new token happens to be the image placeholder id (a model may emit any id) is text:
    no image comes with it. The compressed model must decode it like the bare model does."""
    token = torch.full((3, 1), IMAGE_TOKEN_ID)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        bare = model(input_ids=token, attention_mask=mask, past_key_values=prefill.past_key_values).logits
    with tc.compressed(model, tc.FastV(layer=2, keep=1.0)), torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        step = model(input_ids=token, attention_mask=mask, past_key_values=prefill.past_key_values).logits
    assert torch.allclose(step, bare, atol=1e-5)


# -- pipelines -----------------------------------------------------------------------------------------------


def _visual_kept(stats, inputs, layer, b):
    return set(stats.prefill.layers[layer].kept_positions(b)) & visual_positions(inputs, b)


@pytest.mark.parametrize("order", ["given", "reversed"])
def test_pipeline_second_stage_acts_on_survivors(model, inputs, order):
    stages = [tc.FastV(layer=1, keep=10), tc.RandomDrop(layer=3, keep=3, seed=4)]
    if order == "reversed":
        stages = stages[::-1]
    with tc.compressed(model, stages):
        logits(model, inputs)
        stats = tc.stats(model)
    assert len(stats.prefill.layers) == 4
    counts = visual_counts(inputs)  # [16, 32, 16]
    assert stats.prefill.layers[0].visual == counts
    assert stats.prefill.layers[1].visual == [min(n, 10) for n in counts]
    assert stats.prefill.layers[2].visual == [min(n, 10) for n in counts]
    assert stats.prefill.layers[3].visual == [min(n, 3) for n in counts]
    for b in range(len(counts)):
        first = _visual_kept(stats, inputs, 1, b)
        second = _visual_kept(stats, inputs, 3, b)
        assert second < first  # the second stage picks among the survivors of the first
        text = set(stats.prefill.layers[0].kept_positions(b)) - visual_positions(inputs, b)
        assert text <= set(stats.prefill.layers[3].kept_positions(b))  # text is never dropped


def test_pipeline_ratios_apply_to_survivors(model, inputs):
    with tc.compressed(model, [tc.FastV(layer=1, keep=0.5), tc.FastV(layer=3, keep=0.5)]):
        logits(model, inputs)
        stats = tc.stats(model)
    counts = visual_counts(inputs)
    after_first = [math.ceil(n * 0.5) for n in counts]
    assert stats.prefill.layers[1].visual == after_first
    assert stats.prefill.layers[3].visual == [math.ceil(n * 0.5) for n in after_first]
    for b in range(len(counts)):
        assert _visual_kept(stats, inputs, 3, b) < _visual_kept(stats, inputs, 1, b)


def test_pipeline_in_any_order_is_the_same(model, inputs):
    stages = [tc.FastV(layer=1, keep=0.5), tc.RandomDrop(layer=2, keep=0.5, seed=3)]
    with tc.compressed(model, stages):
        forward = logits(model, inputs)
        assert [c.layer for c in tc.compressors_of(model)] == [1, 2]
    with tc.compressed(model, tuple(stages[::-1])):
        assert torch.equal(logits(model, inputs), forward)


# -- independence of models ----------------------------------------------------------------------------------


def test_two_models_do_not_affect_each_other(inputs):
    first, second = tiny_llava(layers=4, seed=0), tiny_llava(layers=4, seed=0)
    reference = logits(second, inputs)
    second_hooks = hooks(second)
    assert torch.equal(logits(first, inputs), reference)
    tc.compress(first, tc.FastV(layer=2, keep=0.25))
    compressed_logits = logits(first, inputs)
    first_stats = str(tc.stats(first))
    assert torch.equal(logits(second, inputs), reference)  # the other model is untouched
    assert hooks(second) == second_hooks
    with pytest.raises(RuntimeError, match="not compressed"):
        tc.stats(second)
    assert str(tc.stats(first)) == first_stats  # and its forwards do not reach the first's stats

    tc.compress(second, tc.RandomDrop(layer=1, keep=0.5))
    logits(second, inputs)
    assert torch.equal(logits(first, inputs), compressed_logits)
    assert tc.stats(first).prefill.layers[1].visual == visual_counts(inputs)
    assert tc.stats(second).prefill.layers[1].visual == [math.ceil(n / 2) for n in visual_counts(inputs)]
    tc.uncompress(first)
    assert torch.equal(logits(first, inputs), reference)
    assert tc.stats(second).prefill is not None  # uncompressing one leaves the other compressed
    tc.uncompress(second)
    assert torch.equal(logits(second, inputs), reference)


# -- registry and configs ------------------------------------------------------------------------------------


def test_registry_and_build():
    names = tc.registry()
    assert names["fastv"] is tc.FastV
    assert names["random"] is tc.RandomDrop
    names.pop("fastv")
    assert "fastv" in tc.registry()  # a copy, not the registry itself
    assert tc.build("fastv", layer=2, keep=0.5) == tc.FastV(layer=2, keep=0.5)
    assert tc.build("fastv", layer=3, keep=7, query="text") == tc.FastV(layer=3, keep=7, query="text")
    assert tc.build("random", layer=1, keep=0.25, seed=9) == tc.RandomDrop(layer=1, keep=0.25, seed=9)
    assert type(tc.build("random")) is tc.RandomDrop


@pytest.mark.parametrize(
    "compressor",
    [
        tc.FastV(),
        tc.FastV(layer=3, keep=0.25, query="text"),
        tc.FastV(layer=2, keep=1.0),  # a ratio: must come back as 1.0, not as the count 1
        tc.FastV(layer=2, keep=7),  # a count: must stay an int
        tc.RandomDrop(layer=1, keep=0.5, seed=11),
    ],
)
def test_to_dict_from_dict_round_trip_through_json(compressor):
    data = json.loads(json.dumps(compressor.to_dict()))
    assert data["name"] == {tc.FastV: "fastv", tc.RandomDrop: "random"}[type(compressor)]
    back = tc.Compressor.from_dict(data)
    assert type(back) is type(compressor)
    assert back == compressor
    assert type(back.keep) is type(compressor.keep)


def test_save_and_from_pretrained_round_trip(tmp_path, inputs):
    pipeline = [tc.FastV(layer=1, keep=0.5), tc.RandomDrop(layer=3, keep=2, seed=7)]
    original = tc.compress(tiny_llava(layers=4, seed=0), pipeline)
    expected = logits(original, inputs)
    expected_kept = [tc.stats(original).prefill.layers[3].kept_positions(b) for b in range(3)]
    tc.save_pretrained(original, tmp_path / "saved")
    config = json.loads(next((tmp_path / "saved").glob("*.json")).read_text())
    assert [c["name"] for c in config["compressors"]] == ["fastv", "random"]

    fresh = tiny_llava(layers=4, seed=0)
    assert tc.from_pretrained(fresh, tmp_path / "saved") is fresh
    assert tc.compressors_of(fresh) == pipeline
    assert torch.equal(logits(fresh, inputs), expected)
    assert [tc.stats(fresh).prefill.layers[3].kept_positions(b) for b in range(3)] == expected_kept


# -- stats ---------------------------------------------------------------------------------------------------


def test_stats_string(model, inputs):
    with tc.compressed(model, tc.FastV(layer=2, keep=0.25)):
        assert "no forward has run yet" in str(tc.stats(model))
        generate(model, inputs, 2)
        text = str(tc.stats(model))
    print(text)
    mask = inputs["attention_mask"]
    counts = visual_counts(inputs)
    tokens = [int(mask[b].sum()) for b in range(3)]
    lines = text.splitlines()
    assert lines[0].startswith(f"prefill: batch 3, {mask.shape[1]} tokens")
    assert "saved" in lines[0]
    full = ", ".join(f"{t} ({v})" for t, v in zip(tokens, counts, strict=True))
    kept = [math.ceil(n * 0.25) for n in counts]
    pruned = ", ".join(f"{t - v + k} ({k})" for t, v, k in zip(tokens, counts, kept, strict=True))
    assert f"    0  {full}" in lines and f"    1  {full}" in lines
    assert f"    2  {pruned}" in lines and f"    3  {pruned}" in lines
    assert any(line.startswith("last decode step") for line in lines)
    assert lines[-1].startswith("KV cache:")
