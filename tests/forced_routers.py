"""Saved DPN routers with a known choice, for tests of loading trained routers (ablate, the demo)."""

from __future__ import annotations

from pathlib import Path

import torch

import tokencompress as tc


def save_forced_dpn(model, directory: Path, expert: int) -> None:
    """Saved DPN routers that pick `expert` whatever the input: each router's LayerNorm outputs a constant
    (weight 0, bias 1), so its logits are one fixed vector, large enough at `expert` that its probability is 1."""
    dpn = tc.DPN()
    with tc.compressed(model, dpn), torch.no_grad():
        for router in dpn.routers:
            router.norm.weight.zero_()
            router.norm.bias.fill_(1.0)
            router.down.weight.fill_(1.0 / router.down.in_features)
            router.up.weight.zero_()
            router.up.weight[expert] = 1e3
        tc.save_pretrained(model, directory)
