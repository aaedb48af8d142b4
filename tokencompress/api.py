"""The public one-call API: compress, uncompress, compressed, stats, save_pretrained, from_pretrained."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .accounting import Stats
from .compressors.base import Compressor
from .engine.runtime import SUPPORTED_ATTENTION, Engine

ATTRIBUTE = "_tokencompress_engine"
CONFIG_NAME = "tokencompress_config.json"
FORMAT_VERSION = 1


def compress(model: nn.Module, compressors: Compressor | Sequence[Compressor]) -> nn.Module:
    """Compress `model`'s visual tokens in place with one compressor or a pipeline; returns the model.

    Everything is validated before anything is attached, so a failed call leaves the model untouched.
    """
    from tokencompress.adapters import find_adapter

    if isinstance(compressors, Compressor):
        pipeline = [compressors]
    elif isinstance(compressors, (list, tuple)):
        pipeline = list(compressors)
    else:
        raise TypeError(
            f"expected tokencompress compressors (an instance or a list of them), got {compressors!r} "
            "(e.g. tc.FastV(layer=2, keep=0.5), not the class tc.FastV)"
        )
    if not pipeline:
        raise ValueError("compress needs at least one compressor")
    for item in pipeline:
        if not isinstance(item, Compressor):
            raise TypeError(f"expected tokencompress compressors, got {type(item).__name__}: {item!r}")
    if getattr(model, ATTRIBUTE, None) is not None:
        raise RuntimeError(
            "this model is already compressed; call tc.uncompress(model) before compressing again"
        )
    adapter = find_adapter(model)
    implementation = adapter.attention_implementation()
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"tokencompress supports attention implementations {SUPPORTED_ATTENTION}; the model uses "
            f"{implementation!r} (load it with attn_implementation='sdpa' or 'eager')"
        )
    num_layers = len(adapter.layers)
    by_layer: dict[int, Compressor] = {}
    for item in pipeline:
        item.check_model(num_layers)
        if item.layer in by_layer:
            raise ValueError(
                f"{type(by_layer[item.layer]).__name__} and {type(item).__name__} both act before layer "
                f"{item.layer}; a pipeline allows one compressor per layer"
            )
        by_layer[item.layer] = item
    engine = Engine(model, adapter, pipeline)
    engine.attach()
    object.__setattr__(model, ATTRIBUTE, engine)
    return model


def uncompress(model: nn.Module) -> nn.Module:
    """Remove every hook: the model is exactly as before (same outputs, same state_dict)."""
    engine = _engine(model)
    engine.detach()
    object.__delattr__(model, ATTRIBUTE)
    return model


@contextmanager
def compressed(model: nn.Module, compressors: Compressor | Sequence[Compressor]) -> Iterator[nn.Module]:
    """`with tc.compressed(model, tc.FastV()): ...` compresses inside the block and undoes it on exit."""
    compress(model, compressors)
    try:
        yield model
    finally:
        uncompress(model)


def stats(model: nn.Module) -> Stats:
    """What the last forward (and the last prefill) did: kept tokens per layer and sample, FLOPs, KV bytes."""
    return _engine(model).stats()


def compressors_of(model: nn.Module) -> list[Compressor]:
    """The pipeline a compressed model runs, in layer order."""
    return list(_engine(model).compressors)


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the pipeline's configuration as JSON (and, for trainable compressors, their weights)."""
    engine = _engine(model)
    os.makedirs(directory, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, "compressors": [c.to_dict() for c in engine.compressors]}
    with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
        json.dump(config, handle, indent=2)


def from_pretrained(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Re-apply a saved pipeline to a freshly loaded base model."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}; was it written by tc.save_pretrained?")
    with open(path) as handle:
        config = json.load(handle)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return compress(model, [Compressor.from_dict(item) for item in config["compressors"]])


def _engine(model: nn.Module) -> Engine:
    engine = getattr(model, ATTRIBUTE, None)
    if engine is None:
        raise RuntimeError("this model is not compressed; call tc.compress(model, ...) first")
    return engine
