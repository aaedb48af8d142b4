"""An independent reference for gamma-MoD (mixture-of-depths layers), written without tokencompress.

`ModReference(model).run(inputs, visual, layers, router_weight, ...)` runs the *uncompressed* HF model once to
capture the hidden states entering the first MoD layer (a forward pre-hook on that layer), the rotary (cos, sin)
that layer receives for the whole sequence (the model's own positions: 1-D, or Qwen's M-RoPE ids) and the 2-D
padding mask at the text model's entry. From there it runs every remaining decoder layer by hand:

- a dense layer: the whole layer on the full sequence with a 4-D additive causal + padding mask built here;
- a MoD layer: p = softmax(input_layernorm(x) @ W_router^T)[..., 1] at every slot; per sample the routed visual
  tokens are the N - floor(skip x N) with the highest p (ties to the earlier position; skip read as the decimal
  written), or, for threshold routing, those with p > threshold; the real text tokens and the routed visual
  tokens are gathered in their original order, with the cos / sin of their ORIGINAL positions, and run through
  input_layernorm -> self_attn (own 4-D mask: causal among the gathered tokens only, padding filler masked) ->
  residual -> post_attention_layernorm -> mlp (x p at the routed visual tokens, "probability"; x 1 otherwise) ->
  residual, then scattered back; every other slot (skipped visual tokens, padding) leaves the layer unchanged.

Then the final norm and the LM head on the full sequence. The routing loss is computed by hand: per MoD layer the
mean over the batch's visual tokens of -log softmax(router logits)[target], target 1 at the top-k set, times
loss_weight, summed over the MoD layers. Only the HF module layout is assumed: the text model at
`model.model.language_model` (transformers' LLaVA / NeXT / Qwen-VL) or `model.get_model()` (the LLaVA codebase),
decoder layers with input_layernorm / self_attn / post_attention_layernorm / mlp, `norm`, and `model.lm_head`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor, nn


def skipped(count: int, skip: float) -> int:
    """floor(skip x N), skip read as the decimal the user wrote."""
    return math.floor(Fraction(str(skip)) * count)


def routed_count(count: int, skip: float) -> int:
    return count - skipped(count, skip)


def text_model_of(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner.language_model
    return model.get_model()


@dataclass
class ModOutput:
    """logits (B, L, V) over the whole sequence (compare at real positions). Per MoD layer: `routed` per sample
    the routed visual positions, `ran` every position that ran the layer, `probability` (B, L) p at every slot,
    `router_logits` (B, L, 2), `capacity` (B, L) the top-k set (the loss's target). `loss`: the routing loss."""

    logits: Tensor
    routed: dict[int, list[list[int]]] = field(default_factory=dict)
    ran: dict[int, list[list[int]]] = field(default_factory=dict)
    probability: dict[int, Tensor] = field(default_factory=dict)
    router_logits: dict[int, Tensor] = field(default_factory=dict)
    capacity: dict[int, Tensor] = field(default_factory=dict)
    loss: Tensor | None = None
    rotary: tuple[Tensor, Tensor] | None = None  # the full sequence's (cos, sin), as captured


def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, q, k) bool -> (B, 1, q, k) additive mask."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def top_by_hand(probability: list[float], positions: list[int], count: int) -> list[int]:
    """The `count` positions with the highest probability, ties to the earlier position; sorted."""
    order = sorted(range(len(positions)), key=lambda i: (-probability[i], positions[i]))
    return sorted(positions[i] for i in order[:count])


class ModReference:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.text_model = text_model_of(model)

    def capture(self, inputs: dict[str, Tensor], first: int) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        captured: dict[str, object] = {}

        def on_text(module, args, kwargs):
            captured["mask"] = kwargs.get("attention_mask")

        def on_layer(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["rotary"] = kwargs["position_embeddings"]

        handles = [
            self.text_model.register_forward_pre_hook(on_text, with_kwargs=True),
            self.text_model.layers[first].register_forward_pre_hook(on_layer, with_kwargs=True),
        ]
        try:
            with torch.no_grad():
                self.model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        hidden = captured["hidden"]
        mask = captured["mask"]
        if mask is None:
            real = torch.ones(hidden.shape[:2], dtype=torch.bool)
        else:
            if mask.dim() != 2:
                raise AssertionError(f"expected the 2-D padding mask at the text model, got {mask.dim()}-D")
            real = mask.bool()[:, -hidden.shape[1] :]
        return hidden, captured["rotary"], real

    def run(
        self,
        inputs: dict[str, Tensor],
        visual: Tensor,
        layers: Sequence[int],
        router_weight: Tensor,
        skip: float = 0.34,
        routing: str = "topk",
        threshold: float = 0.005,
        mlp_scale: str = "probability",
        loss_weight: float = 0.01,
        real: Tensor | None = None,
        grad: bool = False,
    ) -> ModOutput:
        """visual: (B, L) bool, the routable (real, content) visual tokens of the sequence the decoder runs on.
        real: (B, L) bool, the real positions (default: the text model's 2-D mask). grad: keep the autograd graph
        (pass a leaf `router_weight` to read its gradient)."""
        layers = sorted(layers)
        first = layers[0]
        hidden, (cos, sin), captured_real = self.capture(inputs, first)
        real = captured_real if real is None else real.bool()
        batch, length = hidden.shape[:2]
        if visual.shape != (batch, length) or real.shape != (batch, length):
            raise AssertionError(f"masks {tuple(visual.shape)} / {tuple(real.shape)} for {(batch, length)}")
        visual = visual.bool() & real
        text = real & ~visual
        out = ModOutput(logits=torch.empty(0), rotary=(cos, sin))
        losses = []
        x = hidden
        decoder = self.text_model.layers
        index = torch.arange(length)
        dtype = hidden.dtype
        with torch.set_grad_enabled(grad):
            for layer_index in range(first, len(decoder)):
                layer = decoder[layer_index]
                if layer_index not in layers:
                    allowed = (index[None, :] <= index[:, None])[None] & real[:, None, :]
                    allowed = allowed | torch.eye(length, dtype=torch.bool)[None]
                    result = layer(x, attention_mask=additive(allowed, dtype), position_embeddings=(cos, sin))
                    x = result[0] if isinstance(result, tuple) else result
                    continue
                logits = layer.input_layernorm(x) @ router_weight.T  # (B, L, 2)
                probability = torch.softmax(logits.float(), dim=-1)[..., 1]
                capacity = torch.zeros(batch, length, dtype=torch.bool)
                routed_mask = torch.zeros(batch, length, dtype=torch.bool)
                routed, ran = [], []
                for b in range(batch):
                    positions = torch.nonzero(visual[b]).flatten().tolist()
                    p = probability[b, positions].tolist()
                    top = top_by_hand(p, positions, routed_count(len(positions), skip))
                    capacity[b, top] = True
                    if routing == "threshold" and not self.model.training:
                        chosen = [q for q, v in zip(positions, p, strict=True) if v > threshold]
                    else:
                        chosen = top
                    routed_mask[b, chosen] = True
                    routed.append(chosen)
                    ran.append(sorted(torch.nonzero(text[b]).flatten().tolist() + chosen))
                out.routed[layer_index], out.ran[layer_index] = routed, ran
                out.probability[layer_index] = probability.detach()
                out.router_logits[layer_index] = logits.detach()
                out.capacity[layer_index] = capacity
                if bool(visual.any()):
                    log_p = torch.log_softmax(logits.float(), dim=-1)
                    picked = torch.where(capacity, log_p[..., 1], log_p[..., 0])
                    losses.append(loss_weight * -(picked[visual].sum() / visual.sum()))
                # gather the tokens that run, in order, right-filled
                width = max(len(r) for r in ran)
                columns = torch.zeros(batch, width, dtype=torch.long)
                keys = torch.zeros(batch, width, dtype=torch.bool)
                for b, positions in enumerate(ran):
                    columns[b, : len(positions)] = torch.tensor(positions, dtype=torch.long)
                    keys[b, : len(positions)] = True
                rows = torch.arange(batch)[:, None]
                gathered = x[rows, columns]
                cos_g = cos.expand(batch, -1, -1)[rows, columns]
                sin_g = sin.expand(batch, -1, -1)[rows, columns]
                slot = torch.arange(width)
                allowed = (slot[None, :] <= slot[:, None])[None] & keys[:, None, :]
                allowed = allowed | torch.eye(width, dtype=torch.bool)[None]
                attention = layer.self_attn(
                    hidden_states=layer.input_layernorm(gathered),
                    attention_mask=additive(allowed, dtype),
                    position_embeddings=(cos_g, sin_g),
                )[0]
                after_attention = gathered + attention
                mlp = layer.mlp(layer.post_attention_layernorm(after_attention))
                scaled = routed_mask[rows, columns] & keys
                p_g = probability[rows, columns]
                if mlp_scale == "probability":
                    mlp = mlp * torch.where(scaled, p_g, torch.ones_like(p_g)).to(dtype)[..., None]
                elif mlp_scale == "straight_through":
                    mlp = (
                        mlp
                        * torch.where(scaled, p_g / p_g.detach(), torch.ones_like(p_g)).to(dtype)[..., None]
                    )
                elif mlp_scale != "none":
                    raise ValueError(mlp_scale)
                result = after_attention + mlp
                x = x.index_put((rows.expand_as(columns)[keys], columns[keys]), result[keys])
            out.logits = self.model.lm_head(self.text_model.norm(x))
        out.loss = sum(losses) if losses else None
        return out
