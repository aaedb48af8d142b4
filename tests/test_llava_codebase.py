"""The invariants of DESIGN.md on the LLaVA codebase family: the original LLaVA (`llava-torch`'s
`LlavaLlamaForCausalLM`) and a faithful tiny Mini-Gemini stand-in (normal and HD), for FastV and RandomDrop.

These models splice image features into `inputs_embeds` inside their own `prepare_inputs_labels_for_multimodal`
(each -200 placeholder becomes that image's feature tokens; rows re-padded on `config.tokenizer_padding_side`). So
every reference here works on the spliced sequence, obtained by calling that method on an *uncompressed* model:
identity compares logits at its real positions, and `reference.MaskingReference` runs the uncompressed decoder on
the same spliced `inputs_embeds` with the dropped keys masked from layer K on. Which spliced positions are visual
is derived independently from the prompt (a text token is one position, a placeholder is one image's tokens).

With right padding (the codebase default), batched `generate` reads the first new token of the shorter rows from
a padding position, which is undefined (a codebase property): greedy generate is compared with left padding or
batch 1, and right-padded batches are decoded by hand with the extended mask and explicit positions.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import helpers
import pytest
import torch
from helpers import (
    ATOL,
    ViewRecorder,
    assert_close_at,
    assert_steps_match,
    assert_untouched,
    check_flops_match_counter,
    check_pruned_cache,
    check_raises_before_vision,
    dropped_from_stats,
    forward_hooks,
    kept_sets,
    kept_visual,
    make_compressor,
    measure_flops,
    observed,
)
from llava_codebase import image_token_count, tiny_llava_codebase, tiny_llava_codebase_inputs
from minigemini_standin import image_tokens_per_image, tiny_minigemini, tiny_minigemini_inputs
from reference import MaskingReference, fastv_kept, generation_positions
from torch import nn

import tokencompress as tc

NUM_LAYERS = 4
IMAGE_TOKEN_INDEX = -200
IMPLEMENTATIONS = ["eager", "sdpa"]
METHODS = ["fastv", "random"]
SIDES = [
    "right",
    "left",
]  # the side the splice pads to (config.tokenizer_padding_side); "right" is the default
SPLICE = "prepare_inputs_labels_for_multimodal"

# The helpers' token-id based masks, fed with pseudo ids: IMAGE_TOKEN_INDEX where the spliced sequence is visual.
visual_mask, text_mask, check_kept_accounting = helpers.bind((IMAGE_TOKEN_INDEX,), NUM_LAYERS)


# -- the models -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How to build one codebase model and its padded inputs; nothing about where tokens end up."""

    build: Callable[..., nn.Module]  # (attn_implementation, tokenizer_padding_side, seed) -> model
    inputs: Callable[[nn.Module, str, str], dict]  # (model, batch name, padding side) -> inputs
    tokens_per_image: Callable[[nn.Module], int]
    towers: Callable[[nn.Module], list[nn.Module]] = field(default=lambda model: [model.get_vision_tower()])


# (prompt lengths (prefix, suffix) per sample, images per sample); a text-only sample consumes a dummy image
LLAVA_BATCHES = {"b1": ([(3, 5)], [1]), "b3": ([(2, 4), (5, 2), (1, 6)], [1, 2, 0])}
# (text tokens per sample, BOS included; images per sample)
MGM_BATCHES = {"b1": ([7], [1]), "b3": ([5, 8, 4], [1, 2, 0])}


def _llava_inputs(model, batch, side):
    lengths, images = LLAVA_BATCHES[batch]
    return tiny_llava_codebase_inputs(model, lengths, images, padding_side=side)


def _mgm_inputs(model, batch, side):
    assert model.config.tokenizer_padding_side == side  # the stand-in pads its inputs as its config says
    return tiny_minigemini_inputs(model, *MGM_BATCHES[batch])


def _mgm_towers(model):
    return [model.get_vision_tower(), model.get_vision_tower_aux()]


FAMILIES = {
    "llava": Family(
        lambda implementation, side, seed: tiny_llava_codebase(
            layers=NUM_LAYERS, attn_implementation=implementation, tokenizer_padding_side=side, seed=seed
        ),
        _llava_inputs,
        image_token_count,
    ),
    "mgm": Family(
        lambda implementation, side, seed: tiny_minigemini(
            layers=NUM_LAYERS, attn_implementation=implementation, tokenizer_padding_side=side, seed=seed
        ),
        _mgm_inputs,
        image_tokens_per_image,
        _mgm_towers,
    ),
    "mgm_hd": Family(
        lambda implementation, side, seed: tiny_minigemini(
            layers=NUM_LAYERS,
            hd=True,
            attn_implementation=implementation,
            tokenizer_padding_side=side,
            seed=seed,
        ),
        _mgm_inputs,
        image_tokens_per_image,
        _mgm_towers,
    ),
}


@functools.cache
def _pristine(family: str, implementation: str, side: str) -> nn.Module:
    return FAMILIES[family].build(implementation, side, 0)


def fresh_model(family: str, implementation: str = "sdpa", side: str = "right") -> nn.Module:
    """A new, never compressed model; the same weights under every implementation and padding side."""
    return copy.deepcopy(_pristine(family, implementation, side))


def make_inputs(family: str, model, batch: str, side: str) -> dict[str, torch.Tensor]:
    return FAMILIES[family].inputs(model, batch, side)


def media(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


def generate_kwargs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The codebase's generate: prompt ids as `inputs`, images by keyword."""
    return {"inputs": inputs["input_ids"], "attention_mask": inputs["attention_mask"], **media(inputs)}


def greedy(model, inputs, new_tokens: int = 5):
    return helpers.greedy(model, generate_kwargs(inputs), new_tokens, min_new_tokens=new_tokens)


def splice(model, inputs, labels=None):
    """(inputs_embeds, attention_mask, labels) as the model's own splice makes them (call on an uncompressed
    model: this is the reference's input)."""
    assert SPLICE not in model.__dict__, "the reference splice must come from an uncompressed model"
    with torch.no_grad():
        out = getattr(model, SPLICE)(
            inputs["input_ids"], None, inputs["attention_mask"], None, labels, **media(inputs)
        )
    _, positions, mask, _, embeds, spliced_labels = out
    assert positions is None
    return embeds, mask, spliced_labels


# -- the spliced layout, derived independently from the prompt ----------------------------------------------------


@dataclass
class Layout:
    real: torch.Tensor  # (B, L') bool: real positions of the spliced sequence
    visual: torch.Tensor  # (B, L') bool
    tokens: list[
        list[tuple[int, int, int, int]]
    ]  # per sample: (position, grid, row, col) of each visual token

    @property
    def pseudo(self) -> dict[str, torch.Tensor]:
        """Inputs the helpers' id-based masks understand: the placeholder id at visual positions."""
        return {
            "input_ids": torch.where(self.visual, IMAGE_TOKEN_INDEX, 5),
            "attention_mask": self.real.long(),
        }

    @property
    def text(self) -> torch.Tensor:
        return self.real & ~self.visual


def expected_layout(family: str, model, inputs, side: str) -> Layout:
    """Walk each sample's unpadded ids: a text token is one position, a placeholder one image's tokens (grids of
    side x side raster-ordered patches, several per image in Mini-Gemini HD), the row padded on `side`."""
    vision = model.get_vision_tower().config
    per_side = vision.image_size // vision.patch_size
    per_image = FAMILIES[family].tokens_per_image(model)
    assert per_image % (per_side * per_side) == 0
    grids_per_image = per_image // (per_side * per_side)
    samples = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"].bool(), strict=True):
        entries, grid = [], 0
        for token in ids[mask].tolist():
            if token != IMAGE_TOKEN_INDEX:
                entries.append(None)
                continue
            for _ in range(grids_per_image):
                entries += [(grid, r, c) for r in range(per_side) for c in range(per_side)]
                grid += 1
        samples.append(entries)
    length = max(len(entries) for entries in samples)
    real = torch.zeros(len(samples), length, dtype=torch.bool)
    visual = torch.zeros_like(real)
    tokens = []
    for b, entries in enumerate(samples):
        offset = length - len(entries) if side == "left" else 0
        real[b, offset : offset + len(entries)] = True
        tokens.append([(offset + i, *e) for i, e in enumerate(entries) if e is not None])
        for position, *_ in tokens[b]:
            visual[b, position] = True
    return Layout(real, visual, tokens)


def spliced_reference(ref_model, layer, dropped, embeds, mask, **extra) -> torch.Tensor:
    """Logits of the uncompressed decoder on the spliced sequence, `dropped` keys masked from `layer` on."""
    return helpers.reference_logits(
        ref_model, layer, dropped, {"inputs_embeds": embeds, "attention_mask": mask, **extra}
    )


FAMILY_NAMES = list(FAMILIES)


# -- 1. identity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_identity_keep_all(family, method, implementation, side, batch):
    model = fresh_model(family, implementation, side)
    inputs = make_inputs(family, model, batch, side)
    _, spliced_mask, _ = splice(model, inputs)
    layout = expected_layout(family, model, inputs, side)
    assert torch.equal(spliced_mask.bool(), layout.real)
    # batched generate is exact with left padding only (right: shorter rows start from a padding position)
    generates = side == "left" or batch == "b1"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
    expected_tokens = greedy(model, inputs).sequences if generates else None
    hooks = forward_hooks(model)

    assert tc.compress(model, make_compressor(method, 2, 1.0)) is model
    assert SPLICE in model.__dict__
    with torch.no_grad():
        logits = model(**inputs).logits
    check_kept_accounting(model, layout.pseudo, 2, 1.0)
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, layout.real, atol=1e-5)
    if generates:
        assert torch.equal(greedy(model, inputs).sequences, expected_tokens)

    assert tc.uncompress(model) is model
    assert SPLICE not in model.__dict__, "the instance wrapper of the splice was left behind"
    assert getattr(model, SPLICE).__func__ is getattr(type(model), SPLICE)
    with torch.no_grad():
        again = model(**inputs).logits
    assert torch.equal(again, expected)
    if generates:
        assert torch.equal(greedy(model, inputs).sequences, expected_tokens)
    assert_untouched(model, state, hooks)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_labels_are_carried_through_the_splice(family, method, side):
    """A forward with labels: the adapter probes the splice with its own labels and rebuilds the caller's, so the
    loss is the uncompressed model's at keep=1.0 and the masking reference's (on the model's own spliced labels)
    when tokens are dropped."""
    layer, keep = 2, 0.25
    model, ref_model = fresh_model(family, "sdpa", side), fresh_model(family, "sdpa", side)
    inputs = make_inputs(family, model, "b3", side)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = model(**inputs, labels=labels).loss
    with tc.compressed(model, make_compressor(method, layer, 1.0)), torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    assert abs(loss.item() - expected.item()) <= 1e-5

    # a dropped token's own output is undefined (removal equals masking holds at kept tokens): with tokens
    # dropped, leave out the labels an image's last token predicts, so every predicting token is text
    after_image = torch.zeros_like(labels, dtype=torch.bool)
    after_image[:, 1:] = inputs["input_ids"][:, :-1] == IMAGE_TOKEN_INDEX
    labels = labels.masked_fill(after_image, -100)
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    layout = expected_layout(family, model, inputs, side)
    dropped = dropped_from_stats(model, layer, layout.visual)
    assert dropped.any()
    embeds, mask, spliced_labels = splice(ref_model, inputs, labels)
    assert (spliced_labels[layout.visual] == -100).all()
    with torch.no_grad(), MaskingReference(ref_model, layer, dropped):
        reference = ref_model(inputs_embeds=embeds, attention_mask=mask, labels=spliced_labels).loss
    assert abs(loss.item() - reference.item()) <= ATOL
    with torch.no_grad():
        unpruned = ref_model(inputs_embeds=embeds, attention_mask=mask, labels=spliced_labels).loss
    assert abs(loss.item() - unpruned.item()) > 1e-4, "dropping tokens should change the loss"


# -- 2. removal equals masking ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,layer,keep", [("b1", 1, 0.5), ("b3", 1, 0.5), ("b3", 2, 0.25), ("b3", 3, 5)])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_removal_equals_masking(family, method, implementation, side, batch, layer, keep):
    model, ref_model = fresh_model(family, implementation, side), fresh_model(family, implementation, side)
    inputs = make_inputs(family, model, batch, side)
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        logits = model(**inputs).logits
    layout = expected_layout(family, model, inputs, side)
    kept = check_kept_accounting(model, layout.pseudo, layer, keep)
    if method == "fastv":
        eager = fresh_model(family, "eager", side)
        eager_embeds, eager_mask, _ = splice(eager, inputs)
        spliced = {"inputs_embeds": eager_embeds, "attention_mask": eager_mask}
        independent = fastv_kept(eager, spliced, layer, keep, None, visual=layout.visual)
        assert kept_visual(kept, layout.visual) == independent

    dropped = dropped_from_stats(model, layer, layout.visual)
    assert dropped.any(), "the setting should drop something"
    embeds, mask, _ = splice(ref_model, inputs)
    expected = spliced_reference(ref_model, layer, dropped, embeds, mask)
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, layout.text)
    assert_close_at(logits, expected, layout.real & ~dropped)


def test_reference_is_not_vacuous():
    """Masking dropped keys of the spliced sequence changes the logits; masking nothing is the model itself."""
    model = fresh_model("llava")
    inputs = make_inputs("llava", model, "b3", "right")
    layout = expected_layout("llava", model, inputs, "right")
    embeds, mask, _ = splice(model, inputs)
    with torch.no_grad():
        plain = model(**inputs).logits
    dropped = layout.visual & (torch.arange(layout.visual.shape[1]) % 2 == 0)
    masked = spliced_reference(model, 2, dropped, embeds, mask)
    assert (plain - masked)[layout.text & layout.visual.any(1, keepdim=True)].abs().max() > 1e-3
    same = spliced_reference(model, 2, torch.zeros_like(dropped), embeds, mask)
    assert_close_at(same, plain, layout.real, atol=1e-5)


# -- visual positions and grids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_visual_positions_follow_the_prompt(family, side, batch):
    """The positions the adapter marks visual, with their image (grid) and raster cell on the patch grid, are those
    derived from the prompt alone, in forward and in generate's prefill."""
    model = fresh_model(family, "sdpa", side)
    inputs = make_inputs(family, model, batch, side)
    layout = expected_layout(family, model, inputs, side)
    recorder = ViewRecorder()
    with tc.compressed(model, recorder), torch.no_grad():
        model(**inputs)
        assert tc.stats(model).prefill.layers[0].visual == layout.visual.sum(1).tolist()
        model.generate(**generate_kwargs(inputs), max_new_tokens=2, do_sample=False)
    prefill_views = [v for v in recorder.views if v.is_visual.any()]
    assert len(prefill_views) == 2
    for view in prefill_views:
        assert view.is_visual.shape == layout.visual.shape
        for b in range(layout.visual.shape[0]):
            assert observed(view, b) == layout.tokens[b]


# -- 3. cache -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side,batch", [("left", "b1"), ("right", "b1"), ("left", "b3")])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cache_greedy(family, method, implementation, side, batch):
    """Every decode step's logits with the pruned cache equal a full forward of the uncompressed decoder over the
    spliced prompt + generated tokens (at generate's positions) with the same tokens masked."""
    layer, keep, new_tokens = 2, 0.25, 5
    model = fresh_model(family, implementation, side)
    ref_model = fresh_model(family, implementation, side)
    inputs = make_inputs(family, model, batch, side)
    tc.compress(model, make_compressor(method, layer, keep))
    out = greedy(model, inputs, new_tokens)
    layout = expected_layout(family, model, inputs, side)
    check_kept_accounting(model, layout.pseudo, layer, keep)
    dropped = dropped_from_stats(model, layer, layout.visual)
    assert dropped.any()
    # generate was given inputs_embeds only: it returns the new tokens
    assert out.sequences.shape == (layout.real.shape[0], new_tokens) and len(out.logits) == new_tokens

    embeds, mask, _ = splice(ref_model, inputs)
    prompt = embeds.shape[1]
    with torch.no_grad():
        full_embeds = torch.cat([embeds, ref_model.get_model().embed_tokens(out.sequences)], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(out.sequences)], dim=1)
    expected = spliced_reference(
        ref_model, layer, dropped, full_embeds, full_mask, position_ids=generation_positions(full_mask)
    )
    assert_steps_match(out.logits, expected, prompt)
    # the pruned cache holds only kept tokens from layer K on, and the stats say so
    check_pruned_cache(model, out.past_key_values, layer, prompt + new_tokens - 1)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_manual_decode_loop_right_padding(family, method, implementation):
    """A right-padded batch decoded by hand: prefill, then each step's token with the spliced mask extended by
    ones and explicit positions continuing each row's count; equals the reference's full forward."""
    layer, keep, side = 2, 0.25, "right"
    model, ref_model = fresh_model(family, implementation, side), fresh_model(family, implementation, side)
    inputs = make_inputs(family, model, "b3", side)
    embeds, mask, _ = splice(ref_model, inputs)
    rows, prompt = mask.shape
    lengths = mask.sum(1)
    assert (lengths < prompt).any(), "the batch should be padded"
    steps = torch.tensor([[17, 42, 99], [5, 6, 7], [120, 3, 64]])
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        dropped = dropped_from_stats(model, layer, expected_layout(family, model, inputs, side).visual)
        actual = [out.logits[torch.arange(rows), lengths - 1]]
        step_mask = mask
        for t in range(steps.shape[1]):
            step_mask = torch.cat([step_mask, torch.ones(rows, 1, dtype=mask.dtype)], dim=1)
            out = model(
                input_ids=steps[:, t : t + 1],
                attention_mask=step_mask,
                position_ids=(lengths + t)[:, None],
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            actual.append(out.logits[:, -1])
    assert dropped.any()
    with torch.no_grad():
        full_embeds = torch.cat([embeds, ref_model.get_model().embed_tokens(steps)], dim=1)
    positions = torch.cat(
        [torch.arange(prompt).expand(rows, prompt), lengths[:, None] + torch.arange(steps.shape[1])], dim=1
    )
    expected = spliced_reference(ref_model, layer, dropped, full_embeds, step_mask, position_ids=positions)
    wanted = [expected[torch.arange(rows), lengths - 1]]
    wanted += [expected[:, prompt + t] for t in range(steps.shape[1])]
    for step, (a, e) in enumerate(zip(actual, wanted, strict=True)):
        difference = (a - e).abs().max().item()
        assert difference <= ATOL, f"step {step}: max |difference| {difference:.3g} > {ATOL}"


# -- 4. backends --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_eager_matches_sdpa(family, method, side):
    layer, keep = 2, 0.25
    results = {}
    for implementation in IMPLEMENTATIONS:
        model = fresh_model(family, implementation, side)
        inputs = make_inputs(family, model, "b3", side)
        tc.compress(model, make_compressor(method, layer, keep))
        with torch.no_grad():
            logits = model(**inputs).logits
        results[implementation] = (logits, kept_sets(model, layer, logits.shape[0]))
    (eager, eager_kept), (sdpa, sdpa_kept) = results["eager"], results["sdpa"]
    layout = expected_layout(family, model, inputs, side)
    assert eager_kept == sdpa_kept
    assert_close_at(eager, sdpa, layout.text)


# -- 5. accounting ------------------------------------------------------------------------------------------


def _measure(model, fn) -> tuple[int, object]:
    """FLOPs the counter attributes to the decoder (`model.model`'s own forward: the splice, vision towers and
    projector run outside it) and the LM head."""
    root = type(model).__name__
    return measure_flops(fn, (f"{root}.model", f"{root}.lm_head"))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_flops_match_counter(family, implementation):
    model = fresh_model(family, implementation, "right")
    inputs = make_inputs(family, model, "b3", "right")
    _, spliced_mask, _ = splice(model, inputs)
    check_flops_match_counter(
        model,
        inputs,
        spliced_mask,
        lambda mask: spliced_mask.sum(1, keepdim=True),
        measure=functools.partial(_measure, model),
    )


# -- 6. bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_more_placeholders_than_images_raises_before_vision(family):
    model = fresh_model(family)
    inputs = make_inputs(family, model, "b3", "right")
    placeholders = int((inputs["input_ids"] == IMAGE_TOKEN_INDEX).sum())
    inputs = {**inputs, **{k: v[: placeholders - 1] for k, v in media(inputs).items()}}
    check_raises_before_vision(model, FAMILIES[family].towers(model), inputs, generate_kwargs(inputs))
