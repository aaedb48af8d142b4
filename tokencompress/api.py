"""The public one-call API: compress, uncompress, compressed, stats, save_pretrained, from_pretrained."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from .accounting import Stats
from .compressors.base import Compressor
from .engine.runtime import OWNER, SUPPORTED_ATTENTION, Engine

ATTRIBUTE = "_tokencompress_engine"
CONFIG_NAME = "tokencompress_config.json"
WEIGHTS_NAME = "tokencompress_weights.safetensors"
FORMAT_VERSION = 1


def compress(model: nn.Module, compressors: Compressor | Sequence[Compressor]) -> nn.Module:
    """Compress `model`'s visual tokens in place with one compressor or a pipeline; returns the model.

    Everything is validated before anything is attached, so a failed call leaves the model untouched.
    """
    adapter, pipeline = _prepare(model, compressors)
    return _attach(model, adapter, pipeline)


def _prepare(
    model: nn.Module, compressors: Compressor | Sequence[Compressor]
) -> tuple[Any, list[Compressor]]:
    """Validate the pipeline against the model and bind it (build routers); touches nothing on the model."""
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
        if _serving(item):
            raise ValueError(
                f"this {type(item).__name__} already serves another model (its schedule and routers are that "
                "model's); give each model its own, e.g. copy.deepcopy(compressor) or Compressor.from_dict(c.to_dict())"
            )
    if len({id(item) for item in pipeline}) != len(pipeline):
        raise ValueError("the same compressor instance appears twice in the pipeline")
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
        for layer in item.acting_layers():
            if layer in by_layer:
                raise ValueError(
                    f"{type(by_layer[layer]).__name__} and {type(item).__name__} both act before layer "
                    f"{layer}; a pipeline allows one compressor per layer"
                )
            by_layer[layer] = item
    tokens = {item.routing_token() for item in pipeline} - {None}
    if len(tokens) > 1:
        raise ValueError(f"the pipeline's compressors route by different tokens {sorted(tokens)}; use one")
    reference = next(adapter.language_model.parameters())
    for item in pipeline:
        item.bind(adapter.shape(), reference)
    return adapter, pipeline


def _attach(model: nn.Module, adapter: Any, pipeline: list[Compressor]) -> nn.Module:
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


def compressor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of a compressed model's pipeline (e.g. DPN's routers), to train them alone."""
    return [
        p for item in _engine(model).compressors if isinstance(item, nn.Module) for p in item.parameters()
    ]


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the pipeline's configuration as JSON and the weights of its trainable compressors (routers) as
    safetensors, keyed by the compressor's place in the pipeline."""
    engine = _engine(model)
    os.makedirs(directory, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, "compressors": [c.to_dict() for c in engine.compressors]}
    with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
        json.dump(config, handle, indent=2)
    weights = {
        f"{place}.{key}": value.detach().contiguous()
        for place, item in enumerate(engine.compressors)
        if isinstance(item, nn.Module)
        for key, value in item.state_dict().items()
    }
    path = os.path.join(directory, WEIGHTS_NAME)
    if weights:
        save_file(weights, path)
    elif os.path.exists(path):
        os.remove(path)  # a stale file from an earlier pipeline would be loaded with this one


def read_saved(directory: str | os.PathLike) -> tuple[list[dict], dict | None]:
    """What tc.save_pretrained wrote: the pipeline's compressor configs, and the weights (on CPU) keyed
    "<place>.<name>" (None when it has no trainable compressor, hence no weights file)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}; was it written by tc.save_pretrained?")
    with open(path) as handle:
        config = json.load(handle)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    weights = load_file(weights_path) if os.path.isfile(weights_path) else None
    return config["compressors"], weights


def from_pretrained(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Re-apply a saved pipeline, with its trained weights, to a freshly loaded base model."""
    saved, weights = read_saved(directory)
    adapter, pipeline = _prepare(model, [Compressor.from_dict(item) for item in saved])
    trainable = {place: item for place, item in enumerate(pipeline) if isinstance(item, nn.Module)}
    if trainable:
        if weights is None:
            raise FileNotFoundError(f"{directory!s} has trainable compressors but no {WEIGHTS_NAME}")
        for place, item in trainable.items():  # load_state_dict copies onto the routers' device
            prefix = f"{place}."
            item.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    return _attach(model, adapter, pipeline)


def _serving(item: Compressor) -> bool:
    """Whether this very instance runs in a compressed model now (a copy of it does not)."""
    owner = item.__dict__.get(OWNER)
    model = owner() if owner is not None else None
    engine = getattr(model, ATTRIBUTE, None) if model is not None else None
    return engine is not None and any(c is item for c in engine.compressors)


def _engine(model: nn.Module) -> Engine:
    engine = getattr(model, ATTRIBUTE, None)
    if engine is None:
        raise RuntimeError("this model is not compressed; call tc.compress(model, ...) first")
    return engine
