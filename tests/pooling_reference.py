"""An independent reference for pooling pyramids (StaticPyramid, DPN), written without tokencompress.

`PoolingReference(model).run(inputs, stages)` runs the *uncompressed* HF model once to get the hidden states
entering the first pooling layer, then continues by hand, one sample, one image and one cell at a time:

- the grid of every image is derived from the inputs alone (LLaVA-1.5: side x side runs of image placeholders;
  Qwen-VL: image_grid_thw / video_grid_thw after the spatial merger, one grid per video temporal patch);
- at each stage every grid is pooled with the sample's kernel (kernel = stride): cell (r, c) joins group
  (r // kh, c // kw), cells past the floored grid are dropped, grids with fewer than `min_grid_tokens` cells or
  smaller than the kernel stay as they are; the value is the max, mean or (conv) weighted sum of the members,
  times the sample's scale (DPN: the chosen expert's probability; it scales every visual token the sample
  keeps); each pooled token takes the place of its group's first member in sequence order (for a grid whose
  tokens are contiguous: the grid's tokens replaced in place, in raster order of the pooled grid; tokens between
  a grid's rows, such as LLaVA-NeXT's row newlines, stay where they are, between the pooled tokens);
- a pooled token's position id is the floor of its members' mean id (per axis for M-RoPE); text keeps its own;
- the remaining decoder layers are called directly with the model's own rotary embedding on those ids and a 4-D
  additive causal + padding mask over the new sequence; then the final norm and the LM head.

Logits are returned at the real text positions of the input (`ReferenceOutput.text`). Prompt + generated tokens
(`helpers.extend`) run the same way, so decode steps can be compared too.

The hidden states entering the first pooling layer are captured with a forward pre-hook on that layer rather
than read from `output_hidden_states`: transformers records a layer's *output* as the next hidden state, and
Qwen3-VL adds its DeepStack features after that output, so `hidden_states[k]` is not layer k's input there.
Only the HF module layout is assumed (`model.model.language_model.{layers, norm, rotary_emb}`, or
`model.get_model()` for the LLaVA codebase, and `model.lm_head`).

Other models (LLaVA-NeXT / OneVision, the LLaVA codebase's spliced sequences) pass their media layout as a
`Layout` (real positions, grid cells, grid shapes) computed by the caller; the rest of the run is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class Stage:
    """One pooling step, before decoder layer `layer` (= after_layer + 1).

    kernels: per sample (rows, cols). scales: per sample multiplier of the sample's visual tokens (None: 1).
    conv: per sample, for mode "conv", the (kh x kw, hidden) weight of each window cell (row-major), or None.
    """

    layer: int
    kernels: Sequence[tuple[int, int]]
    mode: str = "avg"
    scales: Sequence[float] | None = None
    conv: Sequence[Tensor | None] | None = None
    min_grid_tokens: int = 16


@dataclass
class Grid:
    rows: int
    cols: int


@dataclass
class Sample:
    """One sample's current sequence: per slot its input position (-1 if pooled), whether it is a real key, its
    position ids (1 or 3 axes), and its grid cell (grid, row, col) or None for text and padding."""

    origin: list[int]
    real: list[bool]
    ids: list[tuple[int, ...]]
    cell: list[tuple[int, int, int] | None]
    grids: list[Grid]
    hidden: Tensor  # (n, hidden)
    first: list[int] = field(default_factory=list)  # per slot: the input position of its first member


@dataclass
class Layout:
    """A sequence's media layout given by the caller, for models whose grids the reference does not derive from
    the input ids (LLaVA-NeXT / OneVision, the LLaVA codebase's spliced sequences).

    real: (B, L) the real (unpadded) positions of the sequence the decoder runs on. cells: per sample, {position:
    (grid, row, col)} of every visual token that is pooled; positions not in `cells` (text, structural tokens such
    as row newlines, padding) are never pooled and keep their place. grids: per sample, each grid's (rows, cols),
    grids numbered per sample."""

    real: Tensor
    cells: list[dict[int, tuple[int, int, int]]]
    grids: list[list[tuple[int, int]]]


@dataclass
class ReferenceOutput:
    """logits: (B, L, vocab), filled at the real text positions `text` (B, L) only, zeros elsewhere. Per pooling
    layer: `routing` (B, hidden) the routing token's hidden state entering it (before pooling); after its
    pooling, `visual` the visual tokens per sample, `grids` their grids' shapes, `real` (B, n) the slots that are
    real tokens (not padding, not the filler that ends shorter rows), the `position_ids` (axes, B, n) and
    rotary (cos, sin) the layers get, and `order` per sample the input position of each real token's first
    member (a token that was not pooled: its own), in sequence order."""

    logits: Tensor
    text: Tensor
    visual: dict[int, list[int]] = field(default_factory=dict)
    order: dict[int, list[list[int]]] = field(default_factory=dict)
    grids: dict[int, list[list[tuple[int, int]]]] = field(default_factory=dict)
    routing: dict[int, Tensor] = field(default_factory=dict)
    real: dict[int, Tensor] = field(default_factory=dict)
    position_ids: dict[int, Tensor] = field(default_factory=dict)
    rotary: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


class PoolingReference:
    """Pooling pyramids on an uncompressed LLaVA-1.5 or Qwen2-VL / Qwen2.5-VL / Qwen3-VL model, or on any model
    with a 1-D RoPE LLaMA-style decoder given a `Layout` (LLaVA-NeXT / OneVision, the LLaVA codebase)."""

    def __init__(self, model: nn.Module, positions: str = "floor_mean") -> None:
        """positions: "floor_mean" (the rule under test) or "first" (a pooled token takes its first member's
        ids; only to show that the comparison notices positions)."""
        if positions not in ("floor_mean", "first"):
            raise ValueError(f"positions is 'floor_mean' or 'first', got {positions!r}")
        self.model = model
        self.positions = positions
        self.family = model.config.model_type
        inner = getattr(model, "model", None)
        self.text_model = inner.language_model if hasattr(inner, "language_model") else model.get_model()

    # -- inputs ---------------------------------------------------------------------------------------------
    def visual_ids(self) -> list[int]:
        config = self.model.config
        if self.family == "llava":
            return [config.image_token_id]
        return [config.image_token_id, config.video_token_id]

    def grid_cells(
        self, inputs: dict[str, Tensor]
    ) -> tuple[list[dict[int, tuple[int, int, int]]], list[list[Grid]]]:
        """Per sample, {input position: (grid, row, col)} and the grids' shapes, grids numbered per sample in
        sequence order. Each kind of placeholder is filled in row-major order over the whole batch."""
        if self.family != "llava" and self.family not in QWEN_FAMILIES:
            raise ValueError(
                f"the pooling reference lays out llava and {QWEN_FAMILIES} grids, not {self.family}: "
                "pass a Layout"
            )
        ids = inputs["input_ids"]
        config = self.model.config
        media: list[tuple[int, list[tuple[int, int, int]]]] = []  # (placeholder id, [(frames, rows, cols)])
        if self.family == "llava":
            vision = config.vision_config
            if config.vision_feature_select_strategy != "default":
                raise ValueError("the reference lays out 'default' (no CLS) LLaVA grids only")
            side = vision.image_size // vision.patch_size
            images = int((ids == config.image_token_id).sum()) // (side * side)
            media.append((config.image_token_id, [(1, side, side)] * images))
        else:
            merge = config.vision_config.spatial_merge_size
            for token, key in (
                (config.image_token_id, "image_grid_thw"),
                (config.video_token_id, "video_grid_thw"),
            ):
                grids = inputs.get(key)
                shapes = [] if grids is None else [(t, h // merge, w // merge) for t, h, w in grids.tolist()]
                media.append((token, shapes))
        batch = ids.shape[0]
        cells: list[dict[int, tuple[tuple[int, ...], int, int]]] = [{} for _ in range(batch)]
        shapes: list[dict[tuple[int, ...], Grid]] = [{} for _ in range(batch)]
        for kind, (token, sizes) in enumerate(media):
            places = (ids == token).nonzero().tolist()  # row-major over the batch
            expected = sum(t * r * c for t, r, c in sizes)
            if len(places) != expected:
                raise AssertionError(f"{len(places)} placeholders of id {token} for {expected} visual tokens")
            at = 0
            for number, (frames, rows, cols) in enumerate(sizes):
                for frame in range(frames):
                    for k in range(rows * cols):
                        b, position = places[at]
                        shapes[b][(kind, number, frame)] = Grid(rows, cols)
                        cells[b][position] = ((kind, number, frame), k // cols, k % cols)
                        at += 1
        out_cells, out_shapes = [], []
        for b in range(batch):
            first: dict[tuple[int, ...], int] = {}
            for position, (key, _, _) in sorted(cells[b].items()):
                first.setdefault(key, position)
            order = sorted(first, key=first.__getitem__)
            number = {key: n for n, key in enumerate(order)}
            out_cells.append({p: (number[key], r, c) for p, (key, r, c) in cells[b].items()})
            out_shapes.append([shapes[b][key] for key in order])
        return out_cells, out_shapes

    # -- the run --------------------------------------------------------------------------------------------
    def run(
        self,
        inputs: dict[str, Tensor],
        stages: Sequence[Stage],
        routing: Sequence[int] | None = None,
        layout: Layout | None = None,
    ) -> ReferenceOutput:
        """Logits of the pooled model on `inputs` (passed to the model as they are); `routing`: per sample the
        input position whose hidden state `ReferenceOutput.routing` reports at each stage (default: the last real
        token); `layout`: the media layout of the sequence the decoder runs on (default: derived from `inputs`)."""
        stages = sorted(stages, key=lambda s: s.layer)
        first = stages[0].layer
        captured: dict[str, object] = {}

        def on_text(module, args, kwargs):
            captured["position_ids"] = kwargs.get("position_ids")

        def on_layer(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]

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
        hidden: Tensor = captured["hidden"]  # (B, L, hidden)
        batch, length = hidden.shape[:2]
        ids = self._position_ids(captured["position_ids"], batch, length, hidden.device)  # (axes, B, L)
        if layout is None:
            pad = inputs.get("attention_mask")
            real = torch.ones(batch, length, dtype=torch.bool) if pad is None else pad.bool().cpu()
            cells, grids = self.grid_cells(inputs)
            visual = torch.isin(inputs["input_ids"], torch.tensor(self.visual_ids())).cpu() & real
        else:
            real = layout.real.bool().cpu()
            if real.shape != (batch, length):
                raise AssertionError(
                    f"a layout of shape {tuple(real.shape)} for a sequence of {(batch, length)}"
                )
            cells = layout.cells
            grids = [[Grid(rows, cols) for rows, cols in shapes] for shapes in layout.grids]
            visual = torch.zeros(batch, length, dtype=torch.bool)
            for b, sample_cells in enumerate(cells):
                visual[b, list(sample_cells)] = True
            if bool((visual & ~real).any()):
                raise AssertionError("the layout puts grid cells at padding positions")
        text = real & ~visual
        if routing is None:
            routing = [int(torch.nonzero(real[b]).max()) for b in range(batch)]

        samples = [
            Sample(
                origin=list(range(length)),
                real=real[b].tolist(),
                ids=[tuple(ids[:, b, p].tolist()) for p in range(length)],
                cell=[cells[b].get(p) if bool(visual[b, p]) else None for p in range(length)],
                grids=grids[b],
                hidden=hidden[b],
                first=list(range(length)),
            )
            for b in range(batch)
        ]
        out = ReferenceOutput(
            logits=torch.zeros(batch, length, self.model.lm_head.out_features, dtype=hidden.dtype),
            text=text,
        )
        layers = self.text_model.layers
        by_layer = {stage.layer: stage for stage in stages}
        with torch.no_grad():
            states = None
            for index in range(first, len(layers)):
                if index in by_layer:
                    if states is not None:
                        for b, sample in enumerate(samples):
                            sample.hidden = states[b, : len(sample.origin)]
                    out.routing[index] = torch.stack(
                        [s.hidden[s.origin.index(routing[b])] for b, s in enumerate(samples)]
                    )
                    stage = by_layer[index]
                    samples = [self._pool(b, s, stage) for b, s in enumerate(samples)]
                    out.visual[index] = [sum(c is not None for c in s.cell) for s in samples]
                    out.order[index] = [
                        [first for first, real in zip(s.first, s.real, strict=True) if real] for s in samples
                    ]
                    out.grids[index] = [[(g.rows, g.cols) for g in s.grids] for s in samples]
                    states, mask, position_ids, out.real[index] = self._batch(
                        samples, hidden.dtype, hidden.device
                    )
                    rotary = self.text_model.rotary_emb(
                        states, position_ids if self._qwen else position_ids[0]
                    )
                    layer_ids = None if self._qwen else position_ids[0]
                    out.position_ids[index], out.rotary[index] = position_ids, rotary
                states = layers[index](
                    states, attention_mask=mask, position_ids=layer_ids, position_embeddings=rotary
                )
            logits = self.model.lm_head(self.text_model.norm(states))
        for b, sample in enumerate(samples):
            for slot, origin in enumerate(sample.origin):
                if origin >= 0 and bool(text[b, origin]):
                    out.logits[b, origin] = logits[b, slot]
        return out

    @property
    def _qwen(self) -> bool:
        return self.family in QWEN_FAMILIES

    def _position_ids(self, given: Tensor | None, batch: int, length: int, device) -> Tensor:
        """(axes, B, L): (1, B, L) for 1-D RoPE, (3, B, L) t/h/w for M-RoPE."""
        if not self._qwen:
            if given is None:  # the text model then uses 0..L-1, padding included
                return torch.arange(length, device=device).expand(1, batch, length)
            return given.expand(batch, length)[None]
        if given is None or given.dim() != 3:
            raise AssertionError("Qwen-VL computes 3-D M-RoPE ids itself; expected (3 or 4, B, L)")
        return given[-3:].expand(3, batch, length)

    def _pool(self, b: int, sample: Sample, stage: Stage) -> Sample:
        kh, kw = stage.kernels[b]
        scale = 1.0 if stage.scales is None else float(stage.scales[b])
        weights = None if stage.conv is None else stage.conv[b]
        slots_of: dict[int, dict[tuple[int, int], int]] = {}
        for slot, cell in enumerate(sample.cell):
            if cell is not None:
                slots_of.setdefault(cell[0], {})[(cell[1], cell[2])] = slot
        new_grids: list[Grid] = []
        # the slot of each group's first member -> (value, position ids, cell, first input position)
        pooled: dict[int, tuple[Tensor, tuple[int, ...], tuple[int, int, int], int]] = {}
        for g, grid in enumerate(sample.grids):
            members = slots_of.get(g, {})
            if len(members) != grid.rows * grid.cols:
                raise AssertionError(
                    f"grid {g} of sample {b} has {len(members)} of {grid.rows}x{grid.cols} cells"
                )
            kr, kc = kh, kw
            if grid.rows * grid.cols < stage.min_grid_tokens or grid.rows < kh or grid.cols < kw:
                kr, kc = 1, 1
            rows, cols = grid.rows // kr, grid.cols // kc
            new_grids.append(Grid(rows, cols))
            for r in range(rows):
                for c in range(cols):
                    group = [members[(r * kr + i, c * kc + j)] for i in range(kr) for j in range(kc)]
                    states = sample.hidden[group]  # (kr x kc, hidden), row-major in the window
                    if kr * kc == 1:
                        value = states[0]
                    elif stage.mode == "max":
                        value = states.max(0).values
                    elif stage.mode == "avg":
                        value = states.mean(0)
                    elif stage.mode == "conv":
                        value = (states * weights[: kr * kc]).sum(0)
                    else:
                        raise ValueError(f"unknown pooling mode {stage.mode!r}")
                    axes = list(zip(*(sample.ids[s] for s in group), strict=True))
                    if self.positions == "first":
                        position = tuple(axis[0] for axis in axes)
                    else:
                        position = tuple(sum(axis) // len(group) for axis in axes)
                    at = min(group)  # the first member in sequence order
                    pooled[at] = (value * scale, position, (g, r, c), sample.first[at])
        origin, real, ids, cell, rows_out, first = [], [], [], [], [], []
        for slot, grid_cell in enumerate(sample.cell):
            if grid_cell is None:
                origin.append(sample.origin[slot])
                real.append(sample.real[slot])
                ids.append(sample.ids[slot])
                cell.append(None)
                rows_out.append(sample.hidden[slot])
                first.append(sample.first[slot])
            elif slot in pooled:  # other members (and cells past the floored grid) leave the sequence
                value, position, where, first_position = pooled[slot]
                origin.append(-1)
                real.append(True)
                ids.append(position)
                cell.append(where)
                rows_out.append(value)
                first.append(first_position)
        hidden = torch.stack(rows_out) if rows_out else sample.hidden[:0]
        return Sample(origin, real, ids, cell, new_grids, hidden, first)

    def _batch(
        self, samples: list[Sample], dtype: torch.dtype, device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Right-filled (B, n, hidden) states, the (B, 1, n, n) additive causal + padding mask (each query sees
        itself, so no row is empty), the (axes, B, n) position ids and the (B, n) real keys; filler slots are
        masked keys at id 0."""
        width = max(len(s.origin) for s in samples)
        axes = len(samples[0].ids[0])
        size = samples[0].hidden.shape[-1]
        states = torch.zeros(len(samples), width, size, dtype=dtype, device=device)
        keys = torch.zeros(len(samples), width, dtype=torch.bool, device=device)
        position_ids = torch.zeros(axes, len(samples), width, dtype=torch.long, device=device)
        for b, sample in enumerate(samples):
            n = len(sample.origin)
            states[b, :n] = sample.hidden
            keys[b, :n] = torch.tensor(sample.real, dtype=torch.bool)
            position_ids[:, b, :n] = torch.tensor(sample.ids, dtype=torch.long).T
        index = torch.arange(width, device=device)
        allowed = (index[None, :] <= index[:, None])[None] & keys[:, None, :]
        allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
        return states, mask[:, None], position_ids, keys
