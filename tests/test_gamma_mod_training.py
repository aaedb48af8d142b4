"""GammaMoD trains: its routing loss and the training loss match a hand computation, HF Trainer trains its shared
router (alone or with the LLM), the router learns to make threshold routing agree with top-k routing, the LM loss
reaches the router only through the MLP scaling, non-reentrant gradient checkpointing changes nothing (reentrant
checkpointing with an MLP scale is refused), save/load and config round trips reproduce the model, and bad
configurations fail before anything is attached.

The tiny LLaVA here has a 6 x 6 grid (36 visual tokens per image) and 6 decoder layers, so layers="arank" (every
layer but 0, 1, 2 and the last) makes layers 3 and 4 MoD layers; with the default skip=0.34 an image's top 24 of
36 visual tokens run each MoD layer (floor(0.34 x 36) = 12 skip it), two images' top 48 of 72.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_untouched, forward_hooks
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_llava, tiny_llava_inputs

IMAGE_SIZE, PATCH, LAYERS = 48, 8, 6
PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2  # 36
ARANK_LAYERS = [3, 4]
IGNORE = -100
MODULES = "tokencompress_modules"


def make_model(seed: int = 0, layers: int = LAYERS, **kwargs) -> torch.nn.Module:
    return tiny_llava(layers=layers, image_size=IMAGE_SIZE, patch_size=PATCH, seed=seed, **kwargs)


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.language_model.layers


def with_answers(inputs: dict, answers: list[int]) -> dict:
    """`inputs` plus labels supervising the last `answers[b]` real tokens of sample b (0: none supervised)."""
    labels = torch.full_like(inputs["input_ids"], IGNORE)
    for b, count in enumerate(answers):
        real = inputs["attention_mask"][b].nonzero().flatten()
        if count:
            answer = real[-count:]
            labels[b, answer] = inputs["input_ids"][b, answer]
    return {**inputs, "labels": labels}


def batch_of_three(model) -> dict:
    """One image, two images, no image (left-padded), with 2, 3 and 2 supervised answer tokens."""
    inputs = tiny_llava_inputs(model, [(3, 4), (2, 5), (4, 3)], [1, 2, 0], seed=2)
    return with_answers(inputs, [2, 3, 2])


def visual_mask(inputs: dict) -> torch.Tensor:
    return (inputs["input_ids"] == IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()


def by_hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal LM cross-entropy: logits at t predict labels at t + 1, -100 ignored, mean over supervised tokens."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LLaMA's RMSNorm written out: x / sqrt(mean(x^2) + eps) x weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def hand_logits(model, router: torch.nn.Linear, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The router's logits (B, L, 2) on layer `layer`'s own input norm of its input `x`, written out."""
    return (rms_norm(decoder_layers(model)[layer].input_layernorm, x) @ router.weight.T).float()


def hand_top_k(probability: torch.Tensor, visual: torch.Tensor, skip: float) -> torch.Tensor:
    """(B, L) bool: per sample, the N - floor(skip x N) visual tokens of highest probability."""
    chosen = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        positions = visual[b].nonzero().flatten()
        count = len(positions) - math.floor(skip * len(positions))
        order = torch.sort(probability[b, positions], descending=True, stable=True).indices
        chosen[b, positions[order[:count]]] = True
    return chosen


def capture_layer_inputs(model, layers: list[int]) -> dict[int, list[torch.Tensor]]:
    """Forward pre-hooks on the decoder layers, registered BEFORE compress so they run before the engine's: they
    see the hidden states as the model's loop passes them (the full sequence; a routed layer's skipped tokens are
    put back after it, so a MoD layer's input is always the whole sequence)."""
    assert getattr(model, "_tokencompress_engine", None) is None, "register before tc.compress"
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for layer in layers:
        decoder_layers(model)[layer].register_forward_pre_hook(
            lambda module, args, layer=layer: seen[layer].append(args[0].detach().clone())
        )
    return seen


def randomize_router(gamma: tc.GammaMoD, seed: int, std: float = 0.5) -> None:
    """Spread the router's probabilities (a fresh router gives p near 0.5) so the routing shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gamma.router.weight.copy_(
            torch.randn(gamma.router.weight.shape, generator=generator).to(gamma.router.weight.dtype) * std
        )


def distinct_input_norms(model, seed: int = 0) -> None:
    """Give every decoder layer its own input_layernorm weight (a fresh model's are all ones), so reading another
    layer's norm, or none, would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in decoder_layers(model):
            weight = layer.input_layernorm.weight
            weight.copy_(torch.rand(weight.shape, generator=generator) * 1.5 + 0.25)


def routed_visual(model, layer: int, visual: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the visual positions the engine reports as processed by decoder `layer` in the last prefill."""
    stats = tc.stats(model).prefill.layers[layer]
    out = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        out[b, stats.kept_positions(b)] = True
    return out & visual


# -- the loss: LM cross-entropy + routing loss, by hand ------------------------------------------------------------


CONFIGS = [
    {},  # arank on 6 layers: MoD layers 3 and 4; skip 0.34, weight 0.01, probability scaling
    {"layers": [1, 3, 5], "skip": 0.5, "loss_weight": 0.3, "mlp_scale": "straight_through"},
    {"layers": [2], "skip": 0.1, "loss_weight": 2.0, "mlp_scale": "none"},
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_routing_loss_and_loss_equal_a_hand_computation(config, mode):
    model = make_model()
    distinct_input_norms(model)
    inputs = batch_of_three(model)
    visual = visual_mask(inputs)
    gamma = tc.GammaMoD(**config)
    layers = config.get("layers", ARANK_LAYERS)
    seen = capture_layer_inputs(model, layers)
    tc.compress(model, gamma)
    assert gamma.acting_layers() == layers
    randomize_router(gamma, seed=3)
    model.train(mode == "train")
    out = model(**inputs)
    stats = tc.stats(model)

    expected = torch.tensor(0.0)
    for layer in layers:
        (x,) = seen[layer]
        assert x.shape[:2] == inputs["input_ids"].shape, "a MoD layer's input is the whole sequence"
        logits = hand_logits(model, gamma.router, layer, x)
        probability = logits.softmax(-1)[..., 1]
        top_k = hand_top_k(probability, visual, gamma.skip)
        # the engine ran exactly the top-k visual tokens (plus every text token) through this layer
        assert torch.equal(routed_visual(model, layer, visual), top_k), layer
        counts = visual.sum(1)
        assert stats.prefill.layers[layer].visual == (counts - torch.floor(counts * gamma.skip)).tolist()
        decision = stats.prefill.decisions[layer]
        assert decision["routed"].tolist() == top_k.sum(1).tolist()
        torch.testing.assert_close(decision["probability"][visual], probability[visual], atol=1e-5, rtol=1e-5)
        # cross-entropy of the router's logits against top-k membership, mean over the batch's visual tokens
        ce = F.cross_entropy(logits[visual], top_k[visual].long())
        expected = expected + gamma.loss_weight * ce
    assert sorted(stats.prefill.decisions) == layers

    torch.testing.assert_close(out.routing_loss, expected, atol=1e-5, rtol=1e-5)
    assert out.routing_loss.item() > 0
    assert out.routing_loss.requires_grad
    assert stats.routing_loss is not None and not stats.routing_loss.requires_grad
    assert torch.equal(stats.routing_loss, out.routing_loss.detach())
    ce = by_hand_ce(out.logits, inputs["labels"])
    torch.testing.assert_close(out.loss, ce + out.routing_loss, atol=1e-5, rtol=1e-6)

    # without labels: no loss, the routing loss is still reported
    with torch.no_grad():
        bare = model(**{k: v for k, v in inputs.items() if k != "labels"})
    assert bare.loss is None
    torch.testing.assert_close(bare.routing_loss, expected, atol=1e-5, rtol=1e-5)


def test_routing_loss_leaves_out_samples_without_images():
    """A batch whose only image-less sample is removed gives the same routing loss: that sample has no visual
    tokens, so it adds nothing to the mean over visual tokens."""
    model = make_model()
    gamma = tc.GammaMoD(loss_weight=0.5)
    tc.compress(model, gamma)
    randomize_router(gamma, seed=4)
    model.eval()
    both = tiny_llava_inputs(model, [(3, 4), (4, 3)], [1, 0], seed=6)
    alone = {key: value[:1] for key, value in both.items() if key != "pixel_values"}
    alone["pixel_values"] = both["pixel_values"]
    with torch.no_grad():
        together = model(**both).routing_loss
        single = model(**alone).routing_loss
    torch.testing.assert_close(together, single, atol=1e-5, rtol=1e-5)

    # a batch without any image: nothing is routed and the routing loss, if reported, is zero
    text_only = tiny_llava_inputs(model, [(3, 4), (2, 2)], [0, 0], seed=6)
    with torch.no_grad():
        out = model(**text_only)
    assert tc.stats(model).prefill.decisions == {}
    if "routing_loss" in out:
        assert out.routing_loss.item() == 0.0


# -- HF Trainer ------------------------------------------------------------------------------------------------


class AnswerDataset(torch.utils.data.Dataset):
    """Left-padded samples: text, one image (36 placeholders), a question, a 2-token answer (the only labels)."""

    def __init__(self, size: int = 16, width: int = 48, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(size):
            prefix = torch.randint(4, 128, (2 + i % 3,), generator=generator)
            question = torch.randint(4, 128, (3,), generator=generator)
            answer = torch.randint(4, 128, (2,), generator=generator)
            ids = torch.cat([prefix, torch.full((PER_IMAGE,), IMAGE_TOKEN_ID), question, answer])
            pad = width - len(ids)
            labels = torch.full_like(ids, IGNORE)
            labels[-len(answer) :] = answer
            self.items.append(
                {
                    "input_ids": torch.cat([torch.full((pad,), PAD_TOKEN_ID), ids]),
                    "attention_mask": torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones_like(ids)]),
                    "labels": torch.cat([torch.full((pad,), IGNORE), labels]),
                    "pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]

    def batch(self) -> dict[str, torch.Tensor]:
        return {key: torch.stack([item[key] for item in self.items]) for key in self.items[0]}


def train(model, dataset, output_dir, steps: int, **overrides):
    arguments = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    arguments.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**arguments), train_dataset=dataset)
    trainer.train()
    return trainer


def evaluate(model, batch: dict) -> dict:
    """Eval mode (top-k routing): loss and routing loss on the whole dataset."""
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return {"loss": out.loss.item(), "routing_loss": out.routing_loss.item()}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def is_router(name: str) -> bool:
    return name.startswith(f"{MODULES}.")


def epoch_losses(trainer, steps_per_epoch: int) -> list[float]:
    """Mean logged training loss per epoch (each epoch sees every sample once, so epochs compare fairly)."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return [
        sum(losses[i : i + steps_per_epoch]) / steps_per_epoch
        for i in range(0, len(losses) - steps_per_epoch + 1, steps_per_epoch)
    ]


# The base is frozen, so the LM loss moves only through the MLP scaling; loss_weight=1 makes the routing loss (the
# router growing confident about its own top-k set) a clear, falling part of the training loss.
def test_trainer_trains_only_the_router_of_a_frozen_model(tmp_path):
    model = make_model()
    gamma = tc.GammaMoD(loss_weight=1.0)
    tc.compress(model, gamma)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in tc.compressor_parameters(model):
        parameter.requires_grad_(True)
    routers = [p for name, p in model.named_parameters() if is_router(name)]
    assert [name for name, _ in model.named_parameters() if is_router(name)] == [f"{MODULES}.0.router.weight"]
    assert {id(p) for p in routers} == {id(p) for p in tc.compressor_parameters(model)}
    assert [id(p) for p in routers] == [id(gamma.router.weight)]
    assert gamma.router.weight.shape == (2, 64)
    dataset = AnswerDataset()
    batch = dataset.batch()
    before, weights = evaluate(model, batch), snapshot(model)

    trainer = train(model, dataset, tmp_path, steps=32, learning_rate=5e-2)

    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(gamma.router.weight)}
    epochs = epoch_losses(trainer, steps_per_epoch=4)
    assert len(epochs) == 8
    assert epochs[-1] < epochs[0] - 0.3, epochs
    after = evaluate(model, batch)
    assert after["loss"] < before["loss"] - 0.3, (before, after)
    assert after["routing_loss"] < 0.6 * before["routing_loss"], (before, after)
    for name, parameter in model.named_parameters():
        if is_router(name):
            assert not torch.equal(parameter, weights[name]), f"router parameter {name} did not change"
        else:
            assert torch.equal(parameter, weights[name]), f"frozen parameter {name} changed"


def test_trainer_trains_router_and_language_model(tmp_path):
    model = make_model()
    tc.compress(model, tc.GammaMoD())
    language = ("model.language_model.", "lm_head.")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_router(name) or name.startswith(language))
    dataset = AnswerDataset()
    batch = dataset.batch()
    before, weights = evaluate(model, batch), snapshot(model)

    trainer = train(model, dataset, tmp_path, steps=24, learning_rate=5e-3)

    epochs = epoch_losses(trainer, steps_per_epoch=4)
    assert epochs[-1] < epochs[0] - 1.0, epochs
    after = evaluate(model, batch)
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, weights[name])}
    routers = {name for name, _ in model.named_parameters() if is_router(name)}
    llm = {name for name, _ in model.named_parameters() if name.startswith(language)}
    assert routers <= changed
    assert "lm_head.weight" in changed
    assert len(changed & llm) > 0.9 * len(llm)
    assert changed <= routers | llm, "a frozen (vision) parameter changed"


# -- the router learns ------------------------------------------------------------------------------------------


def one_image_batch(model, seed: int, size: int) -> dict:
    inputs = tiny_llava_inputs(model, [(3, 4)] * size, [1] * size, seed=seed)
    return with_answers(inputs, [2] * size)


def threshold_agreement(model, gamma: tc.GammaMoD, inputs: dict) -> tuple[float, float]:
    """Eval mode, routing="threshold": per MoD layer and sample, the share of visual tokens on which threshold
    membership (the engine's routed set) agrees with top-k membership computed from the same probabilities, and the
    share two random sets of the same sizes would agree on, (k m + (n - k)(n - m)) / n^2. Both averaged."""
    model.eval()
    gamma.routing = "threshold"
    try:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        gamma.routing = "topk"
    visual = visual_mask(inputs)
    n = visual.sum(1).float()
    agreement, chance = [], []
    for layer in gamma.acting_layers():
        probability = tc.stats(model).prefill.decisions[layer]["probability"]
        top_k = hand_top_k(probability, visual, gamma.skip)
        routed = routed_visual(model, layer, visual)
        assert torch.equal(routed, visual & (probability > gamma.threshold)), (
            "threshold routing is p > threshold"
        )
        k, m = top_k.sum(1).float(), routed.sum(1).float()
        agreement.append((((routed == top_k) & visual).sum(1) / n).mean().item())
        chance.append(((k * m + (n - k) * (n - m)) / n**2).mean().item())
    return sum(agreement) / len(agreement), sum(chance) / len(chance)


def test_the_router_learns_to_make_threshold_routing_agree_with_top_k():
    """Routers-only training with a dominant routing loss (loss_weight 1) teaches the router to put the top-k set
    above p = 0.5 and the rest below: on held-out samples of the same distribution, threshold routing at 0.5 in
    eval mode then agrees with top-k routing better than before training and far better than chance."""
    model = make_model()
    gamma = tc.GammaMoD(loss_weight=1.0, threshold=0.5)
    tc.compress(model, gamma)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in tc.compressor_parameters(model):
        parameter.requires_grad_(True)
    held_out = one_image_batch(model, seed=1000, size=16)
    before, chance_before = threshold_agreement(model, gamma, held_out)
    # both sets are top sets of the same ranking, so even an untrained router beats chance (0.72 vs 0.53 here)
    assert before > chance_before, (before, chance_before)

    optimizer = torch.optim.Adam(tc.compressor_parameters(model), lr=1e-2)
    model.train()
    first_losses, last_losses = [], []
    for step in range(40):
        out = model(**one_image_batch(model, seed=step, size=8))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        (first_losses if step < 5 else last_losses if step >= 35 else []).append(out.routing_loss.item())
    assert sum(last_losses) < 0.8 * sum(first_losses), (first_losses, last_losses)

    after, chance_after = threshold_agreement(model, gamma, held_out)
    assert after > before + 0.03, (before, after)  # 0.72 -> 0.84 here
    assert after > chance_after + 0.15, (after, chance_after)
    assert after > 0.8, after


def test_threshold_routing_applies_at_inference_only():
    """routing="threshold": eval mode runs the visual tokens with p > threshold; train mode still runs the top k
    (the routing loss needs the capacity-bound set)."""
    model = make_model()
    inputs = batch_of_three(model)
    visual = visual_mask(inputs)
    gamma = tc.GammaMoD(routing="threshold", threshold=0.6)
    seen = capture_layer_inputs(model, [3])
    tc.compress(model, gamma)
    randomize_router(gamma, seed=5)
    for mode in (False, True):
        model.train(mode)
        with torch.no_grad():
            model(**inputs)
        probability = hand_logits(model, gamma.router, 3, seen[3].pop()).softmax(-1)[..., 1]
        expected = hand_top_k(probability, visual, gamma.skip) if mode else visual & (probability > 0.6)
        assert torch.equal(routed_visual(model, 3, visual), expected), mode
    # the threshold set here differs from the top-k set, so the check above tells the two rules apart
    assert not torch.equal(visual & (probability > 0.6), hand_top_k(probability, visual, gamma.skip))


# -- gradients -------------------------------------------------------------------------------------------------


def router_gradients(mlp_scale: str, loss_weight: float, seed: int = 1):
    model = make_model()
    inputs = batch_of_three(model)
    gamma = tc.GammaMoD(mlp_scale=mlp_scale, loss_weight=loss_weight)
    tc.compress(model, gamma)
    randomize_router(gamma, seed=seed)
    model.train()
    out = model(**inputs)
    routing = torch.autograd.grad(out.routing_loss, gamma.router.weight, retain_graph=True)[0]
    out.loss.backward()
    return gamma.router.weight.grad, routing, model.lm_head.weight.grad


@pytest.mark.parametrize("mlp_scale", ["probability", "straight_through"])
def test_lm_loss_reaches_the_router_through_the_mlp_scaling(mlp_scale):
    # loss_weight=0: the routing loss is exactly 0, so whatever reaches the router comes from the LM loss
    total, routing, head = router_gradients(mlp_scale, loss_weight=0.0)
    assert head is not None and head.abs().sum() > 0
    assert torch.equal(routing, torch.zeros_like(routing))
    assert total is not None and total.abs().sum() > 0, "the LM loss did not reach the router"
    # with a routing loss the two add up, and the LM part is not negligible
    total, routing, _ = router_gradients(mlp_scale, loss_weight=0.01)
    assert routing.abs().sum() > 0
    assert (total - routing).abs().sum() > 1e-3 * total.abs().sum()


def test_without_mlp_scaling_only_the_routing_loss_reaches_the_router():
    total, routing, head = router_gradients("none", loss_weight=0.0)
    assert head is not None and head.abs().sum() > 0
    assert total is None or torch.equal(total, torch.zeros_like(total))
    total, routing, _ = router_gradients("none", loss_weight=0.5)
    assert routing.abs().sum() > 0
    torch.testing.assert_close(total, routing, rtol=1e-6, atol=1e-9)


def test_straight_through_at_skip_zero_leaves_the_model_unchanged():
    """mlp_scale="straight_through" multiplies by p / p.detach() = 1: with skip=0 every token runs every layer, so
    the compressed model computes what the base model does, while the router still gets a gradient."""
    model = make_model()
    inputs = batch_of_three(model)
    model.eval()
    with torch.no_grad():
        reference = model(**inputs).logits
    gamma = tc.GammaMoD(skip=0.0, mlp_scale="straight_through", loss_weight=0.0)
    tc.compress(model, gamma)
    randomize_router(gamma, seed=2)
    out = model(**inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], reference[real], atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert gamma.router.weight.grad.abs().sum() > 0


# -- gradient checkpointing ------------------------------------------------------------------------------------


def checkpointed_step(checkpointing: dict | None, mlp_scale: str, batches: int = 1):
    """One training step (the losses of `batches` forwards summed, then one backward) with activation checkpointing
    enabled with these kwargs (None: off): loss, every gradient, and the tokens each layer processed in the last
    forward."""
    model = make_model(seed=3)
    model.train()
    if checkpointing is not None:  # the non-deprecated name of gradient_checkpointing_enable
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    gamma = tc.GammaMoD(mlp_scale=mlp_scale, loss_weight=0.1)
    tc.compress(model, gamma)
    randomize_router(gamma, seed=7)
    if batches == 1:
        loss = model(**batch_of_three(model)).loss
    else:  # batches of the same layout (one image, same prompt lengths), other images and text
        loss = sum(model(**one_image_batch(model, seed=seed, size=2)).loss for seed in range(batches))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, tc.stats(model).prefill.kept_tokens()


def assert_same_step(reference, checkpointed) -> None:
    (loss, grads, kept), (loss_ckpt, grads_ckpt, kept_ckpt) = reference, checkpointed
    assert kept_ckpt == kept
    assert kept[3] != kept[0], "nothing was routed"
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    assert f"{MODULES}.0.router.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("reentrant", "mlp_scale"),
    [(False, "probability"), (False, "straight_through"), (False, "none"), (True, "none")],
)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(reentrant, mlp_scale):
    reference = checkpointed_step(None, mlp_scale)
    assert_same_step(reference, checkpointed_step({"use_reentrant": reentrant}, mlp_scale))


@pytest.mark.parametrize("mlp_scale", ["probability", "straight_through"])
def test_reentrant_checkpointing_with_an_mlp_scale_is_refused(mlp_scale):
    """Documented (docs/training.md): reentrant checkpointing tracks gradients through a layer's positional inputs
    only, which the MLP scale is not, so that combination is refused with a clear error instead of wrong gradients."""
    with pytest.raises(ValueError, match="use_reentrant"):
        checkpointed_step({"use_reentrant": True}, mlp_scale)


@pytest.mark.filterwarnings("ignore:torch.utils.checkpoint")
def test_checkpointing_kwargs_without_use_reentrant_are_reentrant_and_refused():
    """Kwargs that do not name use_reentrant (here only preserve_rng_state) leave torch.utils.checkpoint at its own
    default, which in this torch is reentrant (with a warning): the same combination, so the same clear error is
    due, not an obscure failure in backward."""
    with pytest.raises(ValueError, match="use_reentrant"):
        checkpointed_step({"preserve_rng_state": True}, "probability")


def test_gradient_checkpointing_with_two_forwards_before_one_backward():
    """Two forwards, then one backward of their summed losses (two views, chosen/rejected pairs): the layers of the
    first forward are recomputed in backward after the second forward ran, and must still be scaled by the first
    forward's router probabilities."""
    reference = checkpointed_step(None, "probability", batches=2)
    assert_same_step(reference, checkpointed_step({"use_reentrant": False}, "probability", batches=2))


# -- save / load, configuration, dtype -----------------------------------------------------------------------------


def run_eval(model, inputs: dict) -> tuple[torch.Tensor, dict[int, list[int]], list]:
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    prefill = tc.stats(model).prefill
    routed = {layer: d["routed"].tolist() for layer, d in prefill.decisions.items()}
    return logits, routed, [layer.visual for layer in prefill.layers]


@pytest.mark.parametrize("routing", ["topk", "threshold"])
def test_save_and_from_pretrained_reproduce_logits_and_routing(tmp_path, routing):
    model = make_model()
    inputs = batch_of_three(model)
    gamma = tc.GammaMoD(
        layers=[2, 4], skip=0.5, routing=routing, threshold=0.55, mlp_scale="straight_through"
    )
    tc.compress(model, gamma)
    randomize_router(gamma, seed=3)
    logits, routed, visual = run_eval(model, inputs)
    if routing == "threshold":
        assert routed[2] != [18, 36, 0], "the threshold should route other counts than top-k"
    tc.save_pretrained(model, tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tokencompress_config.json",
        "tokencompress_weights.safetensors",
    ]
    config = json.loads((tmp_path / "tokencompress_config.json").read_text())
    assert config["compressors"] == [gamma.to_dict()]
    weights = load_file(tmp_path / "tokencompress_weights.safetensors")
    assert set(weights) == {"0.router.weight"}
    assert torch.equal(weights["0.router.weight"], gamma.router.weight)

    unloaded = run_eval(tc.compress(make_model(), tc.Compressor.from_dict(gamma.to_dict())), inputs)
    assert not torch.allclose(unloaded[0], logits), "a fresh router gives the same: the test shows nothing"

    fresh = make_model()
    assert tc.from_pretrained(fresh, tmp_path) is fresh
    (loaded,) = tc.compressors_of(fresh)
    assert isinstance(loaded, tc.GammaMoD) and loaded is not gamma
    assert loaded.to_dict() == gamma.to_dict()
    assert torch.equal(loaded.router.weight, gamma.router.weight)
    fresh_logits, fresh_routed, fresh_visual = run_eval(fresh, inputs)
    assert torch.equal(fresh_logits, logits)
    assert fresh_routed == routed
    assert fresh_visual == visual


GAMMA_CONFIGS = [
    {},
    {
        "layers": [1, 3, 4],
        "skip": 0.5,
        "routing": "threshold",
        "threshold": 0.25,
        "loss_weight": 0.0,
        "mlp_scale": "none",
    },
    {"layers": (2,), "skip": 0, "threshold": 0, "loss_weight": 3, "mlp_scale": "straight_through"},
]


@pytest.mark.parametrize("params", GAMMA_CONFIGS)
def test_config_round_trips_through_json_and_build(params):
    gamma = tc.GammaMoD(**params)
    data = json.loads(json.dumps(gamma.to_dict()))
    assert data["name"] == "gamma_mod"
    assert tc.registry()["gamma_mod"] is tc.GammaMoD
    for back in (
        tc.GammaMoD.from_dict(data),
        tc.Compressor.from_dict(data),
        tc.build("gamma_mod", **{k: v for k, v in data.items() if k != "name"}),
    ):
        assert type(back) is tc.GammaMoD
        assert back.to_dict() == gamma.to_dict()
        assert back.router is None  # the router is built at compress time, sized to the model
    if "layers" in params:
        assert data["layers"] == list(params["layers"])
    else:
        assert data["layers"] == "arank"


def test_bf16_router_on_a_bf16_model_runs_and_trains():
    model = make_model(dtype=torch.bfloat16)
    inputs = batch_of_three(model)
    gamma = tc.GammaMoD(loss_weight=0.1)
    tc.compress(model, gamma)
    assert gamma.router.weight.dtype == torch.bfloat16
    model.train()
    out = model(**inputs)
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss) and torch.isfinite(out.routing_loss)
    assert out.routing_loss.item() > 0
    out.loss.backward()
    grad = gamma.router.weight.grad
    assert grad is not None and grad.dtype == torch.bfloat16
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert tc.stats(model).prefill.layers[3].visual == [24, 48, 0]
    model.eval()
    gamma.routing = "threshold"
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


# -- bad input ---------------------------------------------------------------------------------------------------


BAD_PARAMS = [
    {"layers": []},
    {"layers": [3, 2]},
    {"layers": [2, 2, 3]},
    {"layers": [1.0, 2.0]},
    {"layers": [1, "2"]},
    {"layers": [True, 2]},
    {"layers": "foo"},
    {"layers": None},
    {"layers": 3},
    {"skip": -0.1},
    {"skip": 1.0},
    {"skip": 1.5},
    {"skip": True},
    {"skip": float("nan")},
    {"skip": "0.3"},
    {"routing": "sample"},
    {"routing": None},
    {"threshold": -0.01},
    {"threshold": 1.0},
    {"threshold": float("nan")},
    {"threshold": True},
    {"loss_weight": -0.01},
    {"loss_weight": float("nan")},
    {"loss_weight": True},
    {"mlp_scale": "sigmoid"},
    {"mlp_scale": None},
]


@pytest.mark.parametrize("params", BAD_PARAMS, ids=[repr(p) for p in BAD_PARAMS])
def test_bad_parameters_raise_a_clear_error(params):
    (name,) = params
    with pytest.raises((ValueError, TypeError), match=f"GammaMoD.*{name}|{name}.*GammaMoD"):
        tc.GammaMoD(**params)


def compressed_once(model) -> tuple[dict, dict]:
    """A snapshot of `model` after one plain forward (transformers adds its own hooks on the first forward)."""
    with torch.no_grad():
        model(**tiny_llava_inputs(model, [(2, 2)], [1], seed=0))
    return {k: v.clone() for k, v in model.state_dict().items()}, forward_hooks(model)


@pytest.mark.parametrize(
    ("layers", "pipeline", "match"),
    [
        (LAYERS, lambda: tc.GammaMoD(layers=[0, 2]), "layer"),
        (LAYERS, lambda: tc.GammaMoD(layers=[3, LAYERS]), "layer"),
        (LAYERS, lambda: tc.GammaMoD(layers=[-1, 3]), "layer"),
        (4, lambda: tc.GammaMoD(), "layers"),  # 'arank' leaves nothing on 4 layers
        (LAYERS, lambda: [tc.GammaMoD(layers=[2, 4]), tc.FastV(layer=4, keep=0.5)], "layer 4"),
        (LAYERS, lambda: [tc.FastV(layer=3, keep=0.5), tc.GammaMoD()], "layer 3"),
    ],
    ids=[
        "layer 0",
        "beyond the last",
        "negative",
        "too shallow for arank",
        "fastv at a mod layer",
        "fastv first",
    ],
)
def test_bad_pipeline_fails_before_touching_the_model(layers, pipeline, match):
    model = make_model(layers=layers)
    state, hooks = compressed_once(model)
    with pytest.raises(ValueError, match=match):
        tc.compress(model, pipeline())
    assert_untouched(model, state, hooks)
    assert getattr(model, "_tokencompress_engine", None) is None
    assert not hasattr(model, MODULES)
    tc.compress(model, tc.FastV(layer=2, keep=0.5))  # the model is still usable


def test_last_layer_and_five_layer_arank_are_allowed():
    """The edges of the valid range: layer L - 1 may be a MoD layer, and 'arank' on 5 layers is layer 3 alone."""
    model = make_model()
    tc.compress(model, tc.GammaMoD(layers=[1, LAYERS - 1]))
    gamma = tc.GammaMoD()
    tc.compress(make_model(layers=5), gamma)
    assert gamma.acting_layers() == [3]


def test_a_router_built_for_another_hidden_size_is_refused():
    gamma = tc.GammaMoD()
    wide = make_model()
    tc.compress(wide, gamma)
    assert gamma.router.in_features == 64
    tc.uncompress(wide)
    narrow = make_model(hidden=32)
    state, hooks = compressed_once(narrow)
    with pytest.raises(ValueError, match="hidden size"):
        tc.compress(narrow, gamma)
    assert_untouched(narrow, state, hooks)
    assert getattr(narrow, "_tokencompress_engine", None) is None
    # the same router on a model of its own size is reused, weights included
    weight = gamma.router.weight
    tc.compress(make_model(seed=1), gamma)
    assert gamma.router.weight is weight
