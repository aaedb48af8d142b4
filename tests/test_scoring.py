"""The engine's recomputed FastV scores equal eager attention (`output_attentions=True`, mean over heads).

Two views: the kept set of a compressed forward equals the top-k of the eager scores, and the scoring pieces
(adapter queries/keys + attention_received) reproduce the eager attention rows directly.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokencompress as tc
from tokencompress.adapters import find_adapter
from tokencompress.engine.scoring import attention_received
from tokencompress.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs

HEADS, KV_HEADS = 4, 2  # grouped-query attention
PROMPTS = [(3, 2), (2, 6), (1, 4)]  # different text after the image per sample
IMAGES = [1, 2, 1]  # a different number of images per sample


@pytest.fixture(scope="module")
def model():
    model = tiny_llava(heads=HEADS, kv_heads=KV_HEADS, layers=4, attn_implementation="eager", seed=3)
    # Sharper attention than a plain random init, so the top-k is decided by margins far above float noise
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model


def _inputs(model, padding_side):
    return tiny_llava_inputs(model, PROMPTS, IMAGES, seed=5, padding_side=padding_side)


def _eager_attention(model, inputs, layer):
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return out.attentions[layer].double()  # (B, H, L, L)


def _reference_scores(attention, inputs, query):
    """Per sample: the attention each position receives, mean over heads, from the last real token ("last") or
    averaged over the real text tokens after the last image ("text")."""
    mask = inputs["attention_mask"].bool()
    ids = inputs["input_ids"]
    scores = []
    for b in range(ids.shape[0]):
        real = mask[b].nonzero().flatten()
        if query == "last":
            rows = real[-1:]
        else:
            last_image = (ids[b] == IMAGE_TOKEN_ID).nonzero().flatten().max()
            rows = real[real > last_image]
        scores.append(attention[b, :, rows, :].mean(dim=(0, 1)))
    return torch.stack(scores)


def _expected_kept(inputs, scores, keep):
    """Real text positions plus the top ceil(N x keep) visual positions by score, in order."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    kept = []
    for b in range(ids.shape[0]):
        visual = (ids[b] == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
        text = [p for p in mask[b].nonzero().flatten().tolist() if p not in visual]
        k = math.ceil(len(visual) * keep)
        ranked = sorted(visual, key=lambda p: (-float(scores[b, p]), p))
        if k < len(visual):  # the choice must not hinge on float noise
            assert float(scores[b, ranked[k - 1]] - scores[b, ranked[k]]) > 1e-6
        kept.append(sorted(text + ranked[:k]))
    return kept


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("query", ["last", "text"])
@pytest.mark.parametrize("layer", [1, 2])
def test_fastv_keeps_top_k_of_eager_attention(model, query, layer, padding_side):
    inputs = _inputs(model, padding_side)
    keep = 0.25
    expected = _expected_kept(
        inputs, _reference_scores(_eager_attention(model, inputs, layer - 1), inputs, query), keep
    )
    with tc.compressed(model, tc.FastV(layer=layer, keep=keep, query=query)), torch.no_grad():
        model(**inputs)
        prefill = tc.stats(model).prefill
    for b in range(len(PROMPTS)):
        assert prefill.layers[layer].kept_positions(b) == expected[b], (b, query)
        # the layers before K see everything, the ones after K exactly what K kept
        assert (
            prefill.layers[layer - 1].kept_positions(b)
            == inputs["attention_mask"][b].nonzero().flatten().tolist()
        )
        assert prefill.layers[-1].kept_positions(b) == expected[b]


def test_fastv_count_keeps_top_k_of_eager_attention(model):
    inputs = _inputs(model, "left")
    scores = _reference_scores(_eager_attention(model, inputs, 1), inputs, "last")
    ids = inputs["input_ids"]
    with tc.compressed(model, tc.FastV(layer=2, keep=5)), torch.no_grad():
        model(**inputs)
        prefill = tc.stats(model).prefill
    for b in range(ids.shape[0]):
        visual = (ids[b] == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
        top = sorted(sorted(visual, key=lambda p: -float(scores[b, p]))[:5])
        kept_visual = [p for p in prefill.layers[2].kept_positions(b) if p in visual]
        assert kept_visual == top


def _attention_inputs(model, inputs, layer):
    """What the attention module of `layer` receives in a bare forward: normed hidden states and (cos, sin)."""
    captured = {}

    def hook(module, args, kwargs):
        captured["normed"] = args[0] if args else kwargs["hidden_states"]
        captured["rotary"] = kwargs["position_embeddings"]

    attention = model.model.language_model.layers[layer].self_attn
    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    return captured["normed"], captured["rotary"], out.attentions[layer].double()


@pytest.mark.parametrize("query", ["last", "text"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_recomputed_scores_equal_output_attentions(model, query, layer):
    """adapter.queries/keys + attention_received on a left-padded GQA batch == eager attention, mean over heads
    (and over the text rows after the image for query="text")."""
    inputs = _inputs(model, "left")
    normed, (cos, sin), attention = _attention_inputs(model, inputs, layer)
    adapter = find_adapter(model)
    assert adapter.shape().kv_heads == KV_HEADS < adapter.shape().heads == HEADS
    expected = _reference_scores(attention, inputs, query)

    mask = inputs["attention_mask"].bool()
    ids = inputs["input_ids"]
    batch, length = ids.shape
    with torch.no_grad():
        keys = adapter.keys(layer, adapter.attention(layer).k_proj(normed), cos, sin)
        assert keys.shape == (batch, KV_HEADS, length, adapter.shape().head_dim)
        # query rows chosen by hand; ragged rows padded with the last token at weight 0
        rows = []
        for b in range(batch):
            real = mask[b].nonzero().flatten()
            if query == "last":
                rows.append(real[-1:].tolist())
            else:
                last_image = (ids[b] == IMAGE_TOKEN_ID).nonzero().flatten().max()
                rows.append(real[real > last_image].tolist())
        width = max(len(r) for r in rows)
        columns = torch.tensor([r + [length - 1] * (width - len(r)) for r in rows])
        weights = torch.tensor([[1.0 / len(r)] * len(r) + [0.0] * (width - len(r)) for r in rows])
        index = columns[..., None].expand(-1, -1, normed.shape[-1])
        pick = columns[..., None].expand(-1, -1, cos.shape[-1])
        cos_b, sin_b = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        queries = adapter.queries(
            layer, normed.gather(1, index), cos_b.gather(1, pick), sin_b.gather(1, pick)
        )
        assert queries.shape == (batch, HEADS, width, adapter.shape().head_dim)
        positions = torch.arange(length)
        allowed = (positions[None, None, :] <= columns[:, :, None]) & mask[:, None, :]
        got = attention_received(queries, keys, allowed, weights, adapter.scaling(layer))
    real_keys = mask
    assert torch.allclose(got.double()[real_keys], expected[real_keys], atol=1e-5)
    assert torch.all(got[~real_keys] == 0)  # padding receives nothing


def test_recomputed_scores_single_sample_rows(model):
    """The same per sample (batch 1 slices, so no ragged query rows): left padding keys must be masked."""
    inputs = _inputs(model, "left")
    layer = 1
    normed, (cos, sin), attention = _attention_inputs(model, inputs, layer)
    expected = _reference_scores(attention, inputs, "text")
    adapter = find_adapter(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    length = ids.shape[1]
    for b in range(ids.shape[0]):
        real = mask[b].nonzero().flatten()
        last_image = (ids[b] == IMAGE_TOKEN_ID).nonzero().flatten().max()
        rows = real[real > last_image]
        cos_b = cos[min(b, cos.shape[0] - 1)][None]
        sin_b = sin[min(b, sin.shape[0] - 1)][None]
        with torch.no_grad():
            keys = adapter.keys(layer, adapter.attention(layer).k_proj(normed[b : b + 1]), cos_b, sin_b)
            queries = adapter.queries(layer, normed[b : b + 1, rows], cos_b[:, rows], sin_b[:, rows])
        allowed = (torch.arange(length)[None, :] <= rows[:, None]) & mask[b][None, :]
        weights = torch.full((1, len(rows)), 1.0 / len(rows))
        got = attention_received(queries, keys, allowed[None], weights, adapter.scaling(layer))[0]
        assert torch.allclose(got.double()[mask[b]], expected[b][mask[b]], atol=1e-5)
