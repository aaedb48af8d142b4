"""The shapes task: answers agree with the pixels drawn, samples are reproducible, the tokenizer covers every
question and answer, and the batches and auxiliary targets the training script and the demo build are right."""

from __future__ import annotations

import collections
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from tokencompress.synthetic import (
    BACKGROUND_RGB,
    COLOURS,
    GLOBAL_TYPES,
    LETTERS,
    NUMBERS,
    PLACES,
    QUESTION_TYPES,
    QWEN_SPECIAL,
    SHAPES,
    TRAINING_TYPES,
    QwenWordTokenizer,
    ShapesTask,
    WordTokenizer,
    answer_cell,
    cell_targets,
    encode,
    encode_qwen2_vl,
    qwen2_vl_patches,
)

SIZE = 96
CELL = SIZE // 3


def cell_pixels(image: torch.Tensor, place: int) -> torch.Tensor:
    """(3, n) the pixels of one cell."""
    top, left = (place // 3) * CELL, (place % 3) * CELL
    return image[:, top : top + CELL, left : left + CELL].flatten(1)


def close_to(pixels: torch.Tensor, rgb: tuple[float, float, float], tolerance: float = 0.12) -> torch.Tensor:
    return (pixels - torch.tensor(rgb)[:, None]).abs().amax(0) < tolerance


@pytest.mark.parametrize("index", range(40))
def test_answers_agree_with_the_pixels(index):
    """Read every answer back from the image itself: the background colour covers the empty cells, each object's
    colour covers a fair share of its cell, the count is the number of non-empty cells, and the place named in a
    question holds what the answer says."""
    sample = ShapesTask(seed=3, image_size=SIZE).sample(index)
    image = sample.image
    for place, item in enumerate(sample.cells):
        pixels = cell_pixels(image, place)
        background = close_to(pixels, BACKGROUND_RGB[sample.background]).float().mean()
        if item is None:
            assert background > 0.95
            continue
        share = close_to(pixels, COLOURS[item.colour]).float().mean()
        assert share > 0.12, (item, share)
    if sample.qtype == "background":
        assert sample.answer == sample.background
    elif sample.qtype == "count":
        assert sample.answer == NUMBERS[sum(c is not None for c in sample.cells)]
    elif sample.qtype in ("colour", "shape", "letter"):
        place = next(i for i, p in enumerate(PLACES) if f"in the {p} cell" in sample.question)
        item = sample.cells[place]
        expected = item.colour if sample.qtype == "colour" else item.name
        assert sample.answer == expected
        assert (item.kind == "letter") == (sample.qtype == "letter") or sample.qtype == "colour"
    else:  # left_of: the object right of the answer is the one named, and it is unique
        named = sample.question.removeprefix("what is left of the ").removesuffix(" ?")
        colour, noun = named.split(" ")
        matches = [
            i
            for i, c in enumerate(sample.cells)
            if c is not None
            and c.colour == colour
            and (c.name if c.kind == "shape" else f"letter-{c.name}") == noun
        ]
        assert len(matches) == 1 and matches[0] % 3 != 0
        left = sample.cells[matches[0] - 1]
        assert sample.answer == (left.name if left.kind == "shape" else f"letter-{left.name}")


def test_shapes_and_letters_differ_in_pixels():
    """Each shape and letter has its own mask (a model can tell them apart at all)."""
    from tokencompress.synthetic import Item, _item_mask

    masks = [_item_mask(Item("shape", s, "red"), CELL) for s in SHAPES]
    masks += [_item_mask(Item("letter", letter, "red"), CELL) for letter in LETTERS]
    for i in range(len(masks)):
        assert masks[i].float().mean() > 0.15
        for j in range(i):
            assert (masks[i] ^ masks[j]).float().mean() > 0.05


def test_reproducible_and_splits_differ():
    a, b, other = ShapesTask(seed=0), ShapesTask(seed=0), ShapesTask(seed=1)
    for index in (0, 7, 123):
        first, second = a.sample(index), b.sample(index)
        assert torch.equal(first.image, second.image) and first.question == second.question
    assert any(a.sample(i).cells != other.sample(i).cells for i in range(5))


def test_every_question_type_appears_and_tokenizes():
    task, tokenizer = ShapesTask(seed=0), WordTokenizer()
    counts = collections.Counter()
    for index in range(600):
        sample = task.sample(index)
        counts[sample.qtype] += 1
        ids = tokenizer.encode(sample.question + " " + sample.answer)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == sample.question + " " + sample.answer
        assert len(tokenizer.encode(sample.answer)) == 1  # one-word answers
    assert set(counts) == set(QUESTION_TYPES)
    assert sum(counts[q] for q in GLOBAL_TYPES) < 0.5 * sum(counts.values())  # most need fine detail


@pytest.mark.parametrize("index", range(12))
def test_training_only_object_questions_name_what_the_pixels_show(index):
    """Training-only "what is in the <place> cell ?": the cell's pixels of the object's colour draw exactly the
    answer noun's mask (a shape, or the letter-x word left_of answers with), the answer cell is that place, and
    the question and answer tokenize without unknown words."""
    from tokencompress.synthetic import Item, _item_mask

    sample = ShapesTask(seed=4, question_types=("object",)).sample(index)
    place = next(i for i, p in enumerate(PLACES) if sample.question == f"what is in the {p} cell ?")
    item = sample.cells[place]
    drawn = close_to(cell_pixels(sample.image, place), COLOURS[item.colour]).view(CELL, CELL)
    kind, name = (
        ("letter", sample.answer[7:]) if sample.answer.startswith("letter-") else ("shape", sample.answer)
    )
    assert (drawn == _item_mask(Item(kind, name, item.colour), CELL)).float().mean() > 0.97
    assert answer_cell(sample) == place
    ids = WordTokenizer().encode(sample.question + " " + sample.answer)
    assert WordTokenizer().unk_token_id not in ids and len(WordTokenizer().encode(sample.answer)) == 1


def test_held_out_split_never_asks_training_only_types():
    task = ShapesTask(seed=1)
    assert not {task.sample(i).qtype for i in range(300)} & set(TRAINING_TYPES)
    assert not set(TRAINING_TYPES) & set(QUESTION_TYPES)


def test_question_type_subset_and_bad_arguments():
    task = ShapesTask(seed=0, question_types=("letter",))
    assert {task.sample(i).qtype for i in range(20)} == {"letter"}
    with pytest.raises(ValueError, match="multiple of 3"):
        ShapesTask(image_size=100)
    with pytest.raises(ValueError, match="unknown question types"):
        ShapesTask(question_types=("colour", "size"))


def test_encode_left_pads_and_supervises_the_answer_only():
    task, tokenizer = ShapesTask(seed=2), WordTokenizer()
    samples = [task.sample(i) for i in range(3)]
    batch = encode(tokenizer, samples, image_tokens=16, with_answers=True)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    for row, sample in enumerate(samples):
        real = ids[row][mask[row].bool()].tolist()
        assert bool((mask[row][1:] >= mask[row][:-1]).all())  # left padded
        assert real[0] == tokenizer.bos_token_id and real[1:17] == [tokenizer.image_token_id] * 16
        text = tokenizer.decode(real[17:])
        assert text == f"question : {sample.question} answer : {sample.answer}"
        supervised = labels[row][labels[row] != -100].tolist()
        assert supervised == [*tokenizer.encode(sample.answer), tokenizer.eos_token_id]
        assert real[-2:] == supervised
    plain = encode(tokenizer, samples, image_tokens=16)
    assert "labels" not in plain
    assert tokenizer.decode(plain["input_ids"][0][plain["attention_mask"][0].bool()][-2:]) == "answer :"


def test_cell_targets_follow_the_cells():
    task = ShapesTask(seed=4)
    samples = [task.sample(i) for i in range(2)]
    colour, kind = cell_targets(samples, side=12)
    assert colour.shape == kind.shape == (2, 144)
    objects = list(SHAPES) + list(LETTERS)
    for b, sample in enumerate(samples):
        for token in range(144):
            row, col = divmod(token, 12)
            item = sample.cells[(row // 4) * 3 + col // 4]
            assert colour[b, token] == (0 if item is None else 1 + list(COLOURS).index(item.colour))
            assert kind[b, token] == (0 if item is None else 1 + objects.index(item.name))


# -- the LLaVA vocabulary stays put; the Qwen2-VL encoding ------------------------------------------------------
# The shipped shapes LLaVA was trained with this vocabulary (72 words, these ids): a hash of it, in id order.
LLAVA_VOCAB_SHA256 = "0127001f591678dd4575ee29932ff3eba8814803a1c89969b28fe4a2168205cb"
ASSET_CONFIG = Path(__file__).parents[1] / "tokencompress" / "assets" / "shapes_llava" / "config.json"


def test_llava_vocabulary_is_the_shipped_models():
    tokenizer = WordTokenizer()
    assert hashlib.sha256(" ".join(tokenizer.vocab).encode()).hexdigest() == LLAVA_VOCAB_SHA256
    config = json.loads(ASSET_CONFIG.read_text())
    assert len(tokenizer) == config["text_config"]["vocab_size"] == 72
    assert tokenizer.image_token_id == config["image_token_index"]
    assert tokenizer.pad_token_id == config["pad_token_id"] == config["text_config"]["pad_token_id"]
    assert tokenizer.bos_token_id == config["text_config"]["bos_token_id"]
    assert tokenizer.eos_token_id == config["text_config"]["eos_token_id"]


def test_qwen_tokenizer_appends_its_placeholders():
    words, qwen = WordTokenizer(), QwenWordTokenizer()
    assert qwen.vocab[: len(words)] == words.vocab  # every LLaVA id unchanged
    assert qwen.vocab[len(words) :] == list(QWEN_SPECIAL) and len(qwen) == len(words) + 4
    ids = {qwen.vision_start_token_id, qwen.vision_end_token_id, qwen.image_token_id, qwen.video_token_id}
    assert ids == set(range(len(words), len(words) + 4))
    assert qwen.vocab[qwen.image_token_id] == "<|image_pad|>"
    for name in ("pad_token_id", "unk_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(qwen, name) == getattr(words, name)
    text = "what shape is in the top left cell ?"
    assert qwen.encode(text) == words.encode(text)
    assert qwen.decode([qwen.vision_start_token_id, *qwen.encode(text), qwen.image_token_id]) == text
    assert words.image_token_id == 4 and "<|image_pad|>" not in words.index  # LLaVA's tokenizer untouched


def _turns(task, samples, count):
    return [[task.reask(s, random.Random(i)) for _ in range(count)] for i, s in enumerate(samples)]


def test_followup_turns_supervise_every_answer():
    """With followups each row is `... answer : A1 </s> question : ... answer : A2 </s> ...`, labels on the answers
    and their </s> only, in both encodings; the image span is the same as without followups."""
    task = ShapesTask(seed=5)
    samples = [task.sample(i) for i in range(3)]
    followups = _turns(task, samples, 2)
    for tokenizer, batch, skip in (
        (WordTokenizer(), encode(WordTokenizer(), samples, 16, True, followups), 17),
        (QwenWordTokenizer(), encode_qwen2_vl(QwenWordTokenizer(), samples, True, followups), 147),
    ):
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        for row, sample in enumerate(samples):
            turns = [sample, *followups[row]]
            real = ids[row][mask[row].bool()].tolist()
            expected = " ".join(f"question : {t.question} answer : {t.answer}" for t in turns)
            assert tokenizer.decode(real[skip:]) == expected
            assert real[skip:].count(tokenizer.eos_token_id) == 3 and real[-1] == tokenizer.eos_token_id
            supervised = labels[row][labels[row] != -100].tolist()
            assert supervised == [
                i for t in turns for i in (*tokenizer.encode(t.answer), tokenizer.eos_token_id)
            ]
    with pytest.raises(ValueError, match="followups"):
        encode_qwen2_vl(QwenWordTokenizer(), samples, followups=followups)


def test_qwen_prompt_layout():
    """`<s> <|vision_start|> <|image_pad|> x 144 <|vision_end|> question : ... answer :`, left padded;
    mm_token_type_ids is 1 exactly at the image pads; one (1, 24, 24) grid and 576 patches per image."""
    task, tokenizer = ShapesTask(seed=2), QwenWordTokenizer()
    samples = [task.sample(i) for i in range(3)]
    batch = encode_qwen2_vl(tokenizer, samples, with_answers=True)
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
        "labels",
    }
    ids, mask, types, labels = (
        batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels")
    )
    assert batch["image_grid_thw"].tolist() == [[1, 24, 24]] * 3
    assert batch["pixel_values"].shape == (3 * 576, 3 * 2 * 4 * 4)
    for row, sample in enumerate(samples):
        real = ids[row][mask[row].bool()].tolist()
        assert bool((mask[row][1:] >= mask[row][:-1]).all())  # left padded
        assert real[:2] == [tokenizer.bos_token_id, tokenizer.vision_start_token_id]
        assert real[2:146] == [tokenizer.image_token_id] * 144 and real[146] == tokenizer.vision_end_token_id
        assert tokenizer.decode(real[147:]) == f"question : {sample.question} answer : {sample.answer}"
        assert (
            tokenizer.vision_start_token_id not in real[147:] and tokenizer.image_token_id not in real[147:]
        )
        pads = [int(i == tokenizer.image_token_id) for i in ids[row].tolist()]
        assert types[row].tolist() == pads
        supervised = labels[row][labels[row] != -100].tolist()
        assert supervised == [*tokenizer.encode(sample.answer), tokenizer.eos_token_id] == real[-2:]
    plain = encode_qwen2_vl(tokenizer, samples)
    assert "labels" not in plain
    assert tokenizer.decode(plain["input_ids"][0][plain["attention_mask"][0].bool()][-2:]) == "answer :"
    with pytest.raises(ValueError, match="multiple of"):
        qwen2_vl_patches(torch.zeros(1, 3, 36, 36))  # 36 px: not a whole number of 8 px merge windows


def test_qwen_patches_are_the_image_processors():
    """The same pixel_values and grids as Qwen2VLImageProcessor given the same patching and told not to resize,
    rescale or normalise (its resize rounds through 8-bit pixels, even at 96 x 96)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    task = ShapesTask(seed=6)
    images = torch.stack([task.sample(i).image for i in range(3)])
    processor = Qwen2VLImageProcessorPil(
        do_resize=False,
        do_rescale=False,
        do_normalize=False,
        do_convert_rgb=False,
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
    )
    reference = processor([image.numpy() for image in images], return_tensors="pt")
    pixels, grid = qwen2_vl_patches(images, patch_size=4, merge_size=2, temporal_patch_size=2)
    assert torch.equal(grid, reference["image_grid_thw"])
    assert torch.equal(pixels, reference["pixel_values"].float())
    batch = encode_qwen2_vl(QwenWordTokenizer(), [task.sample(i) for i in range(3)])
    assert torch.equal(batch["pixel_values"], pixels)


def _located_patches(count: int = 2) -> list[list[tuple[int, int]]]:
    """For each of `count` 96 px images, where each of its flattened patches (3 x 2 frames x 4 x 4) lies on the
    24 x 24 grid of 4 px patches, read off images whose pixels spell their own coordinates (channel 0: the row,
    1: the column, 2: the image): a patch lies at its first pixel's (row, column) / 4 and holds exactly the 4 x 4
    pixels there, in both frames."""
    rows = torch.arange(SIZE, dtype=torch.float)[:, None].expand(SIZE, SIZE)
    images = torch.stack([torch.stack([rows, rows.T, torch.full_like(rows, b)]) for b in range(count)])
    pixels, _ = qwen2_vl_patches(images, patch_size=4, merge_size=2, temporal_patch_size=2)
    patches = pixels.reshape(count, 576, 3, 2, 4, 4)
    located = []
    for b in range(count):
        where = []
        for patch in patches[b]:
            assert torch.equal(patch[:, 0], patch[:, 1])  # a still image: the frames repeat
            y, x, image = (int(v) for v in patch[:, 0, 0, 0])
            assert image == b and y % 4 == 0 and x % 4 == 0
            assert torch.equal(patch[:, 0], images[b, :, y : y + 4, x : x + 4])
            where.append((y // 4, x // 4))
        assert sorted(where) == [(i, j) for i in range(24) for j in range(24)]  # each patch once
        located.append(where)
    return located


def test_merged_tokens_are_raster_order_and_their_cells_match_the_pixels():
    """Merged token k of an image is the run of 4 patches pixel_values[4k : 4k + 4] (what the visual merger joins):
    they form the 2 x 2 window at merged row k // 12, column k % 12, in raster order, and hold exactly the shapes
    image's pixels there; so `cell_targets(samples, 12)` gives each merged token its cell, checked here against
    the pixels: a token of an empty cell shows only background, one of an object's cell lies in a cell where that
    object's colour shows."""
    task = ShapesTask(seed=7)
    samples = [task.sample(i) for i in range(3)]
    pixels, _ = qwen2_vl_patches(torch.stack([s.image for s in samples]))
    colour, kind = cell_targets(samples, side=12)
    colours, objects = list(COLOURS), list(SHAPES) + list(LETTERS)
    located = _located_patches(len(samples))
    for b, sample in enumerate(samples):
        where = located[b]
        patches = pixels[b * 576 : (b + 1) * 576].reshape(576, 3, 2, 4, 4)[:, :, 0]
        for patch, (y, x) in zip(patches, where, strict=True):
            assert torch.equal(patch, sample.image[:, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4])
        for token in range(144):
            window = where[4 * token : 4 * token + 4]
            row, col = window[0][0] // 2, window[0][1] // 2
            assert (row, col) == divmod(token, 12)
            assert window == [(2 * row + i, 2 * col + j) for i in range(2) for j in range(2)]
            top, left = 8 * row, 8 * col  # the token's 8 x 8 pixels, and the 32 x 32 cell that holds them
            place = (top // CELL) * 3 + left // CELL
            item = sample.cells[place]
            block = sample.image[:, top : top + 8, left : left + 8].flatten(1)
            if colour[b, token] == 0:
                assert item is None and kind[b, token] == 0
                assert bool(close_to(block, BACKGROUND_RGB[sample.background]).all())
                continue
            named = colours[int(colour[b, token]) - 1]
            assert named == item.colour and objects[int(kind[b, token]) - 1] == item.name
            assert close_to(cell_pixels(sample.image, place), COLOURS[named]).float().mean() > 0.12


def test_qwen2_vl_positions_follow_the_pixels():
    """A Qwen2-VL given this encoding places each patch and each merged token where its pixels are: the vision
    tower's rotary (h, w) of every patch is the patch's located position, and the decoder's M-RoPE (h, w) of merged
    token k, relative to the image's first token, is the merged window holding its pixels."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.vision_utils import get_vision_position_ids

    tokenizer, task = QwenWordTokenizer(), ShapesTask(seed=8)
    samples = [task.sample(i) for i in range(2)]
    batch = encode_qwen2_vl(tokenizer, samples)
    config = Qwen2VLConfig(
        text_config=dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 4, 4]},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1, embed_dim=32, num_heads=2, hidden_size=48, patch_size=4, spatial_merge_size=2
        ),
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.vision_start_token_id,
        vision_end_token_id=tokenizer.vision_end_token_id,
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    vision_positions = get_vision_position_ids(batch["image_grid_thw"], 2).tolist()
    positions, _ = model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    for b, where in enumerate(_located_patches(len(samples))):
        assert [tuple(p) for p in vision_positions[b * 576 : (b + 1) * 576]] == where
        image = batch["input_ids"][b] == tokenizer.image_token_id
        h, w = positions[1, b, image], positions[2, b, image]
        merged = list(zip((h - h[0]).tolist(), (w - w[0]).tolist(), strict=True))
        assert merged == [(where[4 * k][0] // 2, where[4 * k][1] // 2) for k in range(144)]
    with torch.no_grad():
        features = model.model.get_image_features(
            batch["pixel_values"], batch["image_grid_thw"]
        ).pooler_output
    assert [tuple(f.shape) for f in features] == [(144, 48)] * 2  # 144 merged tokens per image, as the prompt
    with torch.no_grad():
        assert model(**batch, logits_to_keep=1).logits.shape == (2, 1, len(tokenizer))
