"""The invariants of DESIGN.md on a faithful tiny LLaVA-HR stand-in (`llava_hr_standin`), for FastV and RandomDrop.

LLaVA-HR uses the OLDER LLaVA splice: padding is not removed (the whole padded row is spliced), rows are
right-padded with zeros, the mask gets one extra True per image token on the LEFT (right for right-padded rows,
HR's collator padding), no position_ids (the decoder numbers every row 0..L-1). Its forward always splices, so
every reference here is the uncompressed model's own forward on the same prompt (its decoder then runs on the
very spliced `inputs_embeds` the compressed model gets), with `reference.MaskingReference` masking the dropped keys
from layer K on. Which spliced positions are visual is derived independently from the prompt.

HR's own code crashes (UnboundLocalError) on `labels=None` when rows splice to different lengths (different image
counts per row); the adapter's label probe makes that batch run. It is checked against HR's labelled path.
Greedy decoding is checked with batch 1 (HR's decode step attends padding: it evaluates with batch 1).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import helpers
import pytest
import torch
from helpers import (
    ViewRecorder,
    assert_close_at,
    assert_steps_match,
    assert_untouched,
    check_raises_before_vision,
    dropped_from_stats,
    forward_hooks,
    kept_visual,
    make_compressor,
    observed,
)
from llava_hr_standin import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    image_token_count,
    tiny_llava_hr,
    tiny_llava_hr_inputs,
)
from reference import MaskingReference, fastv_kept
from torch import nn

import tokencompress as tc

NUM_LAYERS = 4
IMPLEMENTATIONS = ["eager", "sdpa"]
METHODS = ["fastv", "random"]
SPLICE = "prepare_inputs_labels_for_multimodal"

# (prompt lengths (prefix, suffix) per sample, images per sample), right-padded as HR's collator pads
BATCHES = {
    "b1": ([(3, 5)], [1]),
    # padded rows with one image each: the same spliced length, so HR's own labels=None path runs
    "padded": ([(3, 5), (1, 2), (2, 1)], [1, 1, 1]),
}
# rows with different image counts splice to different lengths: HR's own forward needs labels there
MIXED = ([(3, 5), (1, 2)], [1, 2])

visual_mask, text_mask, check_kept_accounting = helpers.bind((IMAGE_TOKEN_INDEX,), NUM_LAYERS)


@functools.cache
def _pristine(implementation: str) -> nn.Module:
    return tiny_llava_hr(layers=NUM_LAYERS, attn_implementation=implementation)


def fresh_model(implementation: str = "sdpa") -> nn.Module:
    """A new, never compressed tiny LLaVA-HR; the same weights under both implementations."""
    return copy.deepcopy(_pristine(implementation))


def make_inputs(model, batch) -> dict[str, torch.Tensor]:
    lengths, images = BATCHES[batch] if isinstance(batch, str) else batch
    return tiny_llava_hr_inputs(model, lengths, images)


def probe_labels(inputs) -> torch.Tensor:
    """Labels as HR's training data carries them: the ids, ignored at placeholders and padding."""
    ids = inputs["input_ids"]
    return ids.masked_fill((ids == IMAGE_TOKEN_INDEX) | ~inputs["attention_mask"].bool(), IGNORE_INDEX)


# -- the spliced layout, derived independently from the prompt ---------------------------------------------------


@dataclass
class Layout:
    real: torch.Tensor  # (B, L') bool
    visual: torch.Tensor  # (B, L') bool
    tokens: list[list[tuple[int, int, int, int]]]  # per sample: (position, image, row, col) per visual token

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


def expected_layout(model, inputs) -> Layout:
    """Walk each WHOLE padded row (HR does not remove padding): an id is one position, a placeholder one image's
    side x side raster patches; a pad id is a position that is not real; rows end with zero padding."""
    vision = model.get_vision_tower().config
    side = vision.image_size // vision.patch_size
    assert image_token_count(model) == side * side
    samples = []
    for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), strict=True):
        entries, image = [], 0
        for token, real in zip(ids, mask, strict=True):
            if token == IMAGE_TOKEN_INDEX and real:
                entries += [(True, (image, r, c)) for r in range(side) for c in range(side)]
                image += 1
            else:
                entries.append((bool(real), None))
        samples.append(entries)
    length = max(len(e) for e in samples)
    real = torch.zeros(len(samples), length, dtype=torch.bool)
    visual = torch.zeros_like(real)
    tokens = []
    for b, entries in enumerate(samples):
        tokens.append([(i, *cell) for i, (_, cell) in enumerate(entries) if cell is not None])
        for i, (is_real, cell) in enumerate(entries):
            real[b, i] = is_real
            visual[b, i] = cell is not None
    return Layout(real, visual, tokens)


def spliced_mask(model, inputs, labels=None) -> torch.Tensor:
    """The attention mask HR's own splice builds (uncompressed model)."""
    assert SPLICE not in model.__dict__
    with torch.no_grad():
        out = getattr(model, SPLICE)(
            inputs["input_ids"], inputs["attention_mask"], None, labels, inputs["images"]
        )
    assert out[0] is None and len(out) == 5
    return out[1].bool()


def reference_logits(ref_model, layer, dropped, inputs, **extra) -> torch.Tensor:
    """The uncompressed model's own forward (its splice, then its decoder on those inputs_embeds), `dropped` keys
    masked from `layer` on."""
    with torch.no_grad(), MaskingReference(ref_model, layer, dropped) as reference:
        logits = ref_model(**inputs, **extra).logits
    assert reference.calls > 0
    return logits


class _Decoder(nn.Module):
    """HR's decoder alone on spliced embeddings (HR's forward cannot take inputs_embeds: it always re-splices)."""

    def __init__(self, hr: nn.Module) -> None:
        super().__init__()
        self.hr, self.config = hr, hr.config

    def forward(self, **kwargs):
        return self.hr.get_model()(**kwargs)


def spliced_embeds(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = getattr(model, SPLICE)(
            inputs["input_ids"], inputs["attention_mask"], None, None, inputs["images"]
        )
    return out[3], out[1]


# -- 0. the stand-in reproduces HR's own properties -------------------------------------------------------------


def test_standin_splice_properties():
    """The spliced mask is HR's: extra Trues on the left, the original mask, False for new padding; and HR's
    labels=None crash on rows of different spliced length."""
    model = fresh_model()
    inputs = make_inputs(model, "padded")
    n = image_token_count(model)
    mask = spliced_mask(model, inputs)
    assert torch.equal(mask, expected_layout(model, inputs).real)
    mixed = make_inputs(model, MIXED)
    with pytest.raises(UnboundLocalError), torch.no_grad():
        model(**mixed)
    labelled = spliced_mask(model, mixed, labels=probe_labels(mixed))
    for b, (ids, row_mask) in enumerate(zip(mixed["input_ids"], mixed["attention_mask"], strict=True)):
        extra = (n - 1) * int((ids == IMAGE_TOKEN_INDEX).sum())
        pad = labelled.shape[1] - extra - ids.shape[0]
        expected = torch.cat([torch.ones(extra), row_mask.float(), torch.zeros(pad)]).bool()
        assert torch.equal(labelled[b], expected)


# -- 1. identity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_keep_all(method, implementation, batch):
    model = fresh_model(implementation)
    inputs = make_inputs(model, batch)
    where = expected_layout(model, inputs).real
    labels = probe_labels(inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
        expected_loss = model(**inputs, labels=labels).loss
        if batch == "b1":
            expected_tokens = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    hooks = forward_hooks(model)

    assert tc.compress(model, make_compressor(method, 2, 1.0)) is model
    with torch.no_grad():
        logits = model(**inputs).logits
        check_kept_accounting(model, expected_layout(model, inputs).pseudo, 2, 1.0)
        loss = model(**inputs, labels=labels).loss
        if batch == "b1":
            tokens = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, where, atol=1e-5)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)
    if batch == "b1":
        assert torch.equal(tokens, expected_tokens)

    assert tc.uncompress(model) is model
    assert SPLICE not in model.__dict__
    with torch.no_grad():
        again = model(**inputs).logits
    assert torch.equal(again, expected)
    assert_untouched(model, state, hooks)


# -- 2. removal equals masking ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch,layer,keep", [("b1", 1, 0.5), ("padded", 1, 0.5), ("padded", 2, 0.25), ("padded", 3, 5)]
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_removal_equals_masking(method, implementation, batch, layer, keep):
    model, ref_model = fresh_model(implementation), fresh_model(implementation)
    inputs = make_inputs(model, batch)
    layout = expected_layout(model, inputs)
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        logits = model(**inputs).logits
    kept = check_kept_accounting(model, layout.pseudo, layer, keep)
    if method == "fastv":
        eager = fresh_model("eager")
        embeds, mask = spliced_embeds(eager, inputs)
        independent = fastv_kept(
            _Decoder(eager),
            {"inputs_embeds": embeds, "attention_mask": mask},
            layer,
            keep,
            None,
            layout.visual,
        )
        assert kept_visual(kept, layout.visual) == independent

    dropped = dropped_from_stats(model, layer, layout.visual)
    assert dropped.any(), "the setting should drop something"
    expected = reference_logits(ref_model, layer, dropped, inputs)
    assert logits.shape == expected.shape
    assert_close_at(logits, expected, layout.text)
    assert_close_at(logits, expected, layout.real & ~dropped)


@pytest.mark.parametrize("method", METHODS)
def test_rows_of_different_length_run_with_the_probe(method):
    """HR's own forward raises on this batch with labels=None; compressed, the adapter's label probe makes it run,
    and the result is HR's labelled path (identity at keep=1.0, the masking reference otherwise); the caller's
    labels give HR's own loss."""
    model, ref_model = fresh_model(), fresh_model()
    inputs = make_inputs(model, MIXED)
    labels = probe_labels(inputs)
    layout = expected_layout(model, inputs)
    real = spliced_mask(ref_model, inputs, labels=labels)
    visual = torch.zeros_like(real)
    for b, cells in enumerate(layout.tokens):  # the whole row spliced, zero padding appended: same positions
        visual[b, [position for position, *_ in cells]] = True
    assert torch.equal(real[:, : layout.real.shape[1]], layout.real)
    with torch.no_grad():
        expected = ref_model(**inputs, labels=labels)

    with tc.compressed(model, make_compressor(method, 2, 1.0)), torch.no_grad():
        assert_close_at(model(**inputs).logits, expected.logits, real, atol=1e-5)
        torch.testing.assert_close(model(**inputs, labels=labels).loss, expected.loss, atol=1e-5, rtol=0)

    tc.compress(model, make_compressor(method, 1, 0.5))
    with torch.no_grad():
        logits = model(**inputs).logits
    dropped = dropped_from_stats(model, 1, visual)
    assert int(dropped.sum()) == sum(int(v.sum()) - int(v.sum()) // 2 for v in visual)
    reference = reference_logits(ref_model, 1, dropped, inputs, labels=labels)
    assert_close_at(logits, reference, real & ~dropped)


# -- 3. the visual positions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", list(BATCHES))
def test_visual_positions_follow_the_prompt(batch):
    """The positions the adapter marks visual, with their image and raster cell, are those derived from the
    prompt alone (whole padded rows spliced), in a forward and in generate's prefill."""
    model = fresh_model()
    inputs = make_inputs(model, batch)
    layout = expected_layout(model, inputs)
    recorder = ViewRecorder()
    with tc.compressed(model, recorder), torch.no_grad():
        model(**inputs)
        assert tc.stats(model).prefill.layers[0].visual == layout.visual.sum(1).tolist()
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    prefill_views = [v for v in recorder.views if v.is_visual.any()]
    assert len(prefill_views) == 2
    for view in prefill_views:
        assert view.is_visual.shape == layout.visual.shape
        for b in range(layout.visual.shape[0]):
            assert observed(view, b) == layout.tokens[b]


# -- 4. greedy decoding (batch 1) -------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_cache_greedy(method, implementation):
    """Each decode step's logits equal the uncompressed model's full forward over prompt + generated tokens under
    the masking reference (the prompt's dropped keys masked from layer K on)."""
    model, ref_model = fresh_model(implementation), fresh_model(implementation)
    inputs = make_inputs(model, "b1")
    layout = expected_layout(model, inputs)
    layer, keep, new = 2, 0.5, 5
    tc.compress(model, make_compressor(method, layer, keep))
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    dropped = dropped_from_stats(model, layer, layout.visual)
    assert dropped.any()
    full = {**inputs, "input_ids": out.sequences, "attention_mask": torch.ones_like(out.sequences)}
    logits = reference_logits(ref_model, layer, dropped, full)
    prompt = layout.real.shape[1]
    assert len(out.logits) == new
    assert_steps_match(out.logits, logits, prompt)


# -- 5. bad input ---------------------------------------------------------------------------------------------


def test_more_placeholders_than_images_raises_before_vision():
    model = fresh_model()
    inputs = make_inputs(model, "padded")
    placeholders = int((inputs["input_ids"] == IMAGE_TOKEN_INDEX).sum())
    inputs = {**inputs, "images": inputs["images"][: placeholders - 1]}
    check_raises_before_vision(model, [model.get_vision_tower()], inputs)
