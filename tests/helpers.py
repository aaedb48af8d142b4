"""Model-agnostic helpers shared by the invariant tests of every family (LLaVA, Qwen-VL).

What differs between families is a parameter: the placeholder ids that mark visual tokens (LLaVA: the image
token; Qwen: image and video tokens) and the number of decoder layers. The independent masking reference lives
in `reference.py`, which imports nothing from tokencompress; these helpers read the engine's reports through
the public `tokencompress` API only (never `tokencompress.engine`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from reference import MaskingReference, expected_keep_count

import tokencompress as tc

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


def forward_hooks(model) -> dict[str, list[object]]:
    """Every forward (pre-)hook on every module. Transformers installs its own output-capturing hooks on the
    first forward, so compare snapshots taken after one."""
    return {
        name: [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        for name, module in model.named_modules()
    }


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
