"""Analytic FLOPs and KV bytes against what actually ran: torch's FlopCounterMode and the returned cache."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs

aten = torch.ops.aten


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts nothing for the CPU sdpa kernels; give them the formula torch uses for the GPU ones
SDPA_CPU = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_formula,
}

BATCHES = {
    "single": ([(3, 4)], [1]),
    "padded": ([(3, 2), (5, 6), (1, 3)], [1, 2, 0]),
}


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.packets = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.packets.add(func._overloadpacket)
        return func(*args, **(kwargs or {}))


def _measure(fn):
    """FLOPs the counter attributes to the decoder stack and to the LM head; checks no attention op escaped it."""
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_CPU)
    names = _OpNames()
    with torch.no_grad(), counter, names:
        result = fn()
    attention_ops = {p for p in names.packets if "scaled_dot_product" in str(p) or "attention" in str(p)}
    uncounted = {p for p in attention_ops if p not in flop_registry and p not in SDPA_CPU}
    assert not uncounted, f"attention ops with no flop formula: {uncounted}"
    counts = counter.get_flop_counts()
    language = [k for k in counts if k.endswith(".model.language_model")]
    head = [k for k in counts if k.endswith(".lm_head")]
    assert len(language) == 1 and len(head) == 1, sorted(counts)
    total = sum(counts[language[0]].values()) + sum(counts[head[0]].values())
    return total, counts[language[0]], result


def _close(analytic, measured):
    assert measured > 0
    assert abs(analytic - measured) <= 0.02 * measured, (analytic, measured)


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_llava(layers=4, heads=4, kv_heads=2, attn_implementation=request.param, seed=0)


def _decode_inputs(inputs, out):
    # a fixed ordinary token: a random model may well "generate" the image placeholder id
    next_token = torch.full((out.logits.shape[0], 1), 7)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], dim=1)
    return {"input_ids": next_token, "attention_mask": mask, "past_key_values": out.past_key_values}


@pytest.mark.parametrize("batch", list(BATCHES))
def test_bare_model_flops_match_counter(model, batch):
    """The baseline the stats report equals what the uncompressed model really runs."""
    inputs = tiny_llava_inputs(model, *BATCHES[batch])
    bare_prefill, _, out = _measure(lambda: model(**inputs, use_cache=True))
    bare_decode, _, _ = _measure(lambda: model(**_decode_inputs(inputs, out), use_cache=True))
    with tc.compressed(model, tc.FastV(layer=2, keep=0.25)):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            model(**_decode_inputs(inputs, out), use_cache=True)
        stats = tc.stats(model)
    _close(stats.prefill.baseline_flops, bare_prefill)
    _close(stats.last.baseline_flops, bare_decode)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.25])
def test_prefill_and_decode_flops_match_counter(model, keep, batch):
    inputs = tiny_llava_inputs(model, *BATCHES[batch])
    with tc.compressed(model, tc.FastV(layer=2, keep=keep)):
        prefill, language, out = _measure(lambda: model(**inputs, use_cache=True))
        stats = tc.stats(model)
        assert stats.prefill.kind == "prefill"
        _close(stats.prefill.flops, prefill)
        if model.config.text_config._attn_implementation == "sdpa":
            assert aten._scaled_dot_product_flash_attention_for_cpu in language  # the formula was used

        decode, _, _ = _measure(lambda: model(**_decode_inputs(inputs, out), use_cache=True))
        stats = tc.stats(model)
        assert stats.last.kind == "decode" and stats.last.length == 1
        _close(stats.last.flops, decode)
        assert stats.prefill.flops == pytest.approx(prefill, rel=0.02)  # a decode step leaves prefill alone
    if keep < 1.0:
        assert prefill < 0.95 * _measure(lambda: model(**inputs, use_cache=True))[0]


def test_text_appended_to_a_cache_leaves_the_prefill_stats(model):
    """Several text tokens on an existing cache (a continuation scored on the compressed prompt's cache, as
    lmms-eval's loglikelihood does) are an "extend" step: the prefill's stats stay those of the prompt."""
    inputs = tiny_llava_inputs(model, *BATCHES["padded"])
    with tc.compressed(model, tc.FastV(layer=2, keep=0.5)):
        out = model(**inputs, use_cache=True)
        prefill = tc.stats(model).prefill
        more = torch.full((out.logits.shape[0], 3), 7)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(more)], dim=1)
        model(input_ids=more, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
        stats = tc.stats(model)
    assert stats.prefill is prefill and stats.prefill.length == inputs["input_ids"].shape[1]
    assert stats.last.kind == "extend" and stats.last.length == 3
    assert stats.last.past == inputs["input_ids"].shape[1]


def test_pipeline_flops_match_counter(model):
    inputs = tiny_llava_inputs(model, *BATCHES["padded"])
    with tc.compressed(model, [tc.FastV(layer=1, keep=0.5), tc.RandomDrop(layer=3, keep=0.5, seed=1)]):
        measured, _, _ = _measure(lambda: model(**inputs))
        _close(tc.stats(model).prefill.flops, measured)


def _cache_bytes(cache):
    return sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )


def _generate(model, inputs, new_tokens):
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            suppress_tokens=[IMAGE_TOKEN_ID],  # a random model may emit the placeholder id
            return_dict_in_generate=True,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_kv_cache_bytes_equal_the_cache(batch, dtype):
    model = tiny_llava(layers=4, heads=4, kv_heads=2, dtype=dtype, seed=1)
    inputs = tiny_llava_inputs(model, *BATCHES[batch])
    new_tokens = 3
    bare = _generate(model, inputs, new_tokens).past_key_values
    layer, keep = 2, 0.25
    with tc.compressed(model, tc.FastV(layer=layer, keep=keep)):
        cache = _generate(model, inputs, new_tokens).past_key_values
        stats = tc.stats(model)
    lengths = [entry.keys.shape[2] for entry in cache.layers]
    assert stats.kv_cache_entries == lengths
    assert stats.kv_cache_bytes == _cache_bytes(cache)
    assert stats.kv_cache_bytes_uncompressed == _cache_bytes(bare)

    # by hand: before `layer` the whole prompt (padding included) plus the fed-back tokens; from `layer` on the
    # real text and the kept visual tokens of the longest sample, plus the fed-back tokens
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    fed_back = new_tokens - 1
    kept = []
    for b in range(ids.shape[0]):
        visual = int((ids[b] == IMAGE_TOKEN_ID).sum())
        text = int(mask[b].sum()) - visual
        kept.append(text + math.ceil(visual * keep))
    expected = [ids.shape[1] + fed_back] * layer + [max(kept) + fed_back] * (len(lengths) - layer)
    assert lengths == expected
    assert stats.kv_cache_bytes < stats.kv_cache_bytes_uncompressed
