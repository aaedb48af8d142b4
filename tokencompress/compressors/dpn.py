"""DPN: a pyramid of Dynamic Pooling Experts, each stage's pooling rate chosen per sample by a router.

Ai et al., "Dynamic Pyramid Network for Efficient Multimodal Large Language Model", 2025.
https://arxiv.org/abs/2503.20322 (code: https://github.com/aihao2000/DPN-LLaVA)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..accounting import DecoderShape
from ..pooling import POOLING_MODES, grid_groups, pool
from ..view import Merge, VisualView
from .base import register
from .pyramid import PyramidCompressor, merge_of, normalize_after_layers, normalize_kernel


class Router(nn.Module):
    """LayerNorm(h) -> Linear(h, h/4, no bias) -> GELU -> Linear(h/4, E, no bias): logits over the experts."""

    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, hidden // 4, bias=False)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden // 4, experts, bias=False)

    def forward(self, states: Tensor) -> Tensor:
        return self.up(self.act(self.down(self.norm(states))))


@register("dpn")
class DPN(PyramidCompressor, nn.Module):
    """Dynamic Pyramid Network: after each DPE layer, every sample's visual tokens are pooled by the expert its
    router picks, and the pooled tokens are scaled by that expert's probability (the router's gradient path).

    after_layers: the DPE layers (None: after 1/4, 2/4, 3/4 of the depth, the authors' 7, 15, 23 of 32).
    experts: (rows, cols) pooling kernels, kernel = stride; (1, 1) is the identity. pooling: "max" (authors'
    default), "avg", or "conv" (a learnable depthwise kernel per expert, initialised to averaging).
    temperature: probabilities are softmax(logits / temperature). routing_token_id: the token whose hidden state
    (at the DPE layer's output) the router reads, e.g. an added `<ROUTER>` token; None reads the last prompt
    token. min_tokens: in training an expert that would leave a sample fewer visual tokens is not sampled.
    min_grid_tokens: grids with fewer cells are not pooled. Routing loss = loss_weight x max(0, loss_target -
    mean over samples of scale[e] x p[e]) per stage, e the argmax expert, summed over stages; expert_scales
    default to 0, 1, 2, ... in expert order.
    """

    def __init__(
        self,
        after_layers: Sequence[int] | None = None,
        experts: Sequence[Sequence[int]] = ((1, 1), (1, 2), (2, 2)),
        pooling: str = "max",
        temperature: float = 10.0,
        routing_token_id: int | None = None,
        min_tokens: int = 18,
        min_grid_tokens: int = 16,
        loss_weight: float = 1e-3,
        loss_target: float = 1.5,
        expert_scales: Sequence[float] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.after_layers = normalize_after_layers("DPN", after_layers)
        if not isinstance(experts, (list, tuple)) or not experts:
            raise ValueError(f"DPN: experts is a non-empty list of (rows, cols) kernels, got {experts!r}")
        self.experts = tuple(normalize_kernel("DPN", e) for e in experts)
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"DPN: experts {list(self.experts)} repeat a kernel")
        if pooling not in POOLING_MODES:
            raise ValueError(f"DPN: pooling={pooling!r} is not one of {POOLING_MODES}")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"DPN: temperature must be > 0, got {temperature!r}")
        if routing_token_id is not None and (
            isinstance(routing_token_id, bool) or not isinstance(routing_token_id, int)
        ):
            raise TypeError(
                f"DPN: routing_token_id must be a token id (int) or None, got {routing_token_id!r}"
            )
        for name, value in (("min_tokens", min_tokens), ("min_grid_tokens", min_grid_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DPN: {name} must be an int >= 0, got {value!r}")
        scales = tuple(float(s) for s in expert_scales) if expert_scales is not None else None
        if scales is not None and len(scales) != len(self.experts):
            raise ValueError(f"DPN: {len(scales)} expert_scales for {len(self.experts)} experts")
        self.pooling, self.temperature, self.routing_token_id = pooling, float(temperature), routing_token_id
        self.min_tokens, self.min_grid_tokens = min_tokens, min_grid_tokens
        self.loss_weight, self.loss_target = float(loss_weight), float(loss_target)
        self.expert_scales = scales
        self.routers = nn.ModuleList()
        self.conv_weights = nn.ParameterList()  # conv pooling: (E, max kernel cells, hidden) per stage

    # -- configuration ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "after_layers": None if self.after_layers is None else list(self.after_layers),
            "experts": [list(e) for e in self.experts],
            "pooling": self.pooling,
            "temperature": self.temperature,
            "routing_token_id": self.routing_token_id,
            "min_tokens": self.min_tokens,
            "min_grid_tokens": self.min_grid_tokens,
            "loss_weight": self.loss_weight,
            "loss_target": self.loss_target,
            "expert_scales": None if self.expert_scales is None else list(self.expert_scales),
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")

    def routing_token(self) -> int | None:
        return self.routing_token_id

    def scales(self) -> Tensor:
        values = self.expert_scales if self.expert_scales is not None else range(len(self.experts))
        return torch.tensor([float(v) for v in values])

    def bind(self, shape: DecoderShape, reference: Tensor) -> None:
        """One router (and, for conv pooling, one kernel per expert) per stage, sized to the model."""
        stages = len(self.after)
        if len(self.routers):
            hidden = self.routers[0].norm.normalized_shape[0]
            if hidden != shape.hidden or len(self.routers) != stages:
                raise ValueError(
                    f"DPN: its routers were built for hidden size {hidden} and {len(self.routers)} stages; this "
                    f"model has hidden size {shape.hidden} and gets {stages} stages"
                )
            return
        factory = {"device": reference.device, "dtype": reference.dtype}
        self.routers.extend(Router(shape.hidden, len(self.experts)).to(**factory) for _ in range(stages))
        if self.pooling == "conv":
            cells = max(kh * kw for kh, kw in self.experts)
            average = torch.zeros(len(self.experts), cells, shape.hidden, **factory)
            for e, (kh, kw) in enumerate(self.experts):
                average[e, : kh * kw] = 1.0 / (kh * kw)
            self.conv_weights.extend(nn.Parameter(average.clone()) for _ in range(stages))

    # -- routing and pooling ---------------------------------------------------------------------------------
    def select(self, view: VisualView) -> Merge:
        stage = self.stage(view)
        batch = view.is_visual.shape[0]
        router = self.routers[stage]
        logits = router(view.routing_states().to(router.norm.weight.dtype)).float()
        probs = torch.softmax(logits / self.temperature, dim=-1)
        choice = self._choose(view, probs)
        groups = grid_groups(view, [self.experts[e] for e in choice.tolist()], self.min_grid_tokens)
        weights = None
        if self.pooling == "conv":
            weights = self.conv_weights[stage][choice[:, None], groups.cell]
        chosen = probs.gather(1, choice[:, None])[:, 0]
        values = pool(view.hidden_states, groups, self.pooling, weights) * chosen[:, None, None].to(
            view.hidden_states.dtype
        )
        inner = router.down.out_features
        return merge_of(
            groups,
            values,
            info={"expert": choice, "probability": chosen},
            aux_loss=self._routing_loss(view, probs),
            extra_flops=2 * batch * inner * (view.hidden_states.shape[-1] + len(self.experts)),
        )

    def _choose(self, view: VisualView, probs: Tensor) -> Tensor:
        """Argmax at inference; in training a sample, never an expert that leaves fewer than `min_tokens`
        visual tokens (the authors resample until it does not: the same distribution, renormalised)."""
        if not self.training:
            return probs.argmax(1)
        batch = probs.shape[0]
        left = torch.stack(
            [grid_groups(view, [kernel] * batch, self.min_grid_tokens).counts for kernel in self.experts],
            dim=1,
        )
        allowed = left >= self.min_tokens
        allowed |= left == left.max(1, keepdim=True).values  # none allowed: the gentlest expert
        return torch.multinomial(probs.detach() * allowed, 1)[:, 0]

    def _routing_loss(self, view: VisualView, probs: Tensor) -> Tensor:
        with_images = view.counts() > 0
        if not bool(with_images.any()):
            return probs.sum() * 0.0
        top = probs.argmax(1)
        scale = self.scales().to(probs.device)[top]
        compression = (scale * probs.gather(1, top[:, None])[:, 0])[with_images].mean()
        return self.loss_weight * torch.relu(self.loss_target - compression)
