"""The shapes task: answers agree with the pixels drawn, samples are reproducible, the tokenizer covers every
question and answer, and the batches and auxiliary targets the training script and the demo build are right."""

from __future__ import annotations

import collections

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
    SHAPES,
    ShapesTask,
    WordTokenizer,
    cell_targets,
    encode,
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
