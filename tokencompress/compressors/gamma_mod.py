"""gamma-MoD: mixture-of-depths layers that let most visual tokens skip most layers, routed by one shared router.

Luo, Luo, Ji, Zhou, Sun, Shen, Ji, "gamma-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language
Models", 2024. https://arxiv.org/abs/2410.13859 (code: https://github.com/Yaxin9Luo/Gamma-MOD)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..accounting import DecoderShape
from ..ops import top_k_mask
from ..view import Route, VisualView
from .base import Compressor, register

ROUTINGS = ("topk", "threshold")
MLP_SCALES = ("probability", "straight_through", "none")


def authors_layers(num_layers: int) -> list[int]:
    """The authors' choice after ARank: every layer but the first three and the last (28 of 32 for 7B)."""
    return [layer for layer in range(3, num_layers - 1)]


@register("gamma_mod")
class GammaMoD(Compressor, nn.Module):
    """At each MoD layer, one router shared by all of them (Linear(h, 2), no bias, on the layer's own
    input_layernorm output; p = softmax(logits)[1]) picks which visual tokens run the layer: the top
    N - floor(skip x N) by p ("topk", training and capacity-bound inference) or those with p > threshold
    ("threshold", the authors' inference). Text tokens always run. Routed tokens keep their positions and attend
    among themselves and the text; their MLP output is scaled by p (`mlp_scale`); skipped tokens leave the layer
    unchanged, and the layer's KV cache holds only what ran. Decode steps (text) run every layer.

    layers: "arank" (the authors' outcome: every layer but 0, 1, 2 and the last) or 0-based layer indices, e.g.
    `tc.arank(model, batches, count=k).layers` to choose by ARank measured on your data. Routing loss per MoD
    layer: cross-entropy of the router's logits on the visual tokens against top-k membership, x loss_weight,
    summed over layers. mlp_scale: "probability" (the authors: MLP output x p), "straight_through" (x p / p.detach(),
    value 1: a pretrained model is unchanged at skip=0 while the router still gets the gradient), or "none".
    """

    def __init__(
        self,
        layers: str | Sequence[int] = "arank",
        skip: float = 0.34,
        routing: str = "topk",
        threshold: float = 0.005,
        loss_weight: float = 0.01,
        mlp_scale: str = "probability",
    ) -> None:
        nn.Module.__init__(self)
        if isinstance(layers, str):
            if layers != "arank":
                raise ValueError(f"GammaMoD: layers is 'arank' or a list of layer indices, got {layers!r}")
        elif not isinstance(layers, (list, tuple)):
            raise TypeError(f"GammaMoD: layers is 'arank' or a list of layer indices, got {layers!r}")
        else:
            layers = list(layers)
            if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
                raise ValueError(
                    f"GammaMoD: layers must be 'arank' or a non-empty list of ints, got {layers!r}"
                )
            if layers != sorted(set(layers)):
                raise ValueError(f"GammaMoD: layers={layers} must be increasing without repeats")
            layers = tuple(layers)
        if isinstance(skip, bool) or not isinstance(skip, (int, float)) or not 0 <= skip < 1:
            raise ValueError(
                f"GammaMoD: skip is the share of visual tokens skipping a layer, in [0, 1), got {skip!r}"
            )
        if routing not in ROUTINGS:
            raise ValueError(f"GammaMoD: routing={routing!r} is not one of {ROUTINGS}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"GammaMoD: threshold is a router probability in [0, 1), got {threshold!r}")
        if (
            isinstance(loss_weight, bool)
            or not isinstance(loss_weight, (int, float))
            or not 0 <= loss_weight < math.inf
        ):
            raise ValueError(f"GammaMoD: loss_weight must be a finite number >= 0, got {loss_weight!r}")
        if mlp_scale not in MLP_SCALES:
            raise ValueError(f"GammaMoD: mlp_scale={mlp_scale!r} is not one of {MLP_SCALES}")
        self.layers, self.skip, self.routing = layers, float(skip), routing
        self.threshold, self.loss_weight, self.mlp_scale = float(threshold), float(loss_weight), mlp_scale
        self.router: nn.Linear | None = None

    # -- configuration ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": self.layers if isinstance(self.layers, str) else list(self.layers),
            "skip": self.skip,
            "routing": self.routing,
            "threshold": self.threshold,
            "loss_weight": self.loss_weight,
            "mlp_scale": self.mlp_scale,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")

    def check_model(self, num_layers: int) -> None:
        layers = authors_layers(num_layers) if self.layers == "arank" else list(self.layers)
        if not layers:
            raise ValueError(
                f"GammaMoD: a model of {num_layers} layers has no layer besides 0, 1, 2 and the last"
            )
        if layers[0] < 1 or layers[-1] > num_layers - 1:
            raise ValueError(
                f"GammaMoD: layers={layers} is outside this model; allowed 1..{num_layers - 1} (layer 0 stays "
                f"dense: transformers reads the cache's length from it; the model has {num_layers} layers)"
            )
        self.mod_layers = layers

    @property
    def layer(self) -> int:  # orders a pipeline
        return self.acting_layers()[0]

    def acting_layers(self) -> list[int]:
        if not hasattr(self, "mod_layers"):
            raise RuntimeError("GammaMoD: the layers are set by compress (check_model) first")
        return list(self.mod_layers)

    def bind(self, shape: DecoderShape, reference: Tensor) -> None:
        if self.router is not None:
            if self.router.in_features != shape.hidden:
                raise ValueError(
                    f"GammaMoD: its router was built for hidden size {self.router.in_features}; this model has "
                    f"{shape.hidden}"
                )
            return
        self.router = nn.Linear(shape.hidden, 2, bias=False).to(
            device=reference.device, dtype=reference.dtype
        )

    # -- routing ---------------------------------------------------------------------------------------------
    def select(self, view: VisualView) -> Route:
        visual = view.is_visual
        normed = view.input_norm(view.hidden_states)
        logits = self.router(normed.to(self.router.weight.dtype)).float()  # (B, n, 2)
        probability = logits.softmax(-1)[..., 1]
        counts = view.counts()
        capacity = top_k_mask(probability.detach(), visual, counts - skipped_count(counts, self.skip))
        if self.routing == "topk" or self.training:
            routed = capacity
        else:
            routed = visual & (probability > self.threshold)
        scale = None
        if self.mlp_scale != "none":
            factor = probability if self.mlp_scale == "probability" else probability / probability.detach()
            scale = torch.where(routed, factor, torch.ones_like(factor))
        rows, slots, hidden = normed.shape
        return Route(
            routed=routed,
            mlp_scale=scale,
            info={"routed": routed.sum(1), "probability": probability.detach()},
            aux_loss=self._routing_loss(logits, capacity, visual),
            extra_flops=2 * rows * slots * hidden * 2,  # the router on every slot
        )

    def _routing_loss(self, logits: Tensor, capacity: Tensor, visual: Tensor) -> Tensor:
        """Cross-entropy of the router against top-k membership, over the visual tokens, x loss_weight."""
        if not bool(visual.any()):
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits[visual], capacity[visual].long())
        return self.loss_weight * loss


def skipped_count(visual: Tensor, skip: float) -> Tensor:
    """floor(skip x N) per sample, in float64 with a relative margin so that a ratio like 0.53 x 100 (= 52.99999...
    in binary) counts 53 skipped tokens, as the decimal reads."""
    return torch.floor(visual.double() * skip * (1 + 1e-12)).long()
