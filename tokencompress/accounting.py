"""Analytic FLOPs and KV-cache bytes from what actually ran, and the per-forward statistics users read.

FLOPs count matrix multiplications only (2 x multiply-adds), as torch.utils.flop_counter does: projections,
MLP, attention scores and values over the full query x key rectangle (no causal discount), the LM head, and
the engine's own score recomputation. Norms, softmax and elementwise ops are left out on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    mlp_matrices: int = 3  # gate, up, down (LLaMA-style gated MLP)

    def layer_flops(self, batch: int, queries: int, keys: int) -> int:
        """One decoder layer run on `queries` slots per row against `keys` keys per row."""
        h, attn_width, kv_width = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        linear = (
            2
            * batch
            * queries
            * (2 * h * attn_width + 2 * h * kv_width + self.mlp_matrices * h * self.intermediate)
        )
        attention = 4 * batch * self.heads * queries * keys * self.head_dim
        return linear + attention

    def lm_head_flops(self, rows: int) -> int:
        return 2 * rows * self.hidden * self.vocab

    def kv_bytes(self, batch: int, entries: int, element_size: int) -> int:
        return 2 * batch * entries * self.kv_heads * self.head_dim * element_size


@dataclass
class LayerStats:
    """One decoder layer in one forward. positions: (B, slots) input position of each token the layer
    processed, -1 for fillers and padding; visual_mask marks the visual ones. Counts are read lazily so the
    decoder loop never synchronises with the device."""

    layer: int
    positions: Tensor
    visual_mask: Tensor
    slots: int
    keys: int
    flops: int

    @property
    def tokens(self) -> list[int]:
        """Real, unpadded tokens per sample."""
        return (self.positions >= 0).sum(1).tolist()

    @property
    def visual(self) -> list[int]:
        """Visual tokens per sample."""
        return self.visual_mask.sum(1).tolist()

    def kept_positions(self, sample: int) -> list[int]:
        """Input positions of the tokens this layer processed for one sample, in order."""
        row = self.positions[sample]
        return row[row >= 0].tolist()


@dataclass
class ForwardStats:
    """One forward: "prefill" (visual tokens, or several new tokens on an empty cache), "extend" (several text
    tokens appended to a cache: a continuation scored on a prompt's cache, a text-only next turn; it leaves
    `Stats.prefill` alone), or "decode" (one new token)."""

    kind: str
    batch: int
    length: int
    past: int
    layers: list[LayerStats] = field(default_factory=list)
    scoring_flops: int = 0
    extra_flops: int = 0  # compressors' own matrix work (routers)
    lm_head_flops: int = 0
    baseline_lm_head_flops: int = 0
    baseline_layer_flops: int = 0
    decisions: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # per acting layer, e.g. experts
    routing_loss: Tensor | None = None
    encoder_flops: int = (
        0  # the vision encoder's layers, when the adapter exposes it and it ran for this input
    )
    baseline_encoder_flops: int = 0
    stage_tokens: dict[str, Tensor] = field(default_factory=dict)  # (B,) visual tokens after each stage

    @property
    def total_flops(self) -> int:
        """Decoder, LM head and the vision encoder's layers."""
        return self.flops + self.encoder_flops

    @property
    def baseline_total_flops(self) -> int:
        return self.baseline_flops + self.baseline_encoder_flops

    def tokens_per_stage(self) -> dict[str, list[int]]:
        """Visual tokens per sample: "input" (the prompt's), "vision encoder" (after its window merge, where it
        ran), and "layer k" (entering decoder layer k, after a compressor acted there)."""
        return {stage: counts.tolist() for stage, counts in self.stage_tokens.items()}

    @property
    def flops(self) -> int:
        return (
            sum(layer.flops for layer in self.layers)
            + self.scoring_flops
            + self.extra_flops
            + self.lm_head_flops
        )

    @property
    def baseline_flops(self) -> int:
        """What the uncompressed model would have spent on the same input and cache."""
        return self.baseline_layer_flops + self.baseline_lm_head_flops

    def kept_tokens(self) -> list[list[int]]:
        """tokens[layer][sample]."""
        return [layer.tokens for layer in self.layers]

    def average_visual_tokens(self, convention: str = "processed") -> list[float]:
        """Per sample: visual tokens per decoder layer, averaged over the layers.

        The "N tokens" budgets of token-dropping papers are such averages, but papers differ in what they count.
        "processed": the tokens each layer actually ran on (a layer after which a stage acts counts the tokens it
        received). "passed_on": the tokens each layer hands to the next (the last layer: what it ran on), i.e. a
        layer after which a stage acts counts the stage's output; this is MustDrop's reported figure, e.g.
        (2 M + 4 M1 + 4 M2 + 4 M3 + 18 M4) / 32 for stages after layers 2, 6, 10, 14 of 32.
        """
        if convention not in ("processed", "passed_on"):
            raise ValueError(f"convention must be 'processed' or 'passed_on', got {convention!r}")
        if not self.layers:
            return []
        per_layer = [layer.visual for layer in self.layers]
        if convention == "passed_on":
            per_layer = per_layer[1:] + per_layer[-1:]
        return [sum(column) / len(per_layer) for column in zip(*per_layer, strict=True)]


@dataclass
class Stats:
    """What the last forward (and the last prefill) did; `tc.stats(model)` returns it."""

    prefill: ForwardStats | None
    last: ForwardStats | None
    kv_cache_bytes: int
    kv_cache_bytes_uncompressed: int
    kv_cache_entries: list[int]
    routing_loss: Tensor | None = None

    @property
    def flops_saved(self) -> float:
        """Fraction of prefill FLOPs saved versus the uncompressed model on the same input."""
        if self.prefill is None or not self.prefill.baseline_flops:
            return 0.0
        return 1.0 - self.prefill.flops / self.prefill.baseline_flops

    def __str__(self) -> str:
        if self.prefill is None:
            return "tokencompress stats: no forward has run yet"
        p = self.prefill
        lines = [
            f"prefill: batch {p.batch}, {p.length} tokens, {p.flops / 1e9:.3f} GFLOPs "
            f"vs {p.baseline_flops / 1e9:.3f} uncompressed ({self.flops_saved:.1%} saved)",
            "layer  tokens per sample (visual)",
        ]
        for layer in p.layers:
            per_sample = ", ".join(f"{t} ({v})" for t, v in zip(layer.tokens, layer.visual, strict=True))
            lines.append(f"{layer.layer:>5}  {per_sample}")
        for stage, counts in p.tokens_per_stage().items():
            lines.append(f"visual tokens, {stage}: {counts}")
        if p.baseline_encoder_flops:
            lines.append(
                f"vision encoder: {p.encoder_flops / 1e9:.3f} GFLOPs vs {p.baseline_encoder_flops / 1e9:.3f} "
                "uncompressed"
            )
        if self.last is not None and self.last is not p:
            lines.append(
                f"last decode step: {self.last.flops / 1e6:.2f} MFLOPs vs "
                f"{self.last.baseline_flops / 1e6:.2f} uncompressed"
            )
        lines.append(
            f"KV cache: {self.kv_cache_bytes / 2**20:.2f} MiB vs {self.kv_cache_bytes_uncompressed / 2**20:.2f} MiB "
            f"uncompressed"
        )
        return "\n".join(lines)
