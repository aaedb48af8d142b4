"""Training with gradient checkpointing: the loss and every gradient equal those of the same step without it.

transformers 5.x checkpoints each decoder layer's `forward`, so the engine's layer hooks run once and the
recomputation in backward sees the same shortened inputs; the reference here is the same compressed model
trained without checkpointing (a failure would show as an error in backward or as different gradients).
"""

from __future__ import annotations

import pytest
import torch

import tokencompress as tc
from tokencompress.tiny import tiny_llava, tiny_llava_inputs
from tokencompress.tiny_qwen import tiny_qwen_inputs, tiny_qwen_vl

PIPELINES = {
    "dpn": lambda: tc.DPN(experts=((1, 1), (1, 2), (2, 2)), min_tokens=0),
    "dpn-conv": lambda: tc.DPN(pooling="conv", min_tokens=0),
    "static_pyramid": lambda: tc.StaticPyramid(),
    "fastv": lambda: tc.FastV(layer=2, keep=0.5),
    "fastv+pyramid": lambda: [tc.FastV(layer=1, keep=0.75), tc.StaticPyramid(after_layers=[1, 2])],
}


def _llava(checkpointing: bool, reentrant: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny_llava(image_size=48, patch_size=8, seed=3)
    inputs = tiny_llava_inputs(model, [(3, 4), (5, 2), (2, 3)], [1, 2, 0], seed=1)
    return _prepare(model, inputs, checkpointing, reentrant)


def _qwen(checkpointing: bool, reentrant: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny_qwen_vl("qwen2_vl")
    samples = [
        [("text", 3), ("image", (12, 10)), ("text", 4)],
        [("text", 2), ("image", (8, 8)), ("text", 3)],
    ]
    return _prepare(model, tiny_qwen_inputs(model, samples), checkpointing, reentrant)


def _prepare(model, inputs, checkpointing: bool, reentrant: bool):
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100  # the last three tokens are the "answer"
    labels[inputs["attention_mask"] == 0] = -100
    return model, {**inputs, "labels": labels}


def _step(build, pipeline: str, checkpointing: bool, reentrant: bool = False):
    model, inputs = build(checkpointing, reentrant)
    tc.compress(model, PIPELINES[pipeline]())
    torch.manual_seed(0)  # the same expert samples in both runs
    out = model(**inputs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, tc.stats(model)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_llava_gradients_equal_without_checkpointing(pipeline: str, reentrant: bool) -> None:
    loss, grads, stats = _step(_llava, pipeline, checkpointing=False)
    loss_ckpt, grads_ckpt, stats_ckpt = _step(_llava, pipeline, checkpointing=True, reentrant=reentrant)
    assert stats.prefill.kept_tokens() == stats_ckpt.prefill.kept_tokens()
    assert stats.prefill.kept_tokens()[-1] != stats.prefill.kept_tokens()[0], "nothing was compressed"
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    if pipeline.startswith("dpn"):
        router = [name for name in grads if name.startswith("tokencompress_modules.0.routers")]
        assert router and any(bool(grads[name].abs().sum() > 0) for name in router)


@pytest.mark.parametrize("pipeline", ["dpn", "static_pyramid"])
def test_qwen_gradients_equal_without_checkpointing(pipeline: str) -> None:
    loss, grads, _ = _step(_qwen, pipeline, checkpointing=False)
    loss_ckpt, grads_ckpt, _ = _step(_qwen, pipeline, checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)
