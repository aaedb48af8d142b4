"""The compressor interface, its registry, and the shared base of token droppers."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..accounting import DecoderShape
from ..ops import keep_counts, top_k_mask
from ..view import EncoderWindows, Merge, VisualTokens, VisualView

_REGISTRY: dict[str, type[Compressor]] = {}


def register(name: str):
    """Class decorator: make a compressor buildable by name and loadable from JSON."""

    def decorate(cls: type[Compressor]) -> type[Compressor]:
        if name in _REGISTRY:
            raise ValueError(f"compressor name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registry() -> dict[str, type[Compressor]]:
    """Names -> compressor classes."""
    return dict(_REGISTRY)


def build(name: str, **params: Any) -> Compressor:
    """Build a compressor by its registered name, e.g. build("fastv", layer=2, keep=0.5)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**params)


class Compressor:
    """A method's configuration and its decision rule; no architecture knowledge.

    The engine calls `check_model` and `bind` at compress time, `check_inputs` at the start of each forward
    (before any work), and `select` on the visual-token view before each of its `acting_layers`. A method that
    needs attention scores names the layer in `scoring_layer`; the engine recomputes them there and passes them
    in the view. `select` returns a keep mask (drop the rest) or a `Merge` (replace groups by one token each).
    """

    name: ClassVar[str]
    layer: int

    def check_model(self, num_layers: int) -> None:
        if not 1 <= self.layer <= num_layers - 1:
            raise ValueError(
                f"{type(self).__name__}: layer={self.layer} is outside this model; "
                f"allowed 1..{num_layers - 1} (the model has {num_layers} decoder layers)"
            )

    def acting_layers(self) -> list[int]:
        """The decoder layers before which this compressor acts (valid after `check_model`)."""
        return [self.layer]

    def bind(self, shape: DecoderShape, reference: Tensor) -> None:
        """Build what depends on the model (e.g. routers sized to its hidden width, on the device and dtype of
        `reference`, one of its parameters). Default: nothing."""

    def encoder_windows(self) -> EncoderWindows | None:
        """Ask the engine to merge windows inside the vision encoder (where the adapter exposes it); the view then
        says which slots copy one merged token (`view.encoder`). Default: None."""
        return None

    def routing_token(self) -> int | None:
        """The token id whose hidden state routes this compressor's choices, or None for the last prompt token."""
        return None

    def check_inputs(self, tokens: VisualTokens) -> None:
        """Raise if this forward's inputs cannot be compressed by this configuration."""

    def scoring_layer(self) -> int | None:
        """The decoder layer whose attention scores `select` needs, or None (single-stage methods)."""
        return None

    def scoring_layers(self) -> dict[int, int]:
        """{acting layer: scoring layer} for every stage that needs attention scores."""
        scoring = self.scoring_layer()
        return {} if scoring is None else {self.layer: scoring}

    def scoring_query(self) -> str:
        """Whose attention: "last" (the last prompt token), "text" (mean over the text after the images), or
        "text_rows" (each of those text tokens' rows: `view.scores` is (B, q, n), `view.score_queries` (B, q))."""
        return "last"

    def trims_caches_from(self) -> int | None:
        """Output-aware cache: when prefill ends, every layer from this one on keeps only the visual tokens that
        reached the last layer (tokens a later stage dropped leave the earlier layers' caches too); None: off."""
        return None

    def select(self, view: VisualView) -> Tensor | Merge:
        """(B, n) bool: which visual slots to keep (non-visual slots are always kept by the engine), or a Merge."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Compressor:
        data = dict(data)
        return build(data.pop("name"), **data)


def check_keep(owner: str, keep: float | int) -> None:
    """keep is a ratio in (0, 1] (a float) or a token count >= 1 (an int)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{owner}: keep must be a float ratio in (0, 1] or an int count >= 1, got {keep!r}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(
            f"{owner}: keep={keep} is outside (0, 1]; pass a ratio in (0, 1] or an int token count"
        )
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"{owner}: keep={keep} must be a count >= 1 (or a float ratio in (0, 1])")


def check_layer(owner: str, layer: int) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"{owner}: layer must be an int, got {layer!r}")
    if layer < 1:
        raise ValueError(f"{owner}: layer={layer} must be >= 1 (pruning happens between decoder layers)")


class MultiStageCompressor(Compressor):
    """A method that acts after each of several decoder layers (`after`, resolved against the model by
    `resolve_schedule` in `check_model`), i.e. before each of its `acting_layers`."""

    after: list[int]

    @property
    def layer(self) -> int:  # the first layer it acts before, which orders a pipeline
        return self.acting_layers()[0]

    def resolve_schedule(self, num_layers: int, name: str, given: Any, default: Any) -> None:
        """`given` layers, else `default(num_layers)`, each at most L - 2 (acting after the last saves nothing)."""
        owner = type(self).__name__
        if num_layers < 2:
            raise ValueError(f"{owner}: the model has {num_layers} decoder layer; it needs at least 2")
        layers = list(given) if given is not None else default(num_layers)
        if layers[-1] > num_layers - 2:
            raise ValueError(
                f"{owner}: {name}={layers} is outside this model; allowed 0..{num_layers - 2} (the model has "
                f"{num_layers} decoder layers and acting after the last one saves nothing)"
            )
        self.after = layers

    def acting_layers(self) -> list[int]:
        if not hasattr(self, "after"):
            raise RuntimeError(f"{type(self).__name__}: the schedule is set by compress (check_model) first")
        return [a + 1 for a in self.after]

    def stage(self, view: VisualView) -> int:
        """Which stage acts on this view (0 for the first)."""
        return self.acting_layers().index(view.layer)


class TokenDropper(Compressor):
    """Base of methods that drop visual tokens once: score them, keep the top `keep` per sample.

    Subclasses are dataclasses with fields `layer` and `keep` and implement `score`.
    """

    layer: int
    keep: float | int

    def check_inputs(self, tokens: VisualTokens) -> None:
        visual_counts = tokens.counts()
        if isinstance(self.keep, int) and bool((visual_counts > 0).any()):
            smallest = int(visual_counts[visual_counts > 0].min())
            if self.keep > smallest:
                raise ValueError(
                    f"{type(self).__name__}: keep={self.keep} tokens is more than the {smallest} visual tokens of "
                    f"a sample in this batch; pass a count <= {smallest} or a ratio in (0, 1]"
                )

    def score(self, view: VisualView) -> Tensor:
        raise NotImplementedError

    def select(self, view: VisualView) -> Tensor:
        counts = keep_counts(view.counts(), self.keep)
        return top_k_mask(self.score(view), view.is_visual, counts)


def seeded_uniform(length: int, seed: int, device: torch.device, block: int = 4096) -> Tensor:
    """`length` uniform draws from `seed`, drawn in fixed blocks so a prefix never depends on `length`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    blocks = [torch.rand(block, generator=generator) for _ in range(-(-length // block))]
    return torch.cat(blocks)[:length].to(device)
