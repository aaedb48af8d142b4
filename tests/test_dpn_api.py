"""DPN through the public API: save/load of its routers, config round trips, device and dtype, the routing token
helpers with a real (offline) tokenizer, clear errors before anything is attached, uncompress, and generate on a
padded batch whose samples keep different numbers of visual tokens.

The tiny LLaVA here has a 6 x 6 grid (36 visual tokens per image) and 4 decoder layers (default DPN stages act
before layers 1, 2 and 3).
"""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_untouched, forward_hooks
from safetensors.torch import load_file

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_llava, tiny_llava_inputs

IMAGE_SIZE, PATCH = 48, 8
PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2  # 36
ENGINE = "_tokencompress_engine"
MODULES = "tokencompress_modules"


def make_model(seed: int = 0, **kwargs) -> torch.nn.Module:
    return tiny_llava(image_size=IMAGE_SIZE, patch_size=PATCH, seed=seed, **kwargs)


def padded_batch(model, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Four samples: one image, two images, no image, one image; padded."""
    return tiny_llava_inputs(
        model, [(3, 2), (1, 5), (4, 3), (2, 2)], [1, 2, 0, 1], seed=1, padding_side=padding_side
    )


def randomize(dpn: tc.DPN, seed: int, std: float = 0.5) -> None:
    """Replace every router (and conv kernel) weight by random values: a stand-in for trained routers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in dpn.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * std)


def run(model, inputs) -> tuple[torch.Tensor, dict]:
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    if getattr(model, ENGINE, None) is None:
        return logits, None
    decisions = {
        layer: {key: value.clone() for key, value in d.items()}
        for layer, d in tc.stats(model).prefill.decisions.items()
    }
    return logits, decisions


def router_probabilities(dpn: tc.DPN, stage: int, states: torch.Tensor) -> torch.Tensor:
    """softmax(router(states) / T) by hand: LayerNorm -> Linear(h, h/4) -> GELU -> Linear(h/4, E), no biases."""
    router = dpn.routers[stage]
    with torch.no_grad():
        x = F.layer_norm(states, states.shape[-1:], router.norm.weight, router.norm.bias, router.norm.eps)
        logits = F.gelu(x @ router.down.weight.T) @ router.up.weight.T
    return torch.softmax(logits / dpn.temperature, dim=-1)


def route_to(router, states: torch.Tensor, experts: list[int], margin: float = 100.0) -> None:
    """Set the router's last layer so that sample b (whose routing state is states[b]) picks experts[b]: solve
    for logits `margin` on the wanted expert and 0 elsewhere."""
    with torch.no_grad():
        features = F.gelu(router.down(router.norm(states)))
        target = torch.zeros(len(experts), router.up.out_features)
        target[torch.arange(len(experts)), torch.tensor(experts)] = margin
        router.up.weight.copy_((torch.linalg.pinv(features) @ target).T)


def hidden_before(model, inputs: dict, layer: int) -> torch.Tensor:
    """The uncompressed model's hidden states entering decoder `layer`."""
    assert getattr(model, ENGINE, None) is None
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[layer]


# -- save / load -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["max", "avg", "conv"])
def test_save_and_from_pretrained_reproduce_logits_and_experts(tmp_path, pooling):
    model = make_model()
    inputs = padded_batch(model)
    dpn = tc.DPN(pooling=pooling, temperature=1.0, loss_target=1.2)
    tc.compress(model, dpn)
    randomize(dpn, seed=3)
    if pooling == "conv":
        assert len(dpn.conv_weights) == 3
        assert dpn.conv_weights[0].shape == (3, 4, 64)  # (experts, cells of the largest kernel, hidden)
    logits, decisions = run(model, inputs)
    experts = decisions[1]["expert"].tolist()
    assert len(set(experts)) > 1, "the perturbed routers should route samples apart"
    tc.save_pretrained(model, tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tokencompress_config.json",
        "tokencompress_weights.safetensors",
    ]
    config = json.loads((tmp_path / "tokencompress_config.json").read_text())
    assert config["compressors"] == [dpn.to_dict()]
    weights = load_file(tmp_path / "tokencompress_weights.safetensors")
    assert set(weights) == {f"0.{key}" for key in dpn.state_dict()}
    for key, value in dpn.state_dict().items():
        assert torch.equal(weights[f"0.{key}"], value)

    fresh = make_model()
    unloaded_logits, _ = run(tc.compress(make_model(), tc.DPN(pooling=pooling, temperature=1.0)), inputs)
    assert not torch.allclose(unloaded_logits, logits), (
        "fresh routers would give the same: the test shows nothing"
    )
    assert tc.from_pretrained(fresh, tmp_path) is fresh
    (loaded,) = tc.compressors_of(fresh)
    assert isinstance(loaded, tc.DPN) and loaded is not dpn
    assert loaded.to_dict() == dpn.to_dict()
    fresh_logits, fresh_decisions = run(fresh, inputs)
    assert torch.equal(fresh_logits, logits)
    assert fresh_decisions.keys() == decisions.keys()
    for layer in decisions:
        assert torch.equal(fresh_decisions[layer]["expert"], decisions[layer]["expert"])
        assert torch.equal(fresh_decisions[layer]["probability"], decisions[layer]["probability"])


def test_save_and_load_a_pipeline_of_two_dpns_and_fastv(tmp_path):
    """Each trainable compressor gets its own weights back, keyed by its place in the (layer-sorted) pipeline."""
    model = make_model()
    inputs = padded_batch(model)
    first, second = tc.DPN(after_layers=[0], temperature=1.0), tc.DPN(after_layers=[2], pooling="conv")
    tc.compress(model, [second, tc.FastV(layer=2, keep=0.75), first])  # given out of order
    randomize(first, seed=4)
    randomize(second, seed=5)
    logits, decisions = run(model, inputs)
    tc.save_pretrained(model, tmp_path)
    keys = set(load_file(tmp_path / "tokencompress_weights.safetensors"))
    assert {key.split(".")[0] for key in keys} == {"0", "2"}  # the FastV (place 1) has no weights

    fresh = tc.from_pretrained(make_model(), tmp_path)
    names = [type(c).__name__ for c in tc.compressors_of(fresh)]
    assert names == ["DPN", "FastV", "DPN"]
    fresh_logits, fresh_decisions = run(fresh, inputs)
    assert torch.equal(fresh_logits, logits)
    assert all(torch.equal(fresh_decisions[k]["expert"], decisions[k]["expert"]) for k in decisions)


def test_trainable_dpn_is_a_submodule_while_compressed():
    model = make_model()
    dpn = tc.DPN()
    with tc.compressed(model, dpn):
        assert getattr(model, MODULES)[0] is dpn
        parameters = {id(p) for p in model.parameters()}
        assert {id(p) for p in dpn.parameters()} <= parameters
        assert {id(p) for p in tc.compressor_parameters(model)} == {id(p) for p in dpn.parameters()}
        model.train()
        assert dpn.training and all(router.training for router in dpn.routers)
        model.eval()
        assert not dpn.training
        assert any(key.startswith(f"{MODULES}.0.routers.") for key in model.state_dict())
    assert not hasattr(model, MODULES)
    assert not any(key.startswith(MODULES) for key in model.state_dict())


# -- configuration ---------------------------------------------------------------------------------------------

CONFIGS = [
    {},
    {
        "after_layers": [0, 2],
        "experts": [[1, 1], [2, 1], [2, 2], [3, 3]],
        "pooling": "conv",
        "temperature": 2,
        "routing_token_id": 77,
        "min_tokens": 4,
        "min_grid_tokens": 9,
        "loss_weight": 0.5,
        "loss_target": 2.5,
        "expert_scales": [0, 1, 1.5, 3],
    },
    {"after_layers": 1, "experts": ((1, 2),), "pooling": "avg", "expert_scales": (2,)},
]


@pytest.mark.parametrize("params", CONFIGS)
def test_config_round_trips_through_json(params):
    dpn = tc.DPN(**params)
    data = json.loads(json.dumps(dpn.to_dict()))
    assert data["name"] == "dpn"
    back = tc.DPN.from_dict(data)
    assert type(back) is tc.DPN
    assert back.to_dict() == dpn.to_dict()
    assert tc.Compressor.from_dict(data).to_dict() == dpn.to_dict()
    assert tc.build("dpn", **params).to_dict() == dpn.to_dict()
    assert tc.registry()["dpn"] is tc.DPN
    assert isinstance(back.temperature, float)
    assert all(isinstance(e, tuple) for e in back.experts)
    if "after_layers" in params:
        assert back.after_layers == tuple(
            params["after_layers"] if isinstance(params["after_layers"], list) else [params["after_layers"]]
        )


def test_static_pyramid_config_round_trips_and_has_no_weights(tmp_path):
    pyramid = tc.StaticPyramid(after_layers=[0, 2], kernels=[(2, 2), (1, 2)], pooling="max")
    data = json.loads(json.dumps(pyramid.to_dict()))
    assert tc.Compressor.from_dict(data) == pyramid
    assert tc.build("static_pyramid", **{k: v for k, v in data.items() if k != "name"}) == pyramid
    model = make_model()
    inputs = padded_batch(model)
    tc.compress(model, pyramid)
    assert not hasattr(model, MODULES)
    logits, _ = run(model, inputs)
    tc.save_pretrained(model, tmp_path)
    assert not (tmp_path / "tokencompress_weights.safetensors").exists()
    assert torch.equal(run(tc.from_pretrained(make_model(), tmp_path), inputs)[0], logits)


# -- device and dtype ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["max", "conv"])
def test_routers_are_built_in_the_models_dtype(pooling):
    model = make_model(dtype=torch.bfloat16)
    inputs = padded_batch(model)
    dpn = tc.DPN(pooling=pooling)
    tc.compress(model, dpn)
    assert {p.dtype for p in dpn.parameters()} == {torch.bfloat16}
    logits, decisions = run(model, inputs)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert sorted(decisions) == [1, 2, 3]
    model.train()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -2:] = inputs["input_ids"][:, -2:]  # left padding: the last two tokens are real
    out = model(**inputs, labels=labels)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in dpn.routers[0].parameters())


def test_routers_follow_model_to():
    model = make_model()
    inputs = padded_batch(model)
    dpn = tc.DPN(pooling="conv")
    tc.compress(model, dpn)
    model.to(torch.bfloat16)
    assert {p.dtype for p in dpn.parameters()} == {torch.bfloat16}
    logits, _ = run(model, {**inputs, "pixel_values": inputs["pixel_values"].bfloat16()})
    assert logits.dtype == torch.bfloat16
    model.float()
    assert {p.dtype for p in dpn.parameters()} == {torch.float32}
    run(model, inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_routers_on_the_models_cuda_device():
    model = make_model().cuda()
    inputs = {k: v.cuda() for k, v in padded_batch(model).items()}
    dpn = tc.DPN(pooling="conv")
    tc.compress(model, dpn)
    assert {p.device.type for p in dpn.parameters()} == {"cuda"}
    logits, decisions = run(model, inputs)
    assert logits.is_cuda and decisions[1]["expert"].is_cuda
    model.cpu()
    assert {p.device.type for p in dpn.parameters()} == {"cpu"}


# -- the routing token helpers, with a real tokenizer built offline ------------------------------------------------


def word_tokenizer(size: int = 128):
    """A WordLevel fast tokenizer: <pad>=0, <unk>=1, <s>=2, <image>=3 (the tiny LLaVA's placeholder), w4..w{size-1}."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_TOKEN_ID, "<unk>": 1, "<s>": 2, "<image>": IMAGE_TOKEN_ID}
    vocab.update({f"w{i}": i for i in range(4, size)})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    tokenizer.add_tokens(["<image>"], special_tokens=True)  # so "<image><image>" splits
    tokenizer.padding_side = "left"
    assert len(tokenizer) == size
    return tokenizer


def prompt(question: str, answer: str, images: int = 1, routed: bool = True) -> str:
    image = "<image>" * PER_IMAGE
    text = " ".join([image] * images + [question])
    return (tc.with_routing_token(text) if routed else text) + " " + answer


def test_add_routing_token_adds_a_new_special_token_and_grows_the_embeddings():
    tokenizer = word_tokenizer()
    model = make_model()
    old_vocab = tokenizer.get_vocab()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    head = model.lm_head.weight.detach().clone()

    token_id = tc.add_routing_token(tokenizer, model)
    assert token_id == 128 and token_id not in old_vocab.values() and tc.ROUTER_TOKEN not in old_vocab
    assert tokenizer.convert_ids_to_tokens(token_id) == "<ROUTER>"
    assert len(tokenizer) == 129
    assert model.get_input_embeddings().weight.shape == (129, 64)
    assert model.lm_head.weight.shape == (129, 64)
    assert model.config.text_config.vocab_size == 129
    assert torch.equal(model.get_input_embeddings().weight[:128], embeddings)
    assert torch.equal(model.lm_head.weight[:128], head)
    # one token, wherever it stands; special: decoding can skip it
    ids = tokenizer(tc.with_routing_token("w5 w6 "))["input_ids"]
    assert ids == [5, 6, token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "w5 w6"
    assert tc.with_routing_token("is it red?  ") == "is it red?<ROUTER>"
    assert tc.with_routing_token("q", token="<R2>") == "q<R2>"

    # again, or through a processor (anything with .tokenizer): the same id, nothing grows
    processor = types.SimpleNamespace(tokenizer=tokenizer)
    assert tc.add_routing_token(processor, model) == token_id
    assert model.get_input_embeddings().weight.shape == (129, 64)
    other = tc.add_routing_token(processor, model, token="<R2>")
    assert other == 129 and model.get_input_embeddings().weight.shape == (130, 64)


def test_add_routing_token_uses_spare_embedding_rows():
    tokenizer = word_tokenizer()
    # embeddings already larger than the tokenizer, as LLaVA checkpoints often are
    model = make_model(vocab=160)
    token_id = tc.add_routing_token(tokenizer, model)
    assert token_id == 128
    assert model.get_input_embeddings().weight.shape == (160, 64)


def routed_batch(tokenizer, token_id: int) -> dict[str, torch.Tensor]:
    """Three left-padded prompts built with with_routing_token, each with an answer of 3 or 4 tokens after the
    token (so neither the last token nor the token before the last two is the routing token). Sample 1 has the
    token twice (the last one counts) and two images."""
    texts = [
        prompt("w5 w6 w7", "w10 w11 w21"),
        "w8<ROUTER> " + prompt("w9 w12", "w13 w14 w15", images=2),
        prompt("w16", "w17 w18 w19 w20"),
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(2)
    images = 1 + 2 + 1
    batch = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pixel_values": torch.randn(images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
    }
    assert ((batch["input_ids"] == token_id).sum(1) == torch.tensor([1, 2, 1])).all()
    assert ((batch["input_ids"] == IMAGE_TOKEN_ID).sum(1) == torch.tensor([1, 2, 1]) * PER_IMAGE).all()
    return batch


@pytest.mark.parametrize("labels", [False, True])
def test_prompt_with_the_routing_token_routes_by_it(labels):
    tokenizer = word_tokenizer()
    model = make_model()
    token_id = tc.add_routing_token(tokenizer, model)
    inputs = routed_batch(tokenizer, token_id)
    ids = inputs["input_ids"]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    expected = torch.where(ids == token_id, positions, -1).amax(1)  # the last occurrence
    last_real = torch.where(inputs["attention_mask"].bool(), positions, -1).amax(1)
    if labels:  # supervise the last two tokens only: the labels rule would read another token
        label_ids = torch.full_like(ids, -100)
        label_ids[:, -2:] = ids[:, -2:]
        before_label = torch.full_like(expected, ids.shape[1] - 3)
        assert (before_label != expected).all()
    assert (last_real != expected).all()
    states = hidden_before(model, inputs, layer=2)

    dpn = tc.DPN(after_layers=[1], routing_token_id=token_id, temperature=1.0)
    tc.compress(model, dpn)
    randomize(dpn, seed=7)
    seen = []
    dpn.routers[0].register_forward_hook(lambda module, args, output: seen.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        model(**inputs, **({"labels": label_ids} if labels else {}))
    rows = torch.arange(3)
    torch.testing.assert_close(seen[0], states[rows, expected], atol=1e-5, rtol=1e-5)
    probs = router_probabilities(dpn, 0, states[rows, expected])
    decision = tc.stats(model).prefill.decisions[2]
    assert decision["expert"].tolist() == probs.argmax(1).tolist()
    torch.testing.assert_close(decision["probability"], probs.max(1).values, atol=1e-5, rtol=1e-5)
    other = router_probabilities(dpn, 0, states[rows, last_real])
    assert ((other - probs).abs().amax(1) > 1e-3).all(), "the last token would route the same: shows nothing"


def test_missing_routing_token_raises_before_the_vision_tower():
    tokenizer = word_tokenizer()
    model = make_model()
    token_id = tc.add_routing_token(tokenizer, model)
    texts = [prompt("w5 w6", "w7"), prompt("w8 w9", "w10", routed=False), "w11 w12 w13"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "pixel_values": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)),
    }
    calls = []
    model.model.vision_tower.register_forward_pre_hook(lambda module, args: calls.append(1))
    tc.compress(model, tc.DPN(routing_token_id=token_id))
    message = rf"samples \[1\] have images but no routing token \(id {token_id}\)"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(**inputs)
    assert not calls, "the vision tower ran before the error"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
    assert not calls, "the vision tower ran before the error"

    # a sample without images needs no routing token (sample 2 here): the batch without sample 1 runs
    keep = [0, 2]
    good = {
        "input_ids": inputs["input_ids"][keep],
        "attention_mask": inputs["attention_mask"][keep],
        "pixel_values": inputs["pixel_values"][:1],
    }
    with torch.no_grad():
        model.generate(**good, max_new_tokens=2, suppress_tokens=[IMAGE_TOKEN_ID, token_id])
    assert calls
    assert tc.stats(model).prefill.layers[0].visual == [PER_IMAGE, 0]


# -- bad input: a clear error, the model untouched ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def untouched(model):
    """Yields; afterwards: same parameters, buffers and hooks as before, no engine, no tokencompress_modules."""
    with torch.no_grad():  # transformers installs its own hooks on the first forward
        model(**padded_batch(model))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    hooks = forward_hooks(model)
    yield
    assert_untouched(model, state, hooks)
    assert getattr(model, ENGINE, None) is None
    assert not hasattr(model, MODULES)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (
            lambda: tc.DPN(after_layers=[3]),
            ValueError,
            r"after_layers=\[3\] is outside this model; allowed 0\.\.2",
        ),
        (lambda: tc.DPN(after_layers=[0, 5]), ValueError, r"after_layers=\[0, 5\] is outside this model"),
        (
            lambda: [tc.DPN(after_layers=[0, 2]), tc.FastV(layer=3)],
            ValueError,
            r"DPN and FastV both act before layer 3",
        ),
        (
            lambda: [tc.FastV(layer=1), tc.DPN()],
            ValueError,
            r"FastV and DPN both act before layer 1",
        ),
        (
            lambda: [tc.StaticPyramid(after_layers=[0]), tc.DPN(after_layers=[0, 1])],
            ValueError,
            r"StaticPyramid and DPN both act before layer 1",
        ),
        (
            lambda: [tc.DPN(after_layers=[1]), tc.DPN(after_layers=[0, 1])],
            ValueError,
            r"DPN and DPN both act before layer 2",
        ),
        (
            lambda: tc.StaticPyramid(kernels=[(2, 2), (1, 2)]),
            ValueError,
            r"2 kernels for the 3 stages this model gets",
        ),
        (
            lambda: [
                tc.DPN(after_layers=[0], routing_token_id=5),
                tc.DPN(after_layers=[2], routing_token_id=6),
            ],
            ValueError,
            r"route by different tokens \[5, 6\]",
        ),
    ],
)
def test_rejected_by_compress(model, untouched, build, error, match):
    with pytest.raises(error, match=match):
        tc.compress(model, build())


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"after_layers": [2, 1]}, ValueError, r"after_layers=\[2, 1\] must be increasing and >= 0"),
        ({"after_layers": [1, 1]}, ValueError, r"must be increasing"),
        ({"after_layers": [-1]}, ValueError, r"after_layers=\[-1\] must be increasing and >= 0"),
        ({"after_layers": []}, ValueError, r"after_layers is None .* or a non-empty list"),
        ({"after_layers": [1.0]}, TypeError, r"after_layers must be ints"),
        ({"experts": ()}, ValueError, r"experts is a non-empty list of \(rows, cols\) kernels"),
        ({"experts": ((1, 1), (1, 1))}, ValueError, r"experts \[\(1, 1\), \(1, 1\)\] repeat a kernel"),
        ({"experts": ((1, 1), (0, 2))}, ValueError, r"a pooling kernel is \(rows, cols\) of ints >= 1"),
        ({"experts": ((1, 1), (1, 2, 2))}, ValueError, r"a pooling kernel is \(rows, cols\)"),
        ({"experts": (1, 2)}, ValueError, r"a pooling kernel is \(rows, cols\).*got 1"),
        ({"experts": ((1, 1), (1.0, 2))}, ValueError, r"a pooling kernel is \(rows, cols\) of ints"),
        ({"pooling": "median"}, ValueError, r"pooling='median' is not one of \('max', 'avg', 'conv'\)"),
        ({"temperature": 0}, ValueError, r"temperature must be > 0, got 0"),
        ({"temperature": -1.0}, ValueError, r"temperature must be > 0"),
        ({"routing_token_id": True}, TypeError, r"routing_token_id must be a token id"),
        ({"routing_token_id": "5"}, TypeError, r"routing_token_id must be a token id"),
        ({"min_tokens": -1}, ValueError, r"min_tokens must be an int >= 0"),
        ({"min_grid_tokens": 1.5}, ValueError, r"min_grid_tokens must be an int >= 0"),
        ({"expert_scales": (0, 1)}, ValueError, r"2 expert_scales for 3 experts"),
    ],
)
def test_invalid_dpn_configuration(params, error, match):
    with pytest.raises(error, match=match):
        tc.DPN(**params)
    with pytest.raises(error, match=match):
        tc.build("dpn", **params)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"after_layers": [0, 1], "kernels": [(2, 2), (1, 2), (1, 1)]}, r"3 kernels for 2 stages"),
        ({"kernels": [(2, 2), (0, 1)]}, r"a pooling kernel is \(rows, cols\) of ints >= 1"),
        ({"pooling": "conv"}, r"pooling='conv' is not 'max' or 'avg' \(conv is DPN's\)"),
    ],
)
def test_invalid_static_pyramid_configuration(params, match):
    with pytest.raises(ValueError, match=match):
        tc.StaticPyramid(**params)


def test_compressing_a_compressed_model(model):
    inputs = padded_batch(model)
    first = tc.DPN(temperature=1.0)
    tc.compress(model, first)
    try:
        randomize(first, seed=1)
        expected, _ = run(model, inputs)
        hooks, keys = forward_hooks(model), list(model.state_dict())
        second = tc.DPN()
        with pytest.raises(RuntimeError, match=r"already compressed; call tc\.uncompress"):
            tc.compress(model, second)
        assert len(second.routers) == 0  # nothing was built for the rejected one
        assert forward_hooks(model) == hooks and list(model.state_dict()) == keys
        assert tc.compressors_of(model) == [first]
        assert torch.equal(run(model, inputs)[0], expected)
    finally:
        tc.uncompress(model)


def test_routers_built_for_one_hidden_size_rejected_on_another(model):
    dpn = tc.DPN()
    with tc.compressed(model, dpn):
        pass
    assert dpn.routers[0].norm.normalized_shape == (64,)
    wider = make_model(hidden=96)
    with torch.no_grad():
        wider(**padded_batch(wider))
    state = {key: value.clone() for key, value in wider.state_dict().items()}
    hooks = forward_hooks(wider)
    with pytest.raises(
        ValueError,
        match=r"routers were built for hidden size 64 and 3 stages; this model has hidden size 96 and gets 3",
    ):
        tc.compress(wider, dpn)
    assert_untouched(wider, state, hooks)
    assert getattr(wider, ENGINE, None) is None and not hasattr(wider, MODULES)
    # and for a schedule with another number of stages (a 2-layer model gets one)
    with pytest.raises(ValueError, match=r"built for hidden size 64 and 3 stages; .* gets 1 stages"):
        tc.compress(make_model(layers=2), copy.deepcopy(dpn))
    # a fresh DPN fits the wider model
    fresh = tc.DPN()
    with tc.compressed(wider, fresh):
        run(wider, padded_batch(wider))
    assert fresh.routers[0].norm.normalized_shape == (96,)


def test_uncompress_removes_the_routers_and_restores_the_state_dict(model):
    inputs = padded_batch(model)
    bare, _ = run(model, inputs)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    hooks = forward_hooks(model)
    modules = {name for name, _ in model.named_modules()}
    dpn = tc.DPN(pooling="conv", temperature=1.0)
    tc.compress(model, dpn)
    randomize(dpn, seed=2)
    compressed, _ = run(model, inputs)
    assert any(key.startswith(MODULES) for key in model.state_dict())
    assert tc.uncompress(model) is model
    assert not hasattr(model, MODULES) and getattr(model, ENGINE, None) is None
    assert {name for name, _ in model.named_modules()} == modules
    assert_untouched(model, before, hooks)
    assert torch.equal(run(model, inputs)[0], bare)
    # the DPN keeps its weights: compressing again with it gives the same outputs
    with tc.compressed(model, dpn):
        assert torch.equal(run(model, inputs)[0], compressed)
    assert_untouched(model, before, hooks)


def test_a_compressor_serves_one_model_at_a_time():
    """A compressor's schedule and routers belong to the model it is attached to: attaching the same instance to
    a second model is refused before anything changes (the first keeps working), a copy is accepted, and after
    uncompress the instance is free again."""
    first = make_model()
    inputs = padded_batch(first)
    dpn = tc.DPN()
    tc.compress(first, dpn)
    expected, _ = run(first, inputs)
    second = make_model(layers=2)
    hooks = forward_hooks(second)
    with pytest.raises(ValueError, match=r"already serves another model"):
        tc.compress(second, dpn)
    assert forward_hooks(second) == hooks and not hasattr(second, "tokencompress_modules")
    assert dpn.acting_layers() == [1, 2, 3]
    assert torch.equal(run(first, inputs)[0], expected)
    copy_of = copy.deepcopy(dpn)
    tc.compress(make_model(), copy_of)  # a copy is a new compressor (its own routers, same weights)
    tc.uncompress(first)
    tc.compress(make_model(), dpn)  # free again
    with pytest.raises(ValueError, match=r"appears twice"):
        tc.compress(make_model(), [tc.FastV(layer=1), *(2 * [tc.StaticPyramid(after_layers=[2])])])


# -- generate --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routing", ["last_token", "routing_token"])
def test_generate_on_a_padded_batch_with_different_experts(routing):
    """Left padding; the first stage's router is set so the three samples pick experts (1,1), (1,2), (2,2):
    36, 18 and 9 visual tokens from layer 1 on. generate's first step equals the compressed forward's last
    logits; with a routing token (whose position does not move as tokens are generated) every decode step equals
    a full compressed forward over prompt + generated tokens."""
    model = make_model()
    router_id = 100
    inputs = tiny_llava_inputs(model, [(3, 3), (1, 6), (4, 2)], [1, 1, 1], seed=4, padding_side="left")
    ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == router_id, 101)
    if routing == "routing_token":
        ids[:, -2] = router_id
    inputs["input_ids"] = ids
    positions = ids.shape[1] - (2 if routing == "routing_token" else 1)
    states = hidden_before(model, inputs, layer=1)[:, positions]
    dpn = tc.DPN(routing_token_id=router_id if routing == "routing_token" else None)
    tc.compress(model, dpn)
    route_to(dpn.routers[0], states, [0, 1, 2])

    prompt_logits, decisions = run(model, inputs)
    assert decisions[1]["expert"].tolist() == [0, 1, 2]
    expected_visual = [PER_IMAGE, PER_IMAGE // 2, PER_IMAGE // 4]
    assert tc.stats(model).prefill.layers[1].visual == expected_visual

    new_tokens = 4
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            suppress_tokens=[IMAGE_TOKEN_ID, router_id],
            output_logits=True,
            return_dict_in_generate=True,
        )
    stats = tc.stats(model)
    assert stats.prefill.decisions[1]["expert"].tolist() == [0, 1, 2]
    assert stats.prefill.layers[0].visual == [PER_IMAGE] * 3
    assert stats.prefill.layers[1].visual == expected_visual
    for layer in stats.prefill.layers[1:]:
        assert len(set(layer.visual)) > 1, "samples should keep different numbers of visual tokens"
    assert stats.last.kind == "decode"
    assert out.sequences.shape == (3, ids.shape[1] + new_tokens)
    torch.testing.assert_close(out.logits[0], prompt_logits[:, -1], atol=1e-5, rtol=0)
    if routing == "routing_token":
        mask = inputs["attention_mask"]
        for step in range(1, new_tokens):
            full = {
                "input_ids": out.sequences[:, : ids.shape[1] + step],
                "attention_mask": torch.cat([mask, torch.ones(3, step, dtype=mask.dtype)], dim=1),
                "pixel_values": inputs["pixel_values"],
            }
            logits, full_decisions = run(model, full)
            assert full_decisions[1]["expert"].tolist() == [0, 1, 2]
            torch.testing.assert_close(out.logits[step], logits[:, -1], atol=1e-4, rtol=0)
