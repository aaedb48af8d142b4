"""Model-agnostic helpers shared by the invariant tests of every family (LLaVA, Qwen-VL).

What differs between families is a parameter: the placeholder ids that mark visual tokens (LLaVA: the image
token; Qwen: image and video tokens) and the number of decoder layers. The independent masking reference lives
in `reference.py`, which imports nothing from tokencompress; these helpers read the engine's reports through
the public `tokencompress` API only (never `tokencompress.engine`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
import torch
from reference import MaskingReference, expected_keep_count
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import tokencompress as tc
from tokencompress.compressors.base import TokenDropper

ATOL = 1e-4


def make_compressor(method: str, layer: int, keep: float | int) -> tc.Compressor:
    if method == "fastv":
        return tc.FastV(layer=layer, keep=keep)
    return tc.RandomDrop(layer=layer, keep=keep, seed=7)


def visual_mask(inputs: dict[str, torch.Tensor], visual_ids: Sequence[int]) -> torch.Tensor:
    """(B, L) bool: the real tokens whose id is one of `visual_ids`."""
    ids = inputs["input_ids"]
    return torch.isin(ids, torch.tensor(list(visual_ids))) & inputs["attention_mask"].bool()


def text_mask(inputs: dict[str, torch.Tensor], visual_ids: Sequence[int]) -> torch.Tensor:
    """(B, L) bool: the real tokens that are not visual."""
    return inputs["attention_mask"].bool() & ~visual_mask(inputs, visual_ids)


def kept_visual(kept: list[set[int]], visual: torch.Tensor) -> list[set[int]]:
    """Each sample's kept positions that are visual tokens."""
    return [k & set(torch.nonzero(visual[b]).flatten().tolist()) for b, k in enumerate(kept)]


def kept_sets(model, layer: int, rows: int) -> list[set[int]]:
    prefill = tc.stats(model).prefill
    return [set(prefill.layers[layer].kept_positions(b)) for b in range(rows)]


def dropped_from_stats(model, layer: int, visual: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the real visual positions the engine reports as not processed by `layer`."""
    dropped = visual.clone()
    for b, kept in enumerate(kept_sets(model, layer, visual.shape[0])):
        for position in kept:
            dropped[b, position] = False
    return dropped


def check_kept_accounting(
    model, inputs, layer: int, keep, visual_ids: Sequence[int], num_layers: int
) -> list[set[int]]:
    """Stats agree with the budget: all real tokens before `layer`; from `layer` on, every real text token and
    ceil(N x keep) (or the count) visual tokens per sample (images and videos together), the same set at every
    later layer."""
    prefill = tc.stats(model).prefill
    visual, real = visual_mask(inputs, visual_ids), inputs["attention_mask"].bool()
    batch = visual.shape[0]
    counts = visual.sum(1).tolist()
    assert len(prefill.layers) == num_layers
    for stats in prefill.layers:
        positions = [set(stats.kept_positions(b)) for b in range(batch)]
        if stats.layer < layer:
            assert positions == [set(torch.nonzero(real[b]).flatten().tolist()) for b in range(batch)]
            assert stats.visual == counts
        else:
            assert stats.visual == [expected_keep_count(n, keep) for n in counts]
            for b in range(batch):
                text = set(torch.nonzero(real[b] & ~visual[b]).flatten().tolist())
                assert text <= positions[b], "a text token was dropped"
                assert positions[b] <= set(torch.nonzero(real[b]).flatten().tolist())
                assert len(positions[b] - text) == expected_keep_count(counts[b], keep)
            assert positions == kept_sets(model, layer, batch)
    return kept_sets(model, layer, batch)


def bind(visual_ids: Sequence[int], num_layers: int):
    """(visual_mask, text_mask, check_kept_accounting) for a family whose visual tokens carry `visual_ids` and
    whose models have `num_layers` decoder layers."""
    return (
        functools.partial(visual_mask, visual_ids=visual_ids),
        functools.partial(text_mask, visual_ids=visual_ids),
        functools.partial(check_kept_accounting, visual_ids=visual_ids, num_layers=num_layers),
    )


def assert_close_at(
    actual: torch.Tensor, expected: torch.Tensor, where: torch.Tensor, atol: float = ATOL
) -> None:
    difference = (actual - expected)[where].abs().max().item()
    assert difference <= atol, f"max |difference| {difference:.3g} > {atol}"


def reference_logits(
    ref_model, layer: int, dropped: torch.Tensor, inputs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Logits of the uncompressed `ref_model` on `inputs` as given, dropped keys masked from `layer` on."""
    with torch.no_grad(), MaskingReference(ref_model, layer, dropped) as reference:
        logits = ref_model(**inputs).logits
    assert reference.calls > 0
    return logits


def extend(inputs: dict[str, torch.Tensor], sequences: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prompt's inputs over prompt + generated tokens: attention mask extended with ones and, where the
    inputs carry token types (Qwen), those extended with text (0)."""
    rows, new = sequences.shape[0], sequences.shape[1] - inputs["input_ids"].shape[1]
    out = {**inputs, "input_ids": sequences}
    out["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones(rows, new, dtype=torch.long)], dim=1
    )
    if "mm_token_type_ids" in inputs:
        types = torch.zeros(rows, new, dtype=torch.long)
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], types], dim=1)
    return out


def greedy(model, inputs: dict, new_tokens: int = 5, **generate):
    """`new_tokens` greedy tokens from `model.generate(**inputs, **generate)`, with their logits."""
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **generate,
        )


def forward_hooks(model) -> dict[str, list[object]]:
    """Every forward (pre-)hook on every module. Transformers installs its own output-capturing hooks on the
    first forward, so compare snapshots taken after one."""
    return {
        name: [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        for name, module in model.named_modules()
    }


def assert_untouched(model, state: dict[str, torch.Tensor], hooks: dict[str, list[object]]) -> None:
    """`model`'s parameters and buffers are `state` (the same names, order and values) and its forward hooks are
    `hooks` (a `forward_hooks` snapshot)."""
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert forward_hooks(model) == hooks


def second_turn(
    model, inputs: dict[str, torch.Tensor], first, generate: dict, first_id: int, media: Sequence[str]
):
    """A second turn continuing from the first turn's (pruned) cache: three random text tokens (ids from
    `first_id` on) after the first turn's sequences, then 4 greedy tokens with their logits, the media inputs
    (`media`) left out. Returns (conversation, second generate's output)."""
    generator = torch.Generator().manual_seed(5)
    turn = torch.randint(
        first_id, model.config.text_config.vocab_size, (first.sequences.shape[0], 3), generator=generator
    )
    conversation = torch.cat([first.sequences, turn], dim=1)
    second_inputs = extend(inputs, conversation)
    for key in media:
        second_inputs.pop(key)
    with torch.no_grad():
        second = model.generate(
            **second_inputs,
            past_key_values=first.past_key_values,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **generate,
        )
    return conversation, second


def assert_generate_matches_reference(out, ref_model, layer: int, dropped, inputs, kwargs: dict) -> None:
    """`out` (a compressed model's generate with `kwargs`, scores returned) equals the uncompressed `ref_model`'s
    generate under the masking reference: the same sequences, scores within ATOL."""
    with torch.no_grad(), MaskingReference(ref_model, layer, dropped):
        expected = ref_model.generate(**inputs, **kwargs)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(out.sequences_scores, expected.sequences_scores, atol=ATOL, rtol=0)


def assert_steps_match(
    step_logits: Sequence[torch.Tensor], expected: torch.Tensor, first_position: int
) -> None:
    """Logits of decode step t (step_logits[t]) == `expected` logits at position first_position - 1 + t."""
    for step, logits in enumerate(step_logits):
        difference = (logits - expected[:, first_position - 1 + step]).abs().max().item()
        assert difference <= ATOL, f"decode step {step}: max |difference| {difference:.3g} > {ATOL}"


def check_pruned_cache(model, past_key_values, layer: int, length: int) -> None:
    """The pruned cache holds all `length` entries before `layer` and fewer (the kept tokens, the same number at
    every layer) from `layer` on, and the stats say what the cache holds."""
    held = [cache_layer.keys.shape[2] for cache_layer in past_key_values.layers]
    assert tc.stats(model).kv_cache_entries == held
    assert held[:layer] == [length] * layer
    assert all(count == held[layer] < length for count in held[layer:])


def check_raises_before_vision(
    model, towers: Sequence[torch.nn.Module], inputs: dict, generate_inputs=None
) -> None:
    """Compressed (FastV(2, 0.5)), `model` rejects `inputs` (placeholders that disagree with the media) with a
    ValueError naming the placeholders, in a forward and in generate (on `generate_inputs`, by default `inputs`),
    before any of the vision `towers` runs."""
    calls = []
    for tower in towers:
        tower.register_forward_pre_hook(lambda m, a: calls.append(1))
    tc.compress(model, tc.FastV(layer=2, keep=0.5))
    with pytest.raises(ValueError, match="placeholder"), torch.no_grad():
        model(**inputs)
    assert not calls, "the vision tower ran before the error"
    with pytest.raises(ValueError, match="placeholder"), torch.no_grad():
        model.generate(**(inputs if generate_inputs is None else generate_inputs), max_new_tokens=2)
    assert not calls, "the vision tower ran before the error"


# -- views ------------------------------------------------------------------------------------------------------


@dataclass
class ViewRecorder(TokenDropper):
    """A test-only compressor (through the public extension interface): keeps every token, records its views."""

    layer: int = 1
    keep: float = 1.0
    views: list = field(default_factory=list)

    name = "test-view-recorder"

    def score(self, view):
        self.views.append(view)
        return torch.zeros(view.is_visual.shape)


def observed(view, b: int) -> list[tuple[int, int, int, int]]:
    """(position, image/grid, row, col) of every slot the view marks visual in sample b."""
    visual = view.is_visual[b]
    columns = [view.position[b][visual], view.image_index[b][visual], view.grid_row[b][visual]]
    columns.append(view.grid_col[b][visual])
    return list(zip(*(c.tolist() for c in columns), strict=True))


# -- FLOPs ------------------------------------------------------------------------------------------------------


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch counts nothing for the CPU sdpa kernel; give it the formula torch uses for the GPU ones
SDPA_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_formula}


def measure_flops(fn, modules: Sequence[str] | None = None) -> tuple[int, object]:
    """(FLOPs, fn's result): the FLOPs the counter attributes to the decoder stack and the LM head (not the vision
    tower). By default those are the one module whose name ends in `.model.language_model` and the one ending in
    `.lm_head`; `modules`, where given, names them exactly."""
    counter = FlopCounterMode(display=False, custom_mapping=SDPA_CPU)
    with torch.no_grad(), counter:
        result = fn()
    counts = counter.get_flop_counts()
    if modules is None:
        language = [k for k in counts if k.endswith(".model.language_model")]
        head = [k for k in counts if k.endswith(".lm_head")]
        assert len(language) == 1 and len(head) == 1, sorted(counts)
        modules = (language[0], head[0])
    return sum(sum(counts[module].values()) for module in modules), result


def assert_flops_close(analytic: int, measured: int) -> None:
    assert measured > 0
    assert abs(analytic - measured) <= 0.02 * measured, (analytic, measured)


def check_flops_match_counter(
    model,
    inputs: dict[str, torch.Tensor],
    prompt_mask: torch.Tensor,
    decode_positions: Callable[[torch.Tensor], torch.Tensor],
    measure: Callable = measure_flops,
) -> None:
    """The stats' analytic FLOPs (prefill, its uncompressed baseline, one decode step after the prefill's cache)
    agree with the FLOP counter's (`measure`) within 2%, and FastV(2, 0.25) saves over 10% of the prefill.
    `prompt_mask` is the decoder's mask over the prompt; `decode_positions(mask)` the decode step's position ids
    given its (B, L + 1) mask."""
    bare, _ = measure(lambda: model(**inputs))
    with tc.compressed(model, tc.FastV(layer=2, keep=0.25)):
        prefill, out = measure(lambda: model(**inputs, use_cache=True))
        stats = tc.stats(model)
        assert_flops_close(stats.prefill.flops, prefill)
        assert_flops_close(stats.prefill.baseline_flops, bare)
        step = torch.full((out.logits.shape[0], 1), 9)
        mask = torch.cat([prompt_mask, torch.ones_like(step)], dim=1)
        decode_inputs = {
            "input_ids": step,
            "attention_mask": mask,
            "position_ids": decode_positions(mask),
            "past_key_values": out.past_key_values,
        }
        decode, _ = measure(lambda: model(**decode_inputs, use_cache=True))
        stats = tc.stats(model)
        assert stats.last.kind == "decode"
        assert_flops_close(stats.last.flops, decode)
    assert prefill < 0.9 * bare
