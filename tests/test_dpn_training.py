"""DPN trains: its routers learn through HF Trainer, gradients reach them through the probability scaling, the loss
is the LM loss plus the routing loss as documented, the router reads the documented token, the min_tokens guard
holds in training, and Trainer with gradient checkpointing trains the same as without.

The tiny LLaVA here has a 6 x 6 grid (36 visual tokens per image) and 4 decoder layers, so a (2, 2) expert leaves
9 tokens and a (1, 2) expert 18.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

import tokencompress as tc
from tokencompress.tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_llava, tiny_llava_inputs

IMAGE_SIZE, PATCH = 48, 8
PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2  # 36
IGNORE = -100


def make_model(seed: int = 0) -> torch.nn.Module:
    return tiny_llava(layers=4, image_size=IMAGE_SIZE, patch_size=PATCH, seed=seed)


def with_answers(inputs: dict, answers: list[int]) -> dict:
    """`inputs` plus labels supervising the last `answers[b]` real tokens of sample b (0: none supervised)."""
    labels = torch.full_like(inputs["input_ids"], IGNORE)
    for b, count in enumerate(answers):
        real = inputs["attention_mask"][b].nonzero().flatten()
        if count:
            answer = real[-count:]
            labels[b, answer] = inputs["input_ids"][b, answer]
    return {**inputs, "labels": labels}


def last_real(inputs: dict) -> torch.Tensor:
    mask = inputs["attention_mask"]
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(1)


def before_first_label(inputs: dict) -> torch.Tensor:
    """Per sample: the position before the first supervised label, or the last real token if none is."""
    labels = inputs["labels"]
    out = last_real(inputs).clone()
    for b in range(labels.shape[0]):
        supervised = (labels[b] != IGNORE).nonzero().flatten()
        if len(supervised):
            out[b] = supervised[0] - 1
    return out


def router_probabilities(dpn: tc.DPN, stage: int, states: torch.Tensor) -> torch.Tensor:
    """softmax(router(states) / T) written out by hand: LayerNorm -> Linear(h, h/4) -> GELU -> Linear(h/4, E)."""
    router = dpn.routers[stage]
    hidden = states.shape[-1]
    assert router.down.weight.shape == (hidden // 4, hidden) and router.down.bias is None
    assert router.up.weight.shape == (len(dpn.experts), hidden // 4) and router.up.bias is None
    with torch.no_grad():
        x = F.layer_norm(states, (hidden,), router.norm.weight, router.norm.bias, router.norm.eps)
        logits = F.gelu(x @ router.down.weight.T) @ router.up.weight.T
    return torch.softmax(logits / dpn.temperature, dim=-1)


def randomize_routers(dpn: tc.DPN, seed: int, std: float = 0.5) -> None:
    """Spread the routers' probabilities (fresh ones are near uniform) so positions and experts are told apart."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in dpn.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def states_before(model, inputs: dict, layer: int) -> torch.Tensor:
    """The uncompressed model's hidden states entering decoder `layer` (hidden_states[0] is the embeddings)."""
    assert getattr(model, "_tokencompress_engine", None) is None
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True)
    return out.hidden_states[layer]


def by_hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal LM cross-entropy: logits at t predict labels at t + 1, -100 ignored, mean over supervised tokens."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


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
    """Eval mode (argmax experts): loss, routing loss, experts per stage, visual tokens in the last layer."""
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    stats = tc.stats(model)
    return {
        "loss": out.loss.item(),
        "routing_loss": out.routing_loss.item(),
        "experts": {layer: d["expert"].tolist() for layer, d in stats.prefill.decisions.items()},
        "visual": sum(stats.prefill.layers[-1].visual),
    }


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def is_router(name: str) -> bool:
    return name.startswith("tokencompress_modules.")


def epoch_losses(trainer, steps_per_epoch: int) -> list[float]:
    """Mean logged training loss per epoch (each epoch sees every sample once, so epochs compare fairly)."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return [
        sum(losses[i : i + steps_per_epoch]) / steps_per_epoch
        for i in range(0, len(losses) - steps_per_epoch + 1, steps_per_epoch)
    ]


# The task the routers can win: a routing loss strong enough (weight 1, target 2: only the (2, 2) expert with
# probability 1 meets it) to pull the argmax towards the most compressing expert, temperature 1 so the routers'
# logits can move the probabilities within a few dozen steps, min_tokens 0 so training may sample (2, 2).
def trainable_dpn() -> tc.DPN:
    return tc.DPN(loss_weight=1.0, loss_target=2.0, temperature=1.0, min_tokens=0)


def test_trainer_trains_only_the_routers_of_a_frozen_model(tmp_path):
    model = make_model()
    dpn = trainable_dpn()
    tc.compress(model, dpn)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_router(name))
    routers = [p for name, p in model.named_parameters() if is_router(name)]
    assert len(routers) == 3 * 4  # three stages' LayerNorm (2), down, up
    assert {id(p) for p in routers} == {id(p) for p in tc.compressor_parameters(model)}
    assert {id(p) for p in routers} == {id(p) for p in dpn.parameters()}
    dataset = AnswerDataset()
    batch = dataset.batch()
    before, weights = evaluate(model, batch), snapshot(model)

    trainer = train(model, dataset, tmp_path, steps=32)

    # the optimizer Trainer built holds exactly the routers (it found them as model parameters)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in routers}
    # the loss falls through the routing loss (the routers raise the compression; the LM loss may rise with it)
    epochs = epoch_losses(trainer, steps_per_epoch=4)
    assert len(epochs) == 8
    assert epochs[-1] < epochs[0] - 1.0, epochs
    after = evaluate(model, batch)
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert after["routing_loss"] < 0.5 * before["routing_loss"], (before, after)

    for name, parameter in model.named_parameters():
        if is_router(name):
            assert not torch.equal(parameter, weights[name]), f"router parameter {name} did not change"
        else:
            assert torch.equal(parameter, weights[name]), f"frozen parameter {name} changed"
    # the routing changed, towards the most compressing expert: fewer visual tokens in the last layer
    assert after["experts"] != before["experts"]
    assert after["experts"][1].count(2) > before["experts"][1].count(2)
    assert after["visual"] < before["visual"]


def test_trainer_trains_routers_and_language_model(tmp_path):
    model = make_model()
    tc.compress(model, trainable_dpn())
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
    assert after["experts"] != before["experts"]


# -- gradients -------------------------------------------------------------------------------------------------


def backward_router_grads(experts) -> tuple[list[torch.Tensor], torch.Tensor]:
    model = make_model()
    inputs = with_answers(tiny_llava_inputs(model, [(3, 4), (2, 5)], [1, 2], seed=3), [2, 3])
    dpn = tc.DPN(experts=experts, loss_weight=0.0)
    tc.compress(model, dpn)
    randomize_routers(dpn, seed=1)
    out = model(**inputs)
    assert out.routing_loss.item() == 0.0
    out.loss.backward()
    return [p.grad for p in dpn.parameters()], model.lm_head.weight.grad


def test_lm_loss_reaches_the_routers_through_the_probability_scaling():
    grads, head = backward_router_grads(((1, 1), (1, 2), (2, 2)))
    assert head is not None and head.abs().sum() > 0
    assert all(g is not None for g in grads)
    assert all(g.abs().sum() > 0 for g in grads), "a router parameter got no gradient from the LM loss"


def test_a_single_expert_router_gets_zero_gradient():
    # The contrast to the test above: the LM loss reaches a router only through the chosen expert's probability,
    # which scales the pooled tokens. With one expert that probability is softmax over one logit, identically 1,
    # so d(prob)/d(logit) = p (1 - p) = 0: the router is in the graph (its gradients exist) but every one is zero.
    # With loss_weight=0 the routing loss adds nothing either.
    grads, head = backward_router_grads(((1, 1),))
    assert head is not None and head.abs().sum() > 0
    assert all(g is not None for g in grads)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# -- the loss: LM cross-entropy + routing loss -----------------------------------------------------------------


def routing_loss_by_hand(dpn: tc.DPN, decisions: dict, with_images: torch.Tensor) -> torch.Tensor:
    """Sum over stages of w * relu(target - mean over samples with images of scale[e] * p[e]), e the expert the
    decisions report (the argmax in eval mode)."""
    scales = torch.tensor(dpn.expert_scales) if dpn.expert_scales is not None else torch.arange(3.0)
    total = torch.tensor(0.0)
    for decision in decisions.values():
        compression = (scales[decision["expert"]] * decision["probability"])[with_images].mean()
        total = total + dpn.loss_weight * torch.relu(dpn.loss_target - compression)
    return total


@pytest.mark.parametrize(
    "config",
    [
        {},  # the defaults: scales 0, 1, 2, target 1.5, weight 1e-3
        {"expert_scales": (0.0, 1.0, 3.0), "loss_target": 2.5, "loss_weight": 0.7},
        {"loss_target": 0.0, "loss_weight": 5.0},  # relu clamps: the routing loss is 0
    ],
)
def test_loss_is_cross_entropy_plus_routing_loss_in_eval_mode(config):
    model = make_model()
    # sample 1 has no image: it is routed, but left out of the routing loss's mean
    inputs = with_answers(tiny_llava_inputs(model, [(3, 4), (2, 5), (4, 3)], [1, 0, 2], seed=2), [2, 3, 2])
    dpn = tc.DPN(temperature=1.0, **config)
    tc.compress(model, dpn)
    randomize_routers(dpn, seed=4)
    model.eval()
    out = model(**inputs)
    stats = tc.stats(model)

    decisions = stats.prefill.decisions
    assert sorted(decisions) == [1, 2, 3]  # the default schedule on 4 layers: before layers 1, 2, 3
    with_images = torch.tensor([True, False, True])
    expected = routing_loss_by_hand(dpn, decisions, with_images)
    torch.testing.assert_close(out.routing_loss, expected, atol=1e-6, rtol=1e-5)
    if config.get("loss_target") == 0.0:
        assert out.routing_loss.item() == 0.0
    else:
        assert out.routing_loss.item() > 0
    assert out.routing_loss.requires_grad
    assert stats.routing_loss is not None and not stats.routing_loss.requires_grad
    assert torch.equal(stats.routing_loss, out.routing_loss.detach())
    ce = by_hand_ce(out.logits, inputs["labels"])
    torch.testing.assert_close(out.loss, ce + out.routing_loss, atol=1e-5, rtol=1e-6)

    # without labels: no loss, the routing loss still reported (routed by the last real token now: recomputed)
    with torch.no_grad():
        bare = model(**{k: v for k, v in inputs.items() if k != "labels"})
    assert bare.loss is None
    expected = routing_loss_by_hand(dpn, tc.stats(model).prefill.decisions, with_images)
    torch.testing.assert_close(bare.routing_loss, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(tc.stats(model).routing_loss, bare.routing_loss)


def test_routing_loss_uses_the_argmax_expert_in_training():
    """In training the expert is sampled, yet the routing loss still takes the argmax expert's scaled probability:
    recomputed here from the router and the uncompressed hidden state at the routing token (one stage, so the
    hidden states it reads are those of the uncompressed model)."""
    model = make_model()
    inputs = with_answers(tiny_llava_inputs(model, [(3, 4), (2, 5), (4, 3)], [1, 2, 1], seed=5), [2, 3, 1])
    states = states_before(model, inputs, layer=2)
    dpn = tc.DPN(after_layers=[1], loss_weight=0.3, loss_target=1.8, min_tokens=0)
    tc.compress(model, dpn)
    randomize_routers(dpn, seed=6, std=0.2)
    model.train()
    positions = before_first_label(inputs)
    probs = router_probabilities(dpn, 0, states[torch.arange(3), positions])
    top = probs.argmax(1)
    expected = 0.3 * torch.relu(1.8 - (torch.arange(3.0)[top] * probs.max(1).values).mean())

    sampled_differs = False
    for seed in range(20):
        torch.manual_seed(seed)
        out = model(**inputs)
        decision = tc.stats(model).prefill.decisions[2]
        chosen = decision["expert"]
        torch.testing.assert_close(decision["probability"], probs.gather(1, chosen[:, None])[:, 0])
        torch.testing.assert_close(out.routing_loss, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            out.loss, by_hand_ce(out.logits, inputs["labels"]) + out.routing_loss, atol=1e-5, rtol=1e-6
        )
        sampled_differs |= bool((chosen != top).any())
    assert sampled_differs, "no seed sampled an expert other than the argmax; the test shows nothing"


# -- which token the router reads ------------------------------------------------------------------------------


def routed(model, inputs: dict) -> tuple[tc.DPN, torch.Tensor]:
    """Compress with a one-stage DPN (random routers, temperature 1), run `inputs` in eval mode, and return the
    DPN with the hidden states its router read."""
    dpn = tc.DPN(after_layers=[1], temperature=1.0)
    tc.compress(model, dpn)
    randomize_routers(dpn, seed=8)
    seen = []
    dpn.routers[0].register_forward_hook(lambda module, args, output: seen.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        model(**inputs)
    return dpn, seen[0]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("labels", [True, False])
def test_router_reads_the_last_prompt_token(padding_side, labels):
    """With labels: the token before the first supervised label (sample 2 has none: its last real token);
    without: the last real token. Checked on the router's input and on the probabilities recomputed by hand
    from the uncompressed hidden states."""
    model = make_model()
    inputs = tiny_llava_inputs(model, [(3, 4), (1, 6), (2, 2)], [1, 2, 1], seed=7, padding_side=padding_side)
    inputs = with_answers(inputs, [2, 3, 0])
    if not labels:
        inputs.pop("labels")
    expected = before_first_label(inputs) if labels else last_real(inputs)
    other = last_real(inputs) if labels else before_first_label(with_answers(inputs, [2, 3, 0]))
    assert (expected != other).sum() == 2  # the rule matters for samples 0 and 1
    states = states_before(model, inputs, layer=2)

    dpn, seen = routed(model, inputs)
    rows = torch.arange(3)
    torch.testing.assert_close(seen, states[rows, expected], atol=1e-5, rtol=1e-5)
    probs = router_probabilities(dpn, 0, states[rows, expected])
    decision = tc.stats(model).prefill.decisions[2]
    assert decision["expert"].tolist() == probs.argmax(1).tolist()
    torch.testing.assert_close(decision["probability"], probs.max(1).values, atol=1e-5, rtol=1e-5)
    # the other rule would have given other probabilities: the check above can tell them apart
    alternative = router_probabilities(dpn, 0, states[rows, other])
    for b in (0, 1):
        assert (alternative[b] - probs[b]).abs().max() > 1e-2


def test_plain_language_model_labels_route_by_the_last_real_token():
    """Labels that supervise every real text token (a plain language-model recipe) draw no prompt/answer line: the
    token "before the first label" would be padding or precede the image. The router then reads the last real
    token, as without labels."""
    model = make_model()
    inputs = tiny_llava_inputs(model, [(3, 2), (1, 6)], [1, 1], seed=1, padding_side="left")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE)
    labels = labels.masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, IGNORE)
    states = states_before(model, inputs, layer=2)
    _, seen = routed(model, {**inputs, "labels": labels})
    torch.testing.assert_close(seen, states[torch.arange(2), last_real(inputs)], atol=1e-5, rtol=1e-5)


# -- the min_tokens guard --------------------------------------------------------------------------------------


def favour_last_expert(dpn: tc.DPN) -> None:
    """Every router's logits, whatever its input: about 100 for the last expert, 0 for the others."""
    with torch.no_grad():
        for router in dpn.routers:
            router.norm.weight.zero_()
            router.norm.bias.fill_(1.0)
            router.down.weight.fill_(0.1)
            router.up.weight.zero_()
            router.up.weight[-1] = 1.0


def test_min_tokens_guard_in_training_never_samples_a_too_small_expert():
    model = make_model()
    inputs = tiny_llava_inputs(model, [(3, 2), (2, 4)], [1, 2], seed=9)  # 36 and 72 visual tokens
    dpn = tc.DPN(after_layers=[1], min_tokens=12)
    tc.compress(model, dpn)
    favour_last_expert(dpn)

    model.eval()  # inference takes the argmax: (2, 2) everywhere, the guard is for training only
    with torch.no_grad():
        model(**inputs)
    decision = tc.stats(model).prefill.decisions[2]
    assert decision["expert"].tolist() == [2, 2]
    assert decision["probability"].min() > 0.999
    assert tc.stats(model).prefill.layers[3].visual == [9, 18]

    model.train()
    chosen = []
    with torch.no_grad():
        for seed in range(40):
            torch.manual_seed(seed)
            model(**inputs)
            chosen.append(tc.stats(model).prefill.decisions[2]["expert"].tolist())
            assert tc.stats(model).prefill.layers[3].visual[0] >= 12
    # sample 0 (36 tokens): (2, 2) would leave 9 < 12, never sampled though it has ~all the probability
    assert all(c[0] in (0, 1) for c in chosen)
    assert {c[0] for c in chosen} == {0, 1}
    # sample 1 (72 tokens): (2, 2) leaves 18, allowed, and sampled
    assert sum(c[1] == 2 for c in chosen) > 30


def test_min_tokens_guard_falls_back_to_the_gentlest_expert():
    """When no expert leaves min_tokens, training takes the one that leaves the most (here the identity)."""
    model = make_model()
    inputs = tiny_llava_inputs(model, [(3, 2), (2, 4)], [1, 2], seed=9)
    dpn = tc.DPN(after_layers=[1], min_tokens=40)  # sample 0: nothing leaves 40; sample 1: only (1, 1)
    tc.compress(model, dpn)
    favour_last_expert(dpn)
    model.train()
    with torch.no_grad():
        for seed in range(10):
            torch.manual_seed(seed)
            model(**inputs)
            assert tc.stats(model).prefill.decisions[2]["expert"].tolist() == [0, 0]
            assert tc.stats(model).prefill.layers[3].visual == [36, 72]


def test_min_tokens_guard_holds_at_every_stage():
    model = make_model()
    inputs = tiny_llava_inputs(model, [(3, 2), (2, 4), (1, 1)], [1, 2, 1], seed=10)
    dpn = tc.DPN(min_tokens=12)  # three stages, before layers 1, 2, 3
    tc.compress(model, dpn)
    favour_last_expert(dpn)
    model.train()
    with torch.no_grad():
        for seed in range(15):
            torch.manual_seed(seed)
            model(**inputs)
            for layer in tc.stats(model).prefill.layers:
                assert min(layer.visual) >= 12, (seed, layer.layer, layer.visual)


# -- gradient checkpointing ------------------------------------------------------------------------------------


def test_gradient_checkpointing_under_trainer_trains_the_same_as_without(tmp_path):
    """Gradient checkpointing is supported (since 95d1f20; tests/test_gradient_checkpointing.py compares single
    steps): Trainer with activation (gradient) checkpointing logs the same losses and ends with the same routers
    as without."""
    results = []
    for checkpointing in (False, True):
        model = make_model()
        tc.compress(model, trainable_dpn())
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in tc.compressor_parameters(model):
            parameter.requires_grad_(True)
        trainer = train(
            model,
            AnswerDataset(size=8),
            tmp_path / str(checkpointing),
            4,
            activation_checkpointing=checkpointing,
        )
        assert model.model.language_model.gradient_checkpointing is checkpointing
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.append((losses, [p.detach().clone() for p in tc.compressor_parameters(model)]))
    (losses, routers), (losses_ckpt, routers_ckpt) = results
    assert len(losses) == 4
    assert losses_ckpt == pytest.approx(losses, abs=1e-4)
    for router, router_ckpt in zip(routers, routers_ckpt, strict=True):
        torch.testing.assert_close(router_ckpt, router, rtol=1e-4, atol=1e-5)
