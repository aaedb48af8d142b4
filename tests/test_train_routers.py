"""benchmarks/train_routers.py: Trainer trains the routers of DPN and gamma-MoD on the shipped shapes model and
nothing else, and the saved routers are what `tokencompress ablate` loads."""

from __future__ import annotations

import math

import pytest
import torch

import tokencompress as tc
from benchmarks.train_routers import METHODS, train_routers
from tokencompress import evaluation


@pytest.mark.parametrize("method", sorted(METHODS))
def test_routers_train_and_the_model_stays_frozen(method, tmp_path):
    torch.manual_seed(0)
    model, prompts = evaluation.load_shapes_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = type("Args", (), {"loss_weight": 0.01, "skip": 0.5})()
    compressor = METHODS[method](options)
    tc.compress(model, compressor)
    initial = {k: v.clone() for k, v in compressor.state_dict().items()}
    log = train_routers(model, prompts.tokenizer, steps=3, batch=4, lr=1e-2, offset=0)
    assert log and all(math.isfinite(entry["loss"]) for entry in log if "loss" in entry)
    changed = [k for k, v in compressor.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "no router weight moved"
    tc.save_pretrained(model, tmp_path / "routers")
    tc.uncompress(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the model itself is untouched
    loaded = evaluation.read_trained(tmp_path / "routers")
    assert loaded.name == method
    for key, value in compressor.state_dict().items():
        assert torch.equal(loaded.weights[key], value)
