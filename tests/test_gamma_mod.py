"""gamma-MoD (mixture-of-depths layers, one shared router) and ARank.

Every routed result is compared with `mod_reference.ModReference`, an independent hand implementation (router by
hand, top-k / threshold by hand, the MoD layer's sub-modules called on the gathered tokens with the rotary of
their original positions and an own causal mask, skipped tokens left unchanged), or with the uncompressed model
(identity). ARank is compared with a direct computation from `output_attentions=True`.
"""

from __future__ import annotations

import copy
import functools

import pytest
import test_pyramid
import test_pyramid_families as families
import torch
from helpers import assert_flops_close, assert_untouched, extend, forward_hooks, greedy, measure_flops
from mod_reference import ModReference, routed_count, text_model_of
from reference import generation_positions
from torch.nn import functional as F

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs
from tokencompress.tiny_qwen import FAMILIES as QWEN_FAMILIES
from tokencompress.tiny_qwen import IMAGE_TOKEN_ID as QWEN_IMAGE_TOKEN_ID
from tokencompress.tiny_qwen import VIDEO_TOKEN_ID

NUM_LAYERS = 6  # "arank" layers: 3, 4 (all but 0, 1, 2 and the last)
ARANK_LAYERS = [3, 4]
REF_ATOL = 1e-5
IMPLEMENTATIONS = ("eager", "sdpa")
# (prefix, suffix) text lengths and images per sample
BATCHES = {"b1": ([(3, 5)], [1]), "b3": ([(2, 4), (5, 2), (1, 6)], [1, 2, 0])}
GENERATE = {"suppress_tokens": [IMAGE_TOKEN_ID]}


# -- models and inputs ----------------------------------------------------------------------------------------


@functools.cache
def _pristine(implementation: str, image_size: int = 32) -> torch.nn.Module:
    return tiny_llava(layers=NUM_LAYERS, image_size=image_size, attn_implementation=implementation, seed=0)


def fresh(implementation: str = "sdpa", image_size: int = 32) -> torch.nn.Module:
    return copy.deepcopy(_pristine(implementation, image_size))


def llava_inputs(model, batch: str, side: str = "left") -> dict[str, torch.Tensor]:
    lengths, images = BATCHES[batch]
    inputs = tiny_llava_inputs(model, lengths, images, padding_side=side)
    inputs["position_ids"] = generation_positions(inputs["attention_mask"])  # generate's ids
    return inputs


def llava_visual(inputs) -> torch.Tensor:
    return (inputs["input_ids"] == IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()


def router(hidden: int = 64, seed: int = 0, gain: float = 3.0) -> torch.nn.Linear:
    """A router with seeded weights, spread so p covers much of (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(hidden, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(gain * torch.randn(2, hidden, generator=generator) / hidden**0.5)
    return linear


def compress(model, seed: int | None = 0, **kwargs) -> tc.GammaMoD:
    """GammaMoD(**kwargs) on `model`; its router seeded (`seed`), or its own default init (seed None)."""
    compressor = tc.GammaMoD(**kwargs)
    if seed is not None:
        compressor.router = router(model.config.get_text_config().hidden_size, seed)
    tc.compress(model, compressor)
    return compressor


def weight(compressor: tc.GammaMoD) -> torch.Tensor:
    return compressor.router.weight.detach().clone()


def forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


def assert_close_real(actual, expected, real, atol=REF_ATOL) -> None:
    difference = (actual - expected)[real].abs().max().item()
    assert difference <= atol, f"max |difference| {difference:.3g} > {atol}"


def check_against(model, compressor, expected, real, logits, layers) -> None:
    """Logits, the stats (routed counts, processed positions) and the routing loss against the reference."""
    assert_close_real(logits, expected.logits, real)
    prefill = tc.stats(model).prefill
    for layer in layers:
        stats = prefill.layers[layer]
        assert stats.visual == [len(r) for r in expected.routed[layer]], layer
        for b, ran in enumerate(expected.ran[layer]):
            assert stats.kept_positions(b) == ran, (layer, b)
        assert prefill.decisions[layer]["routed"].tolist() == [len(r) for r in expected.routed[layer]]
    dense = [s for s in prefill.layers if s.layer not in layers]
    assert all(s.tokens == real.sum(1).tolist() for s in dense)
    torch.testing.assert_close(tc.stats(model).routing_loss, expected.loss, atol=1e-6, rtol=1e-5)


# -- 1. identity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mlp_scale", ["straight_through", "none"])
def test_skip_zero_is_identity(mlp_scale):
    """skip=0 routes every visual token; with a unit MLP factor the model is the unwrapped one (logits, greedy
    tokens), and uncompress restores it exactly."""
    model, bare = fresh(), fresh()
    inputs = llava_inputs(model, "b3")
    real = inputs["attention_mask"].bool()
    expected = forward(bare, inputs).logits
    plain = greedy(bare, {k: v for k, v in inputs.items() if k != "position_ids"}, 4, **GENERATE)
    forward(model, inputs)  # transformers installs its own hooks on the first forward
    state, hooks = copy.deepcopy(model.state_dict()), forward_hooks(model)
    compress(model, skip=0.0, mlp_scale=mlp_scale)
    logits = forward(model, inputs).logits
    assert_close_real(logits, expected, real)
    stats = tc.stats(model).prefill
    assert [s.visual for s in stats.layers] == [[16, 32, 0]] * NUM_LAYERS
    out = greedy(model, {k: v for k, v in inputs.items() if k != "position_ids"}, 4, **GENERATE)
    assert torch.equal(out.sequences, plain.sequences)
    tc.uncompress(model)
    assert_untouched(model, state, hooks)
    assert torch.equal(forward(model, inputs).logits, expected)


def test_skip_zero_probability_scales_mlp():
    """skip=0 with "probability": every visual token runs every MoD layer, its MLP output scaled by p; text is
    not scaled. Equals the reference and differs from the unwrapped model."""
    model, ref = fresh(), fresh()
    inputs = llava_inputs(model, "b3")
    real = inputs["attention_mask"].bool()
    compressor = compress(model, skip=0.0)
    logits = forward(model, inputs).logits
    expected = ModReference(ref).run(inputs, llava_visual(inputs), ARANK_LAYERS, weight(compressor), skip=0.0)
    check_against(model, compressor, expected, real, logits, ARANK_LAYERS)
    assert (logits - forward(ref, inputs).logits)[real].abs().max() > 1e-3
    # the scale applies to visual tokens only: a reference scaling nothing differs too
    unscaled = ModReference(ref).run(
        inputs, llava_visual(inputs), ARANK_LAYERS, weight(compressor), skip=0.0, mlp_scale="none"
    )
    assert (logits - unscaled.logits)[real].abs().max() > 1e-3


def test_text_only_batch_is_untouched():
    """No visual token: every layer runs every token, no routing loss."""
    model, bare = fresh(), fresh()
    inputs = tiny_llava_inputs(model, [(3, 4), (2, 2)], [0, 0])
    compress(model)
    out = forward(model, inputs)
    assert_close_real(out.logits, forward(bare, inputs).logits, inputs["attention_mask"].bool())
    assert out.get("routing_loss") is None


def test_save_and_load_router(tmp_path):
    """save_pretrained / from_pretrained carry the config and the router's weights: the same routed logits."""
    model = fresh()
    inputs = llava_inputs(model, "b3")
    compress(model, seed=3, skip=0.5, layers=[2, 4], mlp_scale="straight_through")
    logits = forward(model, inputs).logits
    tc.save_pretrained(model, tmp_path)
    loaded = fresh()
    tc.from_pretrained(loaded, tmp_path)
    assert torch.equal(forward(loaded, inputs).logits, logits)


# -- 2. routing equals the reference --------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [0.34, 0.5])
@pytest.mark.parametrize("batch,side", [("b1", "left"), ("b3", "left"), ("b3", "right")])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_topk_equals_reference(implementation, batch, side, skip):
    model, ref = fresh(implementation), fresh(implementation)
    inputs = llava_inputs(model, batch, side)
    real = inputs["attention_mask"].bool()
    compressor = compress(model, skip=skip)
    assert compressor.acting_layers() == ARANK_LAYERS
    logits = forward(model, inputs).logits
    visual = llava_visual(inputs)
    expected = ModReference(ref).run(inputs, visual, ARANK_LAYERS, weight(compressor), skip=skip)
    counts = visual.sum(1).tolist()
    for layer in ARANK_LAYERS:
        assert [len(r) for r in expected.routed[layer]] == [routed_count(n, skip) for n in counts]
    check_against(model, compressor, expected, real, logits, ARANK_LAYERS)
    # routing changed something: the layers differ from the dense model
    assert (logits - forward(ref, inputs).logits)[real].abs().max() > 1e-3
    # the routed sets differ between the two MoD layers somewhere (each layer routes on its own input)
    if batch == "b3":
        assert expected.routed[3] != expected.routed[4]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_explicit_layers_including_last(implementation):
    """layers=[1, 2, 5]: consecutive MoD layers, the last layer routed (full length restored before the norm)."""
    layers = [1, 2, 5]
    model, ref = fresh(implementation), fresh(implementation)
    inputs = llava_inputs(model, "b3")
    real = inputs["attention_mask"].bool()
    compressor = compress(model, layers=layers, skip=0.5)
    logits = forward(model, inputs).logits
    expected = ModReference(ref).run(inputs, llava_visual(inputs), layers, weight(compressor), skip=0.5)
    check_against(model, compressor, expected, real, logits, layers)


def threshold_between(probabilities: torch.Tensor, visual: torch.Tensor) -> float:
    """Half-way between two observed probabilities of the visual tokens, near the middle of their range."""
    values = sorted(probabilities[visual].tolist())
    middle = len(values) // 2
    return (values[middle] + values[middle + 1]) / 2


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_threshold_routing_eval(implementation):
    """Eval with routing="threshold": the visual tokens with p > threshold run, a data-dependent count per sample
    (checked to differ from top-k's and between samples); the loss still targets top-k membership."""
    model, ref = fresh(implementation), fresh(implementation)
    inputs = llava_inputs(model, "b3")
    real, visual = inputs["attention_mask"].bool(), llava_visual(inputs)
    w = router().weight.detach()
    probe = ModReference(ref).run(inputs, visual, ARANK_LAYERS, w, skip=0.34)
    threshold = threshold_between(probe.probability[3], visual)
    compressor = compress(model, skip=0.34, routing="threshold", threshold=threshold)
    logits = forward(model, inputs).logits
    expected = ModReference(ref).run(
        inputs, visual, ARANK_LAYERS, w, skip=0.34, routing="threshold", threshold=threshold
    )
    counts = [len(r) for r in expected.routed[3]]
    topk = [routed_count(n, 0.34) for n in visual.sum(1).tolist()]
    assert counts != topk and counts[0] != counts[1], (counts, topk)
    check_against(model, compressor, expected, real, logits, ARANK_LAYERS)


def test_threshold_routes_nothing_for_a_sample():
    """A threshold above every p of one sample: that sample runs only its text through the MoD layers."""
    model, ref = fresh(), fresh()
    inputs = llava_inputs(model, "b3")
    real, visual = inputs["attention_mask"].bool(), llava_visual(inputs)
    w = router().weight.detach()
    probe = ModReference(ref).run(inputs, visual, ARANK_LAYERS, w)
    # layer 3 (the first MoD layer) sees the same input under any routing: p there is the probe's
    highest = [float(probe.probability[3][b][visual[b]].max()) for b in range(2)]
    low = min(range(2), key=highest.__getitem__)
    threshold = sum(highest) / 2
    compressor = compress(model, routing="threshold", threshold=threshold)
    logits = forward(model, inputs).logits
    expected = ModReference(ref).run(
        inputs, visual, ARANK_LAYERS, w, routing="threshold", threshold=threshold
    )
    assert len(expected.routed[3][low]) == 0 and len(expected.routed[3][1 - low]) > 0
    check_against(model, compressor, expected, real, logits, ARANK_LAYERS)


@pytest.mark.parametrize("mlp_scale", ["probability", "straight_through", "none"])
def test_training_routes_topk_and_gradients_match(mlp_scale):
    """In training, threshold routing still routes top-k; with labels the loss is the LM loss plus the routing
    loss, and the router's gradient equals the reference's (the MLP scale's path and the loss's)."""
    model, ref = fresh(), fresh()
    inputs = llava_inputs(model, "b3")
    real, visual = inputs["attention_mask"].bool(), llava_visual(inputs)
    labels = inputs["input_ids"].masked_fill(~real | visual, -100)
    compressor = compress(model, routing="threshold", threshold=0.999, mlp_scale=mlp_scale, loss_weight=0.3)
    model.train()
    assert compressor.training
    out = model(**inputs, labels=labels)
    out.loss.backward()
    ref.train()
    w = router().weight.detach().clone().requires_grad_(True)
    expected = ModReference(ref).run(
        inputs,
        visual,
        ARANK_LAYERS,
        w,
        routing="threshold",
        threshold=0.999,
        mlp_scale=mlp_scale,
        loss_weight=0.3,
        grad=True,
    )
    shifted = labels[:, 1:]
    lm = F.cross_entropy(expected.logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100)
    (lm + expected.loss).backward()
    assert [len(r) for r in expected.routed[3]] == [routed_count(n, 0.34) for n in visual.sum(1).tolist()]
    assert_close_real(out.logits.detach(), expected.logits.detach(), real)
    torch.testing.assert_close(out.routing_loss.detach(), expected.loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss.detach(), (lm + expected.loss).detach(), atol=1e-5, rtol=1e-5)
    assert w.grad.abs().max() > 0
    torch.testing.assert_close(compressor.router.weight.grad, w.grad, atol=1e-6, rtol=1e-4)


def test_routing_loss_on_outputs_with_and_without_labels():
    """Eval: outputs.routing_loss is the reference's; with labels it is added to the LM loss."""
    model, ref = fresh(), fresh()
    inputs = llava_inputs(model, "b3")
    real, visual = inputs["attention_mask"].bool(), llava_visual(inputs)
    labels = inputs["input_ids"].masked_fill(~real | visual, -100)
    compress(model, loss_weight=0.5)
    expected = ModReference(ref).run(inputs, visual, ARANK_LAYERS, router().weight.detach(), loss_weight=0.5)
    plain = forward(model, inputs)
    torch.testing.assert_close(plain.routing_loss, expected.loss, atol=1e-6, rtol=1e-5)
    assert plain.loss is None
    with_labels = forward(model, inputs, labels=labels)
    lm = forward(ref, inputs, labels=labels).loss
    assert (
        abs(
            float(lm)
            - float(
                F.cross_entropy(
                    expected.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
                )
            )
        )
        > 1e-4
    )  # the routed logits differ from the dense ones, so the loss is the routed model's
    routed_lm = F.cross_entropy(
        expected.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(with_labels.loss, routed_lm + expected.loss, atol=1e-5, rtol=1e-5)


def test_skip_count_is_exact_decimal():
    """floor(skip x N) with skip read as written: 100 visual tokens (10 x 10) at skip=0.53 skip 53 and route 47.
    (float32 arithmetic gives 0.53 x 100 = 52.99999..., flooring to 52.)"""
    model = fresh("sdpa", image_size=80)
    inputs = tiny_llava_inputs(model, [(3, 4)], [1])
    assert int(llava_visual(inputs).sum()) == 100
    compress(model, skip=0.53)
    forward(model, inputs)
    assert tc.stats(model).prefill.layers[ARANK_LAYERS[0]].visual == [routed_count(100, 0.53)] == [47]


# -- 3. cache and decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["b1", "b3"])
def test_greedy_equals_reference(batch):
    """Each decode step's logits equal the reference over prompt + generated tokens: the MoD layers route the
    prompt's visual tokens as in prefill, generated text runs every layer and never sees a skipped token at a
    MoD layer."""
    new_tokens = 4
    model, ref = fresh(), fresh()
    inputs = llava_inputs(model, batch)
    prompt = {k: v for k, v in inputs.items() if k != "position_ids"}
    compress(model)
    out = greedy(model, prompt, new_tokens, **GENERATE)
    assert len(out.logits) == new_tokens
    full = extend(prompt, out.sequences)
    full["position_ids"] = generation_positions(full["attention_mask"])
    visual = torch.zeros_like(full["input_ids"], dtype=torch.bool)
    visual[:, : inputs["input_ids"].shape[1]] = llava_visual(inputs)
    expected = ModReference(ref).run(full, visual, ARANK_LAYERS, router().weight.detach())
    length = inputs["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        difference = (logits - expected.logits[:, length - 1 + step]).abs().max().item()
        assert difference <= REF_ATOL, (step, difference)
    # the prefill's cache: dense layers hold every slot, a MoD layer its text and routed tokens (per sample,
    # right-filled to the longest); decoding added one entry per step to every layer
    real = inputs["attention_mask"].bool()
    text = (real & ~llava_visual(inputs)).sum(1)
    held = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert tc.stats(model).kv_cache_entries == held
    for layer in range(NUM_LAYERS):
        if layer in ARANK_LAYERS:
            ran = text + torch.tensor([len(r) for r in expected.routed[layer]])
            assert held[layer] == int(ran.max()) + new_tokens - 1, layer
        else:
            assert held[layer] == length + new_tokens - 1, layer
    # the decode steps ran every layer
    last = tc.stats(model).last
    assert last.kind == "decode" and [s.tokens for s in last.layers] == [[1] * real.shape[0]] * NUM_LAYERS


# other families: Qwen2-VL (M-RoPE ids of prompt + generated from the model), and the codebase (generate on spliced
# embeddings, left padding) and LLaVA-NeXT through test_pyramid_families' greedy / extended
DECODE_FAMILIES = [("qwen2_vl", "b3", "left"), ("llava", "b3", "left"), ("llava_next", "b3", "left")]


@pytest.mark.parametrize("family,batch,side", DECODE_FAMILIES)
def test_greedy_equals_reference_families(family, batch, side):
    new_tokens = 4
    if family in QWEN_FAMILIES:
        layers = QWEN_LAYERS[family]
        model, ref = test_pyramid.fresh_model(family), test_pyramid.fresh_model(family)
        inputs = test_pyramid.make_inputs(model, family, batch)
        compress(model, layers=layers, skip=0.5)
        out = greedy(model, inputs, new_tokens, **test_pyramid.GENERATE)
        full = extend(inputs, out.sequences)
        real = full["attention_mask"].bool()
        ids = torch.tensor([QWEN_IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])
        visual = torch.isin(full["input_ids"], ids) & real
        visual[:, inputs["input_ids"].shape[1] :] = False
        prompt = inputs["input_ids"].shape[1]
    else:
        layers = [1, 3]
        model, ref = families.fresh_model(family, "sdpa", side), families.fresh_model(family, "sdpa", side)
        case = families.make_case(family, model, batch, side)
        compress(model, layers=layers, skip=0.5)
        out = families.greedy(model, case, new_tokens)
        full, layout, prompt = families.extended(ref, case, out)
        real = layout.real
        visual = torch.zeros_like(real)
        visual[:, :prompt] = case.visual
    assert len(out.logits) == new_tokens
    expected = ModReference(ref).run(full, visual, layers, router().weight.detach(), skip=0.5, real=real)
    for step, logits in enumerate(out.logits):
        difference = (logits - expected.logits[:, prompt - 1 + step]).abs().max().item()
        assert difference <= REF_ATOL, (step, difference)
    held = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert tc.stats(model).kv_cache_entries == held
    text = (real[:, :prompt] & ~visual[:, :prompt]).sum(1)
    for layer in layers:
        ran = text + torch.tensor([len(r) for r in expected.routed[layer]])
        assert held[layer] == int(ran.max()) + new_tokens - 1, layer


def test_prefill_cache_lengths_batch_1():
    model = fresh()
    inputs = llava_inputs(model, "b1")
    compress(model, skip=0.5)
    out = forward(model, inputs, use_cache=True)
    text = int((inputs["attention_mask"].bool() & ~llava_visual(inputs)).sum())
    held = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert held == [text + 16] * 3 + [text + 8] * 2 + [text + 16]
    assert tc.stats(model).kv_cache_entries == held
    assert tc.stats(model).kv_cache_bytes < tc.stats(model).kv_cache_bytes_uncompressed


def test_beam_search_and_sampling_run():
    model = fresh()
    inputs = {k: v for k, v in llava_inputs(model, "b3").items() if k != "position_ids"}
    compress(model)
    with torch.no_grad():
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False, **GENERATE)
        torch.manual_seed(0)
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5, **GENERATE)
    length = inputs["input_ids"].shape[1]
    assert beams.shape == sampled.shape == (3, length + 3)
    assert tc.stats(model).last.kind == "decode"


# -- 4. every adapter -----------------------------------------------------------------------------------------

QWEN_LAYERS = {
    "qwen2_vl": [1, 3],
    "qwen2_5_vl": [1, 3],
    "qwen3_vl": [2, 3],
}  # Qwen3-VL: past DeepStack (0, 1)


def capture_layer_inputs(model, layers) -> tuple[dict, list]:
    """Forward pre-hooks (registered after the engine's) recording each layer's rotary and position ids."""
    seen: dict[int, tuple] = {}
    decoder = text_model_of(model).layers
    handles = [
        decoder[layer].register_forward_pre_hook(
            lambda m, a, k, i=layer: seen.__setitem__(i, (k["position_embeddings"], k.get("position_ids"))),
            with_kwargs=True,
        )
        for layer in layers
    ]
    return seen, handles


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_equals_reference(family):
    """Qwen2-VL / 2.5-VL / 3-VL, a left-padded batch (two images / a video / text only): logits and routing equal
    the reference; each routed token's rotary and 3-axis M-RoPE ids at a MoD layer are its own original ones."""
    layers = QWEN_LAYERS[family]
    model, ref = test_pyramid.fresh_model(family), test_pyramid.fresh_model(family)
    inputs = test_pyramid.make_inputs(model, family, "b3")
    real = inputs["attention_mask"].bool()
    visual = torch.isin(inputs["input_ids"], torch.tensor([QWEN_IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])) & real
    compressor = compress(model, layers=layers, skip=0.5)
    seen, handles = capture_layer_inputs(model, layers)
    logits = forward(model, inputs).logits
    for handle in handles:
        handle.remove()
    full, full_handles = capture_layer_inputs(ref, layers)
    forward(ref, inputs)
    for handle in full_handles:
        handle.remove()
    expected = ModReference(ref).run(inputs, visual, layers, weight(compressor), skip=0.5)
    check_against(model, compressor, expected, real, logits, layers)
    for layer in layers:
        (cos, sin), ids = seen[layer]
        (full_cos, full_sin), full_ids = full[layer]
        for b, ran in enumerate(expected.ran[layer]):
            n = len(ran)
            assert torch.equal(cos[b, :n], full_cos[b, ran]) and torch.equal(sin[b, :n], full_sin[b, ran])
            if full_ids is not None:
                assert ids is not None
                assert torch.equal(ids[..., b, :n], full_ids[..., b, ran]), (layer, b)


NEXT_AND_CODEBASE = (*families.NEXT_FAMILIES, *families.CODEBASE_FAMILIES)


@pytest.mark.parametrize("family", NEXT_AND_CODEBASE)
def test_family_equals_reference(family):
    """LLaVA-NeXT / OneVision (any-res crops, newlines never routed, always run), the LLaVA codebase, Mini-Gemini
    (HD), LLaVA-HR: a batch of three (one image, two media, none) equals the reference on the independent layout
    (test_pyramid_families), MoD layers 1 and 3 around dense layer 2."""
    layers = [1, 3]
    model, ref = families.fresh_model(family), families.fresh_model(family)
    case = families.make_case(family, model, "b3")
    compressor = compress(model, layers=layers, skip=0.5)
    logits = forward(model, case.inputs).logits
    real = case.layout.real
    expected = ModReference(ref).run(
        case.ref_inputs, case.visual, layers, weight(compressor), skip=0.5, real=real
    )
    counts = case.visual.sum(1).tolist()
    assert [len(r) for r in expected.routed[1]] == [routed_count(n, 0.5) for n in counts]
    assert logits.shape[:2] == real.shape
    check_against(model, compressor, expected, real, logits, layers)
    for layer in layers:
        for b, ran in enumerate(expected.ran[layer]):
            assert set(torch.nonzero(case.newline[b]).flatten().tolist()) <= set(ran)


# -- 5. FLOPs -------------------------------------------------------------------------------------------------


def test_flops_match_counter():
    """Prefill, its uncompressed baseline and a decode step agree with torch's FLOP counter within 2%; the router
    (2 x rows x slots x hidden x 2 per MoD layer) is the stats' extra_flops and the counter sees it."""
    model = fresh()
    inputs = llava_inputs(model, "b3")
    rows, length = inputs["input_ids"].shape
    hidden = model.config.text_config.hidden_size
    bare, _ = measure_flops(lambda: model(**inputs))
    with tc.compressed(model, tc.GammaMoD(skip=0.5)):
        prefill, out = measure_flops(lambda: model(**inputs, use_cache=True))
        stats = tc.stats(model).prefill
        assert stats.extra_flops == len(ARANK_LAYERS) * 2 * rows * length * hidden * 2
        assert_flops_close(stats.flops, prefill)
        assert_flops_close(stats.baseline_flops, bare)
        assert prefill < bare
        step = torch.full((rows, 1), 9)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
        decode_inputs = {
            "input_ids": step,
            "attention_mask": mask,
            "position_ids": generation_positions(mask)[:, -1:],
            "past_key_values": out.past_key_values,
        }
        decode, _ = measure_flops(lambda: model(**decode_inputs, use_cache=True))
        last = tc.stats(model).last
        assert last.kind == "decode" and last.extra_flops == 0
        assert_flops_close(last.flops, decode)


# -- 6. ARank -------------------------------------------------------------------------------------------------

# Per layer, a factor on q_proj: the larger, the sharper (nearer one-hot) the maps and the lower their rank
ARANK_SCALES = {2: 300.0, 3: 1e3, 4: 3e3, 5: 1e4}


@functools.cache
def _arank_model(implementation: str) -> torch.nn.Module:
    model = tiny_llava(layers=NUM_LAYERS, attn_implementation=implementation, seed=1)
    with torch.no_grad():
        for layer, scale in ARANK_SCALES.items():
            model.model.language_model.layers[layer].self_attn.q_proj.weight.mul_(scale)
    return model


def arank_model(implementation: str = "eager") -> torch.nn.Module:
    return copy.deepcopy(_arank_model(implementation))


def arank_by_hand(model, batches) -> list[float]:
    """Per layer: for each sample's real tokens and each head, the rank of the fp32 attention map with its diagonal
    zeroed; mean over heads, then over samples."""
    totals, samples = [0.0] * NUM_LAYERS, 0
    for batch in batches:
        with torch.no_grad():
            attentions = model(**batch, output_attentions=True).attentions
        real = batch["attention_mask"].bool()
        for b in range(real.shape[0]):
            tokens = torch.nonzero(real[b]).flatten()
            for layer, maps in enumerate(attentions):
                ranks = []
                for head in range(maps.shape[1]):
                    attention = maps[b, head][tokens][:, tokens].float().clone()
                    attention.fill_diagonal_(0.0)
                    ranks.append(int(torch.linalg.matrix_rank(attention)))
                totals[layer] += sum(ranks) / len(ranks)
            samples += 1
    return [t / samples for t in totals]


def test_arank_equals_direct_computation():
    model = arank_model("eager")
    batches = [llava_inputs(model, "b3"), llava_inputs(model, "b1")]
    result = tc.arank(model, batches)
    expected = arank_by_hand(model, batches)
    assert result.samples == 4
    assert result.scores == pytest.approx(expected, abs=1e-9)
    # the scaled layers' ranks differ from each other and from the unscaled ones
    assert len({round(s, 6) for s in expected[1:]}) == NUM_LAYERS - 1, f"precondition: ranks alike {expected}"
    assert result.layers == [layer for layer in range(NUM_LAYERS) if layer not in (0, 1, 2, NUM_LAYERS - 1)]


def test_arank_sdpa_matches_eager():
    batches = [llava_inputs(arank_model(), "b3")]
    eager = tc.arank(arank_model("eager"), batches)
    sdpa = tc.arank(arank_model("sdpa"), batches)
    assert sdpa.scores == pytest.approx(eager.scores, abs=1e-9)


def test_arank_count_and_dense():
    model = arank_model()
    batches = [llava_inputs(model, "b3")]
    scores = arank_by_hand(model, batches)
    for dense, count in (((0, 1, 2, -1), 1), ((0,), 3), ((0, 5), 2)):
        kept_dense = {d % NUM_LAYERS for d in dense}
        eligible = [layer for layer in range(NUM_LAYERS) if layer not in kept_dense]
        ranked = sorted(eligible, key=lambda layer: scores[layer])
        assert scores[ranked[count - 1]] != scores[ranked[count]], "precondition: a tie at the cut"
        result = tc.arank(model, batches, dense=dense, count=count)
        assert result.layers == sorted(ranked[:count]), (dense, count)
        assert tc.arank(model, batches, dense=dense).layers == eligible


def test_arank_left_padding_uses_real_tokens_only():
    """A left-padded batch (generate's positions) gives the mean of its samples run one by one, unpadded."""
    model = arank_model()
    batch = llava_inputs(model, "b3")
    padded = tc.arank(model, [batch])
    singles = []
    for b in range(3):
        keep = batch["attention_mask"][b].bool()
        singles.append({k: v[b : b + 1, keep] for k, v in batch.items() if k != "pixel_values"})
        images = [1, 2, 0][b]
        start = [0, 1, 3][b]
        if images:
            singles[-1]["pixel_values"] = batch["pixel_values"][start : start + images]
    one_by_one = tc.arank(model, singles)
    assert one_by_one.samples == padded.samples == 3
    assert padded.scores == pytest.approx(one_by_one.scores, abs=1e-9)
