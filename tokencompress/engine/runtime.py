"""The engine: runs a pipeline of compressors inside a decoder through forward hooks only.

Per forward it tracks which input tokens the hidden states hold (`Slots`), shrinks them where a compressor acts,
gathers the rotary cos/sin of the survivors (their original positions), builds each layer's attention mask from
logical positions and that layer's own cache record (`CacheBook`), and restores full length before the final
norm so logits, labels and `generate` line up with the input as given.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..accounting import ForwardStats, LayerStats, Stats
from ..compressors.base import Compressor
from ..ops import compact_columns, gather_rows
from ..view import EncoderCopies, Merge, Route, VisualTokens, VisualView
from .encoder import EncoderHooks, EncoderRecord
from .masks import allowed_keys, to_implementation
from .merging import apply_merge
from .scoring import attention_received, attention_rows, query_rows, scoring_flops
from .slots import CacheBook, KeyRecord, Slots

SUPPORTED_ATTENTION = ("eager", "sdpa")
MODULES_NAME = "tokencompress_modules"  # where trainable compressors sit in a compressed model
IGNORE_INDEX = -100
OWNER = "_tokencompress_owner"  # set on a compressor while it serves a model: one model at a time
MLP_SCALE = "_tokencompress_mlp_scale"  # set on a routed layer's input: its MLP output factors (B, n')


@dataclass(eq=False)
class RoutedLayer:
    """One layer running on a subset of the slots (a Route): what to put back after it."""

    layer: int
    slots: Slots  # all slots, as before the layer
    hidden: Tensor  # all hidden states entering the layer (the skipped ones leave it as they are)
    columns: Tensor  # (B, n') the running slots' columns in `slots`
    real: Tensor  # (B, n') which of those are real


@dataclass(eq=False)
class ForwardState:
    """Everything one forward of the text model needs to carry from layer to layer."""

    tokens: VisualTokens | None
    batch: int
    length: int
    device: torch.device
    padding_mask: Tensor | None  # the 2-D attention mask as given, (B, past + L), or None
    slots: Slots
    stats: ForwardStats
    implementation: str
    past: int = 0
    cache: Any = None
    book: CacheBook | None = None
    key_ok: Tensor | None = None  # (B, past + L) bool: logical positions that may be attended
    full_hidden: Tensor | None = None
    records_before: dict[int, KeyRecord] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)
    captured: dict[int, dict[str, Any]] = field(default_factory=dict)
    additions: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    scores: dict[tuple[int, int], tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    states: dict[int, dict] = field(default_factory=dict)  # per compressor, shared by its stages
    aux_loss: Tensor | None = None
    routing: Tensor | None = None  # (B,) input position of each sample's routing token
    encoder: EncoderCopies | None = None  # (B, L) what the vision encoder merged, when it did
    route: RoutedLayer | None = None  # the layer running on a routed subset right now

    @property
    def has_visual(self) -> bool:
        return self.tokens is not None

    def chunk_ok(self) -> Tensor:
        """(B, n) real, unpadded slots of the current sequence."""
        return self.slots.real & self.key_ok[:, self.past :].gather(1, self.slots.index)


class Engine:
    """Hooks one model; `detach` removes every trace."""

    def __init__(self, model: nn.Module, adapter: Any, compressors: list[Compressor]) -> None:
        self.model = model
        self.adapter = adapter
        self.compressors = sorted(compressors, key=lambda c: c.layer)
        self.acting = {layer: c for c in self.compressors for layer in c.acting_layers()}
        self.trainable = [c for c in self.compressors if isinstance(c, nn.Module)]
        self.routing_token = next(
            (c.routing_token() for c in compressors if c.routing_token() is not None), None
        )
        self.scoring: dict[
            int, list[tuple[Compressor, int]]
        ] = {}  # scoring layer -> (compressor, acting layer)
        for compressor in self.compressors:
            for acting, scoring in compressor.scoring_layers().items():
                self.scoring.setdefault(scoring, []).append((compressor, acting))
        starts = [c.trims_caches_from() for c in self.compressors if c.trims_caches_from() is not None]
        self.trim_from = max(min(starts), 1) if starts else None  # never layer 0: it gives the cache's length
        self.shape = adapter.shape()
        windows = next(
            (c.encoder_windows() for c in self.compressors if c.encoder_windows() is not None), None
        )
        encoder = adapter.vision_encoder()
        self.encoder_hooks = (
            None if encoder is None else EncoderHooks(encoder, windows if encoder.has_cls else None)
        )
        self.generating = False
        self.mlp_scales: dict[int, Tensor | None] = {}  # per layer, the factors of the input it is running
        self.books: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.handles: list[Any] = []
        self.undo: list[Any] = []  # adapters' own per-instance changes, undone on detach
        self.pending_tokens: VisualTokens | None = None
        self.fwd: ForwardState | None = None
        self.prefill_stats: ForwardStats | None = None
        self.last_stats: ForwardStats | None = None
        self.last_book: CacheBook | None = None
        self.kv_element_size = 0
        self.checked_tokens: VisualTokens | None = None
        self.pending_labels: Tensor | None = None
        self.pending_loss: Tensor | None = None

    # -- hooks ----------------------------------------------------------------------------------------------
    def attach(self) -> None:
        adapter = self.adapter
        try:
            self._hook_pre(self.model, self._on_call)
            self.handles.append(self.model.register_forward_hook(self._on_output, with_kwargs=True))
            self._hook_pre(adapter.multimodal_model, self._on_multimodal)
            self._hook_pre(adapter.language_model, self._on_text)
            for index, layer in enumerate(adapter.layers):
                self._hook_pre(layer, functools.partial(self._on_layer, index))
            for index in sorted(self.acting):
                self.handles.append(
                    adapter.layers[index].register_forward_hook(functools.partial(self._after_routed, index))
                )
                self.handles.append(
                    adapter.input_norm(index).register_forward_pre_hook(
                        functools.partial(self._note_scale, index)
                    )
                )
                self.handles.append(
                    adapter.mlp(index).register_forward_hook(functools.partial(self._scale_mlp, index))
                )
            for index in adapter.addition_layers():
                self.handles.append(
                    adapter.layers[index].register_forward_hook(functools.partial(self._add_features, index))
                )
            for index in self.scoring:
                attention = adapter.attention(index)
                self._hook_pre(attention, functools.partial(self._capture_attention_input, index))
                self.handles.append(
                    adapter.key_projection(index).register_forward_hook(
                        functools.partial(self._capture_keys, index)
                    )
                )
                self.handles.append(
                    attention.register_forward_hook(functools.partial(self._score, index), with_kwargs=True)
                )
            self.handles.append(adapter.final_norm.register_forward_pre_hook(self._on_final_norm))
            self.handles.append(adapter.lm_head.register_forward_hook(self._on_lm_head))
            self.undo.append(adapter.install())
            if self.encoder_hooks is not None:
                self.undo.append(self.encoder_hooks.detach)
                self.encoder_hooks.attach()
            if self.trainable:  # as model parameters: model.to(), .train(), Trainer's optimizer see them
                self.model.add_module(MODULES_NAME, nn.ModuleList(self.trainable).train(self.model.training))
                self.undo.append(lambda: delattr(self.model, MODULES_NAME))
        except Exception:
            self.detach()
            raise
        self._wrap_generate()
        for compressor in self.compressors:
            compressor.__dict__[OWNER] = weakref.ref(self.model)

    def detach(self) -> None:
        for compressor in self.compressors:
            compressor.__dict__.pop(OWNER, None)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        while self.undo:
            self.undo.pop()()
        self.model.__dict__.pop("generate", None)

    def _wrap_generate(self) -> None:
        """transformers 5.x `generate` encodes images before the first forward; check the inputs before that.

        An instance attribute shadowing the class method, removed by `detach`; the class is untouched.
        """
        original = self.model.generate

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            inputs = dict(kwargs)
            if args:
                inputs.setdefault("input_ids", args[0])
            inputs.setdefault("input_ids", inputs.get("inputs"))
            self._check_inputs(inputs)
            if self.encoder_hooks is not None:
                self.encoder_hooks.clear()
            self.generating = True
            try:
                return original(*args, **kwargs)
            finally:
                self.generating = False

        self.model.__dict__["generate"] = generate

    def _check_inputs(self, inputs: dict[str, Any]) -> VisualTokens | None:
        tokens = self.checked_tokens = self.adapter.visual_tokens(inputs)
        if tokens is not None:
            for compressor in self.compressors:
                compressor.check_inputs(tokens)
            input_ids = inputs.get("input_ids")
            if self.routing_token is not None and isinstance(input_ids, Tensor) and input_ids.dim() == 2:
                self._check_routing_token(input_ids == self.routing_token, tokens.counts() > 0)
        return tokens

    def _check_routing_token(self, found: Tensor, with_images: Tensor) -> None:
        missing = with_images & ~found.any(1)
        if bool(missing.any()):
            raise ValueError(
                f"samples {missing.nonzero()[:, 0].tolist()} have images but no routing token (id "
                f"{self.routing_token}) in their prompt; add it after the question (tokencompress.add_routing_token "
                "and with_routing_token do both), or build the compressor with routing_token_id=None to route by "
                "the last prompt token"
            )

    def _hook_pre(self, module: nn.Module, fn: Any) -> None:
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.pending_labels = kwargs.get("labels")
        self.pending_loss = None
        if self.encoder_hooks is not None and not self.generating:
            self.encoder_hooks.clear()  # what an earlier, unrelated call of the encoder left

    def _on_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Report the routing loss on the outputs, and add it to the loss when labels were given."""
        loss, self.pending_loss = self.pending_loss, None
        if loss is None or not isinstance(output, dict):
            return
        output["routing_loss"] = loss
        if kwargs.get("labels") is not None and output.get("loss") is not None:
            output["loss"] = output["loss"] + loss.to(output["loss"].dtype)

    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = dict(kwargs)
        if args:
            inputs.setdefault("input_ids", args[0])
        self.pending_tokens = self._check_inputs(inputs)

    def _on_text(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        implementation = self.adapter.attention_implementation()
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"tokencompress runs under attention implementations {SUPPORTED_ATTENTION}; this model now uses "
                f"{implementation!r}"
            )
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch, length = embeds.shape[:2] if embeds is not None else ids.shape[:2]
        device = (embeds if embeds is not None else ids).device
        padding_mask = kwargs.get("attention_mask")
        if padding_mask is not None and not (isinstance(padding_mask, Tensor) and padding_mask.dim() == 2):
            raise ValueError(
                "tokencompress needs the 2-D padding attention_mask (batch, length), not prepared 4-D masks "
                "(which transformers builds for static, compilable caches; use the default dynamic cache)"
            )
        tokens, self.pending_tokens = self.pending_tokens, None
        if tokens is not None and tuple(tokens.image_index.shape) != (batch, length):
            tokens = None
        tokens = self.adapter.complete_visual_tokens(tokens, kwargs)
        if tokens is not None and tokens is not self.checked_tokens:
            for compressor in self.compressors:  # the layout is complete only now (grids, spliced images)
                compressor.check_inputs(tokens)
        additions = self.adapter.take_layer_additions(kwargs)
        kind = "prefill" if tokens is not None or length > 1 else "decode"
        self.fwd = ForwardState(
            tokens=tokens,
            batch=batch,
            length=length,
            device=device,
            padding_mask=padding_mask,
            slots=Slots.full(batch, length, device, tokens),
            stats=ForwardStats(kind=kind, batch=batch, length=length, past=0),
            implementation=implementation,
            additions=additions,
        )
        if tokens is not None:
            self.fwd.routing = self._routing_positions(self.fwd, kwargs)
            self.fwd.stats.stage_tokens["input"] = tokens.counts()
            if self.encoder_hooks is not None:
                self._take_encoder(self.fwd)
        return args, kwargs

    def _take_encoder(self, fwd: ForwardState) -> None:
        """Attach what the vision encoder did for this prefill: its FLOPs, and which slots copy one merged token."""
        records, flops, baseline = self.encoder_hooks.take()
        fwd.stats.encoder_flops, fwd.stats.baseline_encoder_flops = flops, baseline
        if records:
            fwd.encoder = self._encoder_copies(fwd.tokens, records)
            fwd.stats.stage_tokens["vision encoder"] = distinct_per_row(fwd.encoder.copy_of)

    def _encoder_copies(self, tokens: VisualTokens, records: list[EncoderRecord]) -> EncoderCopies:
        copy_of = torch.cat([r.copy_of for r in records])
        key = torch.cat(
            [r.key if r.key is not None else torch.zeros_like(r.copy_of, dtype=torch.bool) for r in records]
        )
        rows, per_row = copy_of.shape
        patches = self.adapter.encoder_patches(tokens, rows)
        grids = {rows * cols for shapes in tokens.grid_shape for rows, cols in shapes}
        if patches is None or int(patches.max()) >= rows * per_row or grids != {per_row}:
            raise RuntimeError(
                f"the vision encoder merged windows of {rows} image(s) of {per_row} patches, but the prompt's visual "
                f"tokens do not map one to one onto those patches ({type(self.adapter).__name__}.encoder_patches)"
            )
        mapped = patches >= 0
        flat = patches.clamp(min=0)
        row, patch = flat // per_row, flat % per_row
        copy = copy_of.to(flat.device)[row, patch] + row * per_row  # unique per image, so per sample
        return EncoderCopies(torch.where(mapped, copy, -1), mapped & key.to(flat.device)[row, patch])

    def _routing_positions(self, fwd: ForwardState, text_inputs: dict[str, Any]) -> Tensor:
        """(B,) each sample's routing token: the last routing-token id if the pipeline names one, else the last
        prompt token (the one before the first supervised label when labels are given, else the last real one)."""
        arange = torch.arange(fwd.length, device=fwd.device).expand(fwd.batch, -1)
        if self.routing_token is not None:
            found = self.adapter.placeholders(text_inputs, self.routing_token)
            self._check_routing_token(found, fwd.tokens.counts() > 0)
            return torch.where(found, arange, -1).amax(1).clamp(min=0)
        real = torch.ones_like(arange, dtype=torch.bool)
        if fwd.padding_mask is not None:
            real = fwd.padding_mask[:, -fwd.length :].bool()
        last_real = torch.where(real, arange, -1).amax(1).clamp(min=0)
        labels = self.adapter.text_labels(self.pending_labels, text_inputs)
        if labels is None or tuple(labels.shape) != (fwd.batch, fwd.length):
            return last_real
        # Labels that supervise only an answer after the images: the prompt ends before the first label. Labels
        # that also cover the prompt (plain language-model labels) draw no such line: the last real token.
        first_label = torch.where((labels != IGNORE_INDEX) & real, arange, fwd.length).amin(1)
        last_visual = torch.where(fwd.tokens.is_visual, arange, -1).amax(1)
        answer_only = (first_label > last_visual) & (first_label < fwd.length)
        return torch.where(answer_only, (first_label - 1).clamp(min=0), last_real)

    def _on_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        fwd = self.fwd
        if fwd is None:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if fwd.key_ok is None:
            self._open_cache(fwd, kwargs.get("past_key_values"), hidden.dtype)
        compressor = self.acting.get(index)
        if compressor is not None and fwd.has_visual:
            hidden = self._compress(fwd, compressor, index, hidden)

        record = self._record(fwd, index)
        fwd.records_before[index] = record
        mask, extended = self._mask(fwd, record)
        if not extended.plain:  # the model's own mask and rotary are right only for the unmodified sequence
            kwargs["attention_mask"] = mask
            kwargs["position_embeddings"] = self._rotary(fwd, kwargs["position_embeddings"])
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = self._positions(fwd, kwargs["position_ids"])
        if fwd.book is not None:
            fwd.book.records[index] = extended
        self._count_layer(fwd, index, len(extended))
        return (hidden, *args[1:]), kwargs

    def _add_features(self, index: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Add the layer's features (e.g. Qwen3-VL deepstack) at the visual tokens the sequence still holds."""
        fwd = self.fwd
        if fwd is None or index not in fwd.additions:
            return None
        mask, values = fwd.additions[index]
        row_of = (mask.flatten().long().cumsum(0) - 1).view(mask.shape)  # each visual token's row in values
        slots = fwd.slots
        present = mask.gather(1, slots.index) & slots.real
        added = torch.zeros_like(output)
        added[present] = values.to(output.dtype)[row_of.gather(1, slots.index)[present]]
        return output + added

    def _after_routed(self, index: int, module: nn.Module, args: tuple, output: Any) -> Any:
        """After a layer that ran on routed slots: the skipped ones rejoin with their input hidden states."""
        fwd = self.fwd
        route = None if fwd is None else fwd.route
        if route is None or route.layer != index:
            return None
        out = output[0] if isinstance(output, tuple) else output
        rows = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(route.columns)
        full = route.hidden.index_put((rows[route.real], route.columns[route.real]), out[route.real])
        fwd.slots, fwd.route = route.slots, None
        return (full, *output[1:]) if isinstance(output, tuple) else full

    def _check_checkpointing(self, index: int, scale: Tensor) -> None:
        """Reentrant checkpointing tracks gradients through a layer's positional inputs only; the MLP scale enters
        the layer another way, so its gradient (and the MLP's) would be wrong: refuse that combination."""
        layer = self.adapter.layers[index]
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
        reentrant = getattr(checkpoint, "keywords", {}).get(
            "use_reentrant", True
        )  # torch's default: reentrant
        if (
            scale.requires_grad
            and layer.training
            and getattr(layer, "gradient_checkpointing", False)
            and reentrant
        ):
            raise ValueError(
                "a routed layer's MLP scale needs non-reentrant gradient checkpointing (the transformers default): "
                "gradient_checkpointing_kwargs={'use_reentrant': False}, or mlp_scale='none'"
            )

    def _note_scale(self, index: int, module: nn.Module, args: tuple) -> None:
        """The layer starts (or gradient checkpointing re-runs it): take the MLP factors its input carries."""
        self.mlp_scales[index] = getattr(args[0], MLP_SCALE, None)

    def _scale_mlp(self, index: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        scale = self.mlp_scales.get(index)
        if scale is None or tuple(scale.shape) != tuple(output.shape[:2]):
            return None
        return output * scale[..., None].to(output.dtype)

    def _on_final_norm(self, module: nn.Module, args: tuple) -> tuple | None:
        fwd = self.fwd
        if fwd is None:
            return None
        self.fwd = None
        if self.trim_from is not None and fwd.book is not None and fwd.has_visual:
            self._trim_caches(fwd)
        self._finish(fwd)
        if fwd.full_hidden is None:
            return None
        return (self._restore(fwd.full_hidden, fwd.slots, args[0]),)

    def _on_lm_head(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.last_stats is not None and not self.last_stats.lm_head_flops:
            rows = args[0].shape[:-1].numel()
            self.last_stats.lm_head_flops = self.last_stats.baseline_lm_head_flops = self.shape.lm_head_flops(
                rows
            )

    # -- importance scores ----------------------------------------------------------------------------------
    def _capture_attention_input(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        fwd = self.fwd
        if fwd is None or not fwd.has_visual:
            return
        normed = args[0] if args else kwargs["hidden_states"]
        cache_keys = None
        record = fwd.records_before[index]
        if len(record):
            cache_keys = fwd.cache.layers[index].keys
        fwd.captured[index] = {
            "normed": normed,
            "rotary": kwargs["position_embeddings"],
            "cache_keys": cache_keys,
        }

    def _capture_keys(self, index: int, module: nn.Module, args: tuple, output: Tensor) -> None:
        fwd = self.fwd
        if fwd is not None and index in fwd.captured:
            fwd.captured[index]["keys"] = output

    @torch.no_grad()  # scores choose tokens and carry no gradient; inside a checkpointed layer they save nothing
    def _score(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        fwd = self.fwd
        if fwd is None or index not in fwd.captured:
            return
        captured = fwd.captured.pop(index)
        cos, sin = captured["rotary"]
        record = fwd.records_before[index]
        chunk_ok = fwd.chunk_ok()
        is_visual = fwd.slots.is_visual & chunk_ok
        order = fwd.slots.index + fwd.past
        keys = self.adapter.keys(index, captured["keys"], cos, sin)
        if captured["cache_keys"] is not None:
            keys = torch.cat([captured["cache_keys"], keys], dim=2)
        key_order = torch.cat([record.order, order], dim=1)
        key_ok = torch.cat([record.real, fwd.slots.real], dim=1) & fwd.key_ok.gather(1, key_order)
        for mode in dict.fromkeys(c.scoring_query() for c, _ in self.scoring[index]):
            columns, weights = query_rows("text" if mode == "text_rows" else mode, chunk_ok, is_visual, order)
            queries = self.adapter.queries(
                index,
                gather_rows(captured["normed"], columns),
                gather_rows(cos, columns),
                gather_rows(sin, columns),
            )
            allowed = (key_order[:, None, :] <= order.gather(1, columns)[:, :, None]) & key_ok[:, None, :]
            scaling = self.adapter.scaling(index)
            if mode == "text_rows":
                received = attention_rows(queries, keys, allowed, weights, scaling)[:, :, len(record) :]
                rows = weights > 0
            else:
                received, rows = (
                    attention_received(queries, keys, allowed, weights, scaling)[:, len(record) :],
                    None,
                )
            for compressor, acting in self.scoring[index]:
                if compressor.scoring_query() == mode:
                    fwd.scores[(id(compressor), acting)] = (received, rows)
            shape = self.shape
            fwd.stats.scoring_flops += scoring_flops(
                fwd.batch, columns.shape[1], keys.shape[2], shape.hidden, shape.heads, shape.head_dim
            )

    # -- sequence surgery -----------------------------------------------------------------------------------
    def _compress(self, fwd: ForwardState, compressor: Compressor, index: int, hidden: Tensor) -> Tensor:
        slots = fwd.slots
        chunk_ok = fwd.chunk_ok()
        is_visual = slots.is_visual & chunk_ok
        scores, score_queries = fwd.scores.pop((id(compressor), index), (None, None))
        if index in compressor.scoring_layers() and scores is None:
            raise RuntimeError(f"{type(compressor).__name__}: no scores were computed at its scoring layer")
        # The routing token's slot, or, once pooled or dropped, the latest slot before it (the pooled token that
        # holds it: groups sit at their first member's position, in raster order).
        before = slots.real & (slots.index <= fwd.routing[:, None])
        routing = torch.where(before, torch.arange(len(slots), device=before.device), -1).amax(1).clamp(min=0)
        view = VisualView(
            layer=index,
            hidden_states=hidden,
            is_visual=is_visual,
            image_index=torch.where(is_visual, slots.image_index, -1),
            grid_row=slots.grid_row,
            grid_col=slots.grid_col,
            position=slots.index + fwd.past,
            grid_shape=slots.grid_shape,
            routing=routing,
            scores=scores,
            score_queries=score_queries,
            state=fwd.states.setdefault(id(compressor), {}),
            input_norm=self.adapter.input_norm(index),
            encoder=None
            if fwd.encoder is None
            else EncoderCopies(
                fwd.encoder.copy_of.gather(1, slots.index), fwd.encoder.key.gather(1, slots.index)
            ),
        )
        decision = compressor.select(view)
        fwd.full_hidden = hidden if fwd.full_hidden is None else self._restore(fwd.full_hidden, slots, hidden)
        fwd.memo.clear()
        if isinstance(decision, (Merge, Route)):
            if decision.info:
                fwd.stats.decisions[index] = {key: value.detach() for key, value in decision.info.items()}
            fwd.stats.extra_flops += decision.extra_flops
            if decision.aux_loss is not None:
                fwd.aux_loss = decision.aux_loss if fwd.aux_loss is None else fwd.aux_loss + decision.aux_loss
        if isinstance(decision, Route):
            fwd.slots, columns = slots.select(chunk_ok & (~is_visual | decision.routed))
            fwd.route = RoutedLayer(index, slots, hidden, columns, fwd.slots.real)
            hidden = gather_rows(hidden, columns)
            if decision.mlp_scale is not None:
                self._check_checkpointing(index, decision.mlp_scale)
                # On the layer's input itself: gradient checkpointing re-runs the layer on that very tensor in
                # backward, possibly after other forwards, so the factors must travel with it.
                setattr(hidden, MLP_SCALE, decision.mlp_scale.gather(1, columns))
        elif isinstance(decision, Merge):
            fwd.slots, hidden = apply_merge(
                slots, hidden, decision, chunk_ok, fwd.tokens, self.adapter.positions_on_grid
            )
        else:
            fwd.slots, columns = slots.select(chunk_ok & (~is_visual | decision))
            hidden = gather_rows(hidden, columns)
        fwd.stats.stage_tokens[f"layer {index}"] = (fwd.slots.is_visual & fwd.chunk_ok()).sum(1)
        return hidden

    @staticmethod
    def _restore(full: Tensor, slots: Slots, hidden: Tensor) -> Tensor:
        """Write the hidden states of real slots back at their input positions (others keep their last value)."""
        rows = torch.arange(slots.index.shape[0], device=full.device)[:, None].expand_as(slots.index)
        return full.index_put((rows[slots.real], slots.index[slots.real]), hidden[slots.real])

    def _rotary(self, fwd: ForwardState, rotary: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        key = ("rotary", id(fwd.slots))
        if key not in fwd.memo:
            fwd.memo[key] = tuple(gather_rows(part, fwd.slots.anchor) for part in rotary)
        return fwd.memo[key]

    def _positions(self, fwd: ForwardState, position_ids: Tensor) -> Tensor:
        """Gather position ids along the sequence (last) dim: (B|1, L) or (k, B|1, L) for multi-axis RoPE."""
        index = fwd.slots.anchor
        if position_ids.dim() == 2:
            return position_ids.expand(fwd.batch, -1).gather(1, index)
        return position_ids.expand(-1, fwd.batch, -1).gather(2, index.expand(position_ids.shape[0], -1, -1))

    # -- cache and masks ------------------------------------------------------------------------------------
    def _open_cache(self, fwd: ForwardState, cache: Any, dtype: torch.dtype) -> None:
        fwd.cache = cache
        if cache is not None:
            book = self.books.get(cache)
            if book is None:
                book = CacheBook(records={}, logical_length=cache.get_seq_length())
                self.books[cache] = book
            fwd.book, fwd.past = book, book.logical_length
            book.logical_length += fwd.length
            self.last_book = book
        fwd.stats.past = fwd.past
        if fwd.past and fwd.tokens is None and fwd.length > 1:  # text appended to a conversation
            fwd.stats.kind = "extend"
        total = fwd.past + fwd.length
        if fwd.padding_mask is None:
            fwd.key_ok = torch.ones(fwd.batch, total, dtype=torch.bool, device=fwd.device)
        elif fwd.padding_mask.shape[1] != total:
            raise ValueError(
                f"attention_mask covers {fwd.padding_mask.shape[1]} positions but the cache holds {fwd.past} and "
                f"{fwd.length} are new; pass the mask of the whole conversation ({total} positions)"
            )
        else:
            fwd.key_ok = fwd.padding_mask.bool()
        self.kv_element_size = torch.empty((), dtype=dtype).element_size()

    def _record(self, fwd: ForwardState, index: int) -> KeyRecord:
        """What this layer's cache holds before this forward, checked against the cache itself."""
        if fwd.book is None:
            return KeyRecord.contiguous(fwd.batch, 0, fwd.device)
        layers = fwd.cache.layers
        held = layers[index].get_seq_length() if index < len(layers) else 0
        record = fwd.book.records.get(index)
        if record is None:
            return KeyRecord.contiguous(fwd.batch, held, fwd.device)
        if len(record) != held or record.order.shape[0] != fwd.batch:
            raise RuntimeError(
                f"the KV cache of layer {index} holds {held} entries for batch {fwd.batch} but tokencompress "
                f"recorded {len(record)} for batch {record.order.shape[0]}: the cache was changed outside "
                "tokencompress (cropped or re-batched), which compressed caches do not support"
            )
        return record

    def _mask(self, fwd: ForwardState, record: KeyRecord) -> tuple[Tensor | None, KeyRecord]:
        """The layer's 4-D mask (None where the model's own is right) and its extended record, shared by all
        layers with the same cache layout."""
        key = ("plain", len(record)) if record.plain else id(record)
        key = (key, id(fwd.slots))
        if key not in fwd.memo:
            extended = record.extend(fwd.slots, fwd.past)
            mask = None
            if not extended.plain:
                key_ok = extended.real & fwd.key_ok.gather(1, extended.order)
                mask = self._build_mask(fwd, extended, key_ok, len(record))
            fwd.memo[key] = (mask, extended)
        return fwd.memo[key]

    def _build_mask(
        self, fwd: ForwardState, extended: KeyRecord, key_ok: Tensor, cached: int
    ) -> Tensor | None:
        # Slots are in increasing logical order, so when every key is real and unpadded, order-causality is
        # plain lower-triangular causality: sdpa's own causal path (mask None) is then exact and faster. Not
        # with cached keys and several queries, where sdpa would align the triangle to the wrong corner.
        queries = len(fwd.slots)
        if fwd.implementation == "sdpa" and (cached == 0 or queries == 1) and bool(key_ok.all()):
            return None
        allowed = allowed_keys(fwd.slots.index + fwd.past, extended.order, key_ok, cached)
        return to_implementation(allowed, fwd.implementation, self._dtype())

    def _trim_caches(self, fwd: ForwardState) -> None:
        """Output-aware cache: from layer `trim_from` on, drop from each layer's cache the visual tokens of this
        prefill that did not reach the last layer, so decoding attends only to tokens that shaped the output."""
        reached = torch.zeros(fwd.batch, fwd.past + fwd.length, dtype=torch.bool, device=fwd.device)
        final = fwd.slots
        reached[:, fwd.past :].scatter_(1, final.index, final.real)
        visual = torch.zeros_like(reached)
        visual[:, fwd.past :] = fwd.tokens.is_visual
        for index, record in list(fwd.book.records.items()):
            if index < self.trim_from:
                continue
            # Keep this layer's text and earlier-turn entries (padding goes too: it was masked anyway) and the
            # visual tokens that reached the last layer.
            order = record.order
            keep = (record.real & ~visual.gather(1, order) & fwd.key_ok.gather(1, order)) | reached.gather(
                1, order
            )
            if bool(keep.all()):
                continue
            columns, real = compact_columns(keep)
            layer = fwd.cache.layers[index]
            gather = columns[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
            fwd.book.records[index] = KeyRecord(
                record.order.gather(1, columns), record.real.gather(1, columns) & real, False
            )

    def _dtype(self) -> torch.dtype:
        return self.adapter.final_norm.weight.dtype

    # -- accounting -----------------------------------------------------------------------------------------
    def _count_layer(self, fwd: ForwardState, index: int, keys: int) -> None:
        slots = fwd.slots
        key = ("count", id(slots))
        if key not in fwd.memo:  # layers between two compressions share one layout
            ok = fwd.chunk_ok()
            visual = fwd.slots.is_visual & ok
            fwd.memo[key] = (torch.where(ok, slots.index, -1), visual)
        positions, visual = fwd.memo[key]
        fwd.stats.layers.append(
            LayerStats(
                layer=index,
                positions=positions,
                visual_mask=visual,
                slots=len(slots),
                keys=keys,
                flops=self.shape.layer_flops(fwd.batch, len(slots), keys),
            )
        )
        fwd.stats.baseline_layer_flops += self.shape.layer_flops(fwd.batch, fwd.length, fwd.past + fwd.length)

    def _finish(self, fwd: ForwardState) -> None:
        self.last_stats = fwd.stats
        if fwd.aux_loss is not None:
            fwd.stats.routing_loss = fwd.aux_loss.detach()
            self.pending_loss = fwd.aux_loss
        if fwd.stats.kind == "prefill":
            self.prefill_stats = fwd.stats

    def stats(self) -> Stats:
        book = self.last_book
        entries = [len(book.records[i]) for i in sorted(book.records)] if book is not None else []
        batch = next(iter(book.records.values())).order.shape[0] if book is not None and book.records else 0
        shape, size = self.shape, self.kv_element_size
        logical = book.logical_length if book is not None else 0
        return Stats(
            prefill=self.prefill_stats,
            last=self.last_stats,
            kv_cache_bytes=sum(shape.kv_bytes(batch, n, size) for n in entries),
            kv_cache_bytes_uncompressed=shape.kv_bytes(batch, logical, size) * len(entries),
            kv_cache_entries=entries,
            routing_loss=self.prefill_stats.routing_loss if self.prefill_stats is not None else None,
        )


def distinct_per_row(ids: Tensor) -> Tensor:
    """(B,) how many distinct non-negative values each row of `ids` (B, L) holds."""
    ordered = ids.sort(1).values
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return (new & (ordered >= 0)).sum(1)
