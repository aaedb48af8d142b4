"""Every bad input in DESIGN.md gets a clear error before any work, and leaves the model untouched."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs

ATTRIBUTE = "_tokencompress_engine"
LAYERS = 4


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=LAYERS, seed=0)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_llava_inputs(model, [(3, 2), (2, 4)], [1, 2], seed=1)  # 16 and 32 visual tokens


@pytest.fixture(scope="module")
def bare_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def hooks(model):
    return {
        name: (
            tuple(module._forward_pre_hooks),
            tuple(module._forward_hooks),
            tuple(module._forward_pre_hooks_with_kwargs),
            tuple(module._forward_hooks_with_kwargs),
        )
        for name, module in model.named_modules()
    }


@pytest.fixture
def untouched(model, inputs, bare_logits):
    """Yields; afterwards checks the model has no new hooks, no engine attribute and the same logits."""
    before = hooks(model)
    yield
    assert hooks(model) == before
    assert getattr(model, ATTRIBUTE, None) is None
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare_logits)


class VisionCalls:
    """Counts forwards of the vision tower (to prove an error came before any work)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.model.vision_tower.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- invalid configurations: raised when the compressor is built ---------------------------------------------


@pytest.mark.parametrize("cls", [tc.FastV, tc.RandomDrop])
@pytest.mark.parametrize(
    ("keep", "error", "match"),
    [
        (0.0, ValueError, r"keep=0\.0 is outside \(0, 1\]"),
        (1.5, ValueError, r"keep=1\.5 is outside \(0, 1\]"),
        (-0.5, ValueError, r"keep=-0\.5 is outside \(0, 1\]"),
        (float("nan"), ValueError, r"keep=nan is outside \(0, 1\]"),
        (-1, ValueError, r"keep=-1 must be a count >= 1"),
        (0, ValueError, r"keep=0 must be a count >= 1"),
        (True, TypeError, r"keep must be a float ratio in \(0, 1\] or an int count"),
        ("0.5", TypeError, r"keep must be a float ratio in \(0, 1\] or an int count"),
    ],
)
def test_keep_outside_range(cls, keep, error, match):
    with pytest.raises(error, match=match):
        cls(layer=2, keep=keep)
    with pytest.raises(error, match=match):
        tc.build(cls.name, layer=2, keep=keep)


@pytest.mark.parametrize("cls", [tc.FastV, tc.RandomDrop])
@pytest.mark.parametrize(
    ("layer", "error"), [(0, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)]
)
def test_layer_not_a_positive_int(cls, layer, error):
    with pytest.raises(error, match=r"layer"):
        cls(layer=layer)


def test_unknown_query_mode():
    with pytest.raises(ValueError, match=r"query='all' is not one of \('last', 'text'\)"):
        tc.FastV(query="all")


def test_build_unknown_name():
    with pytest.raises(ValueError, match=r"unknown compressor 'nope'.*fastv.*random"):
        tc.build("nope", layer=2)
    with pytest.raises(ValueError, match=r"unknown compressor"):
        tc.Compressor.from_dict({"name": "nope", "layer": 2})


# -- rejected by compress: the model must be left exactly as it was -----------------------------------------


@pytest.mark.parametrize("layer", [LAYERS, LAYERS + 3])
def test_layer_outside_the_model(model, untouched, layer):
    with pytest.raises(ValueError, match=rf"layer={layer} is outside this model; allowed 1\.\.{LAYERS - 1}"):
        tc.compress(model, tc.FastV(layer=layer))


def test_invalid_stage_after_a_valid_one_attaches_nothing(model, untouched):
    with pytest.raises(ValueError, match=r"outside this model"):
        tc.compress(model, [tc.FastV(layer=1), tc.RandomDrop(layer=LAYERS)])


def test_two_compressors_at_one_layer(model, untouched):
    with pytest.raises(ValueError, match=r"FastV and RandomDrop both act before layer 2"):
        tc.compress(model, [tc.FastV(layer=2), tc.RandomDrop(layer=2)])


def test_non_llava_model_names_supported_families():
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64
    )
    llama = LlamaForCausalLM(config).eval()
    before = hooks(llama)
    with pytest.raises(TypeError, match=r"no adapter for LlamaForCausalLM.*Supported: .*LLaVA"):
        tc.compress(llama, tc.FastV(layer=1))
    assert hooks(llama) == before
    assert getattr(llama, ATTRIBUTE, None) is None


@pytest.mark.parametrize(
    "bad",
    [
        "fastv",
        tc.FastV,  # the class, not an instance
        [tc.FastV(layer=1), object()],
        [{"name": "fastv", "layer": 2}],
    ],
)
def test_not_a_compressor(model, untouched, bad):
    with pytest.raises(TypeError, match=r"expected tokencompress compressors"):
        tc.compress(model, bad)


def test_empty_pipeline(model, untouched):
    with pytest.raises(ValueError, match=r"at least one compressor"):
        tc.compress(model, [])


def test_compressing_twice(model, inputs):
    tc.compress(model, tc.FastV(layer=2, keep=0.5))
    try:
        after_first = hooks(model)
        with pytest.raises(RuntimeError, match=r"already compressed; call tc\.uncompress"):
            tc.compress(model, tc.RandomDrop(layer=1))
        assert hooks(model) == after_first
        assert tc.compressors_of(model) == [tc.FastV(layer=2, keep=0.5)]
        with torch.no_grad():
            model(**inputs)
        assert tc.stats(model).prefill.layers[2].visual == [8, 16]  # the first compression still acts
    finally:
        tc.uncompress(model)


def test_uncompress_an_uncompressed_model(model, untouched):
    with pytest.raises(RuntimeError, match=r"not compressed"):
        tc.uncompress(model)


def test_unsupported_attention_implementation(untouched_flex_model):
    model = untouched_flex_model
    before = hooks(model)
    with pytest.raises(
        ValueError, match=r"supports attention implementations \('eager', 'sdpa'\).*'flex_attention'"
    ):
        tc.compress(model, tc.FastV())
    assert hooks(model) == before
    assert getattr(model, ATTRIBUTE, None) is None


@pytest.fixture
def untouched_flex_model():
    model = tiny_llava(layers=LAYERS, seed=0)
    model.config.text_config._attn_implementation = "flex_attention"
    return model


def test_attention_implementation_switched_after_compress(inputs):
    model = tc.compress(tiny_llava(layers=LAYERS, seed=0), tc.FastV())
    model.config.text_config._attn_implementation = "flex_attention"
    with (
        pytest.raises(ValueError, match=r"runs under attention implementations.*'flex_attention'"),
        torch.no_grad(),
    ):
        model(**inputs)


def test_from_pretrained_without_a_config(model, untouched, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokencompress_config\.json"):
        tc.from_pretrained(model, tmp_path)


def test_from_pretrained_wrong_format_version(model, untouched, tmp_path):
    (tmp_path / "tokencompress_config.json").write_text(
        json.dumps({"format_version": 99, "compressors": [tc.FastV().to_dict()]})
    )
    with pytest.raises(ValueError, match=r"format_version 99"):
        tc.from_pretrained(model, tmp_path)


def test_from_pretrained_with_an_invalid_config(model, untouched, tmp_path):
    (tmp_path / "tokencompress_config.json").write_text(
        json.dumps({"format_version": 1, "compressors": [{"name": "fastv", "layer": 2, "keep": 1.5}]})
    )
    with pytest.raises(ValueError, match=r"keep=1\.5 is outside"):
        tc.from_pretrained(model, tmp_path)


# -- rejected at forward time, before the vision tower runs --------------------------------------------------


def _forward_fails_before_any_work(model, inputs, error, match):
    with VisionCalls(model) as vision, pytest.raises(error, match=match), torch.no_grad():
        model(**inputs)
    assert vision.calls == 0


def _generate_fails_before_any_work(model, inputs, error, match):
    """generate (transformers 5.x encodes images before the first forward) must fail as early and as clearly."""
    with VisionCalls(model) as vision, pytest.raises(error, match=match), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert vision.calls == 0


def test_keep_count_larger_than_a_sample(model, inputs, bare_logits):
    with tc.compressed(model, tc.FastV(layer=2, keep=20)):
        _forward_fails_before_any_work(
            model, inputs, ValueError, r"keep=20 tokens is more than the 16 visual tokens of a sample"
        )
        # the failed call left nothing behind: a valid batch (32 visual tokens) runs and is counted right
        one = {key: value[1:] for key, value in inputs.items() if key != "pixel_values"}
        one["pixel_values"] = inputs["pixel_values"][1:]
        with torch.no_grad():
            model(**one)
        assert tc.stats(model).prefill.batch == 1
        assert tc.stats(model).prefill.layers[2].visual == [20]
    with tc.compressed(model, tc.RandomDrop(layer=2, keep=17)):
        _forward_fails_before_any_work(model, inputs, ValueError, r"keep=17 tokens is more than the 16")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare_logits)


def test_keep_count_larger_than_a_sample_in_generate(model, inputs):
    with tc.compressed(model, tc.FastV(layer=2, keep=20)):
        _generate_fails_before_any_work(
            model, inputs, ValueError, r"keep=20 tokens is more than the 16 visual tokens of a sample"
        )


def test_keep_count_equal_to_the_smallest_sample_is_fine(model, inputs):
    with tc.compressed(model, tc.FastV(layer=2, keep=16)), torch.no_grad():
        model(**inputs)
        assert tc.stats(model).prefill.layers[2].visual == [16, 16]


def test_fewer_images_than_placeholders(model, inputs):
    bad = dict(inputs, pixel_values=inputs["pixel_values"][:2])  # placeholders for 3 images, 2 given
    with tc.compressed(model, tc.FastV()):
        _forward_fails_before_any_work(
            model,
            bad,
            ValueError,
            r"placeholders for 3 image\(s\) \(\[1, 2\] per sample\) but 2 image\(s\) were given",
        )


def test_fewer_images_than_placeholders_in_generate(model, inputs):
    bad = dict(inputs, pixel_values=inputs["pixel_values"][:2])
    with tc.compressed(model, tc.FastV()):
        _generate_fails_before_any_work(
            model, bad, ValueError, r"placeholders for 3 image\(s\).*but 2 image\(s\)"
        )


def test_more_images_than_placeholders(model):
    single = tiny_llava_inputs(model, [(3, 2)], [2], seed=2)
    extra = torch.cat([single["pixel_values"], single["pixel_values"][:1]])
    with tc.compressed(model, tc.FastV()):
        _forward_fails_before_any_work(
            model,
            dict(single, pixel_values=extra),
            ValueError,
            r"placeholders for 2 image\(s\).*but 3 image\(s\)",
        )


def test_placeholders_not_a_whole_image(model, inputs):
    ids = inputs["input_ids"].clone()
    first = (ids[0] == IMAGE_TOKEN_ID).nonzero()[0, 0]
    ids[0, first] = 5  # 15 placeholders: not a whole 4x4 image
    with tc.compressed(model, tc.FastV()):
        _forward_fails_before_any_work(
            model,
            dict(inputs, input_ids=ids),
            ValueError,
            r"placeholders per sample \[15, 32\] are not multiples of the 16",
        )


def test_images_without_placeholders(model, inputs):
    ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, 5)
    with tc.compressed(model, tc.FastV()):
        _forward_fails_before_any_work(
            model,
            dict(inputs, input_ids=ids),
            ValueError,
            r"3 image\(s\) were given but the prompt has no image placeholder",
        )
