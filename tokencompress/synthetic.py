"""A seeded visual question answering task that needs no pretrained weights: the quality benchmark's data.

Each image is a flat background with a 3 x 3 grid of cells; a cell is empty or holds one large object, a coloured
shape or a coloured letter, drawn big enough to cover most of the patches of its cell. Questions take one word to
answer. Some need the whole image (the background colour, how many objects), most need one cell's fine content
(its colour, its shape, its letter) or a relation between cells (what is left of an object). Every sample is a
pure function of (seed, index), so splits are reproducible without files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch
from torch import Tensor

COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.15, 0.8),
    "orange": (1.0, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
}
BACKGROUNDS = ("gray", "brown", "teal", "pink")
BACKGROUND_RGB = {
    "gray": (0.5, 0.5, 0.5),
    "brown": (0.45, 0.3, 0.15),
    "teal": (0.1, 0.5, 0.5),
    "pink": (0.95, 0.7, 0.75),
}
SHAPES = ("square", "circle", "triangle", "cross")
LETTERS = {  # 5 x 7 bitmaps, drawn scaled up to fill a cell
    "a": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "e": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "h": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "l": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "t": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "x": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
    "z": ("11111", "00001", "00010", "00100", "01000", "10000", "11111"),
    "u": ("10001", "10001", "10001", "10001", "10001", "10001", "01110"),
}
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 96  # the shipped models' images: 3 x 3 cells of 32 px
TRAIN_SEED, TEST_SEED = 0, 1  # the shapes models' training split and the held-out one (ShapesTask seeds)
QUESTION_TYPES = ("background", "count", "colour", "shape", "letter", "left_of")
# asked in training only, never in the held-out split: "what is in the <place> cell ?" -> its noun (a shape or
# letter-x word, the words left_of answers with, which left_of alone teaches otherwise)
TRAINING_TYPES = ("object",)
GLOBAL_TYPES = ("background", "count")
SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
# Qwen2-VL's placeholders, appended after the word vocabulary by QwenWordTokenizer only (the LLaVA ids stay put)
QWEN_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class Item:
    """One cell's content: a shape or a letter, and its colour."""

    kind: str  # "shape" or "letter"
    name: str
    colour: str


@dataclass(frozen=True)
class Sample:
    image: Tensor  # (3, H, W) float in [0, 1]
    question: str
    answer: str
    qtype: str
    background: str
    cells: tuple[Item | None, ...]  # row-major 3 x 3


class ShapesTask:
    """`task.sample(i)` for i = 0, 1, ...: the seed picks the split (train and test use different seeds).
    Question types are drawn uniformly from `question_types` among those the image can answer, so a type listed
    twice is asked twice as often (training uses that to weight the hardest type). TRAINING_TYPES may be listed
    too; the default (QUESTION_TYPES, the held-out split's) never asks them."""

    def __init__(
        self, seed: int = 0, image_size: int = IMAGE_SIZE, question_types: tuple[str, ...] = QUESTION_TYPES
    ):
        if image_size % 3:
            raise ValueError(f"image_size must be a multiple of 3 (a 3 x 3 grid of cells), got {image_size}")
        unknown = set(question_types) - set(QUESTION_TYPES + TRAINING_TYPES)
        if unknown:
            raise ValueError(
                f"unknown question types {sorted(unknown)}; known: {QUESTION_TYPES + TRAINING_TYPES}"
            )
        self.seed, self.image_size, self.question_types = seed, image_size, tuple(question_types)

    def sample(self, index: int) -> Sample:
        rng = random.Random(self.seed * 1_000_003 + index)
        while (
            True
        ):  # redraw until one of the asked question types fits the image (e.g. "letter" needs a letter)
            background = rng.choice(BACKGROUNDS)
            cells = self._cells(rng)
            possible = [q for q in self.question_types if _answerable(q, cells)]
            if possible:
                break
        qtype = rng.choice(possible)
        question, answer = self._ask(rng, qtype, background, cells)
        return Sample(self.draw(background, cells, rng), question, answer, qtype, background, tuple(cells))

    def reask(self, sample: Sample, rng: random.Random) -> Sample:
        """The same image with another question (of a type this task asks and the image can answer): training
        asks several questions per image to share the cost of encoding it."""
        possible = [q for q in self.question_types if _answerable(q, list(sample.cells))]
        qtype = rng.choice(possible)
        question, answer = self._ask(rng, qtype, sample.background, list(sample.cells))
        return replace(sample, question=question, answer=answer, qtype=qtype)

    @staticmethod
    def _cells(rng: random.Random) -> list[Item | None]:
        cells: list[Item | None] = [None] * 9
        for place in rng.sample(range(9), rng.randint(2, 6)):
            kind = rng.choice(("shape", "shape", "letter"))
            name = rng.choice(SHAPES if kind == "shape" else tuple(LETTERS))
            cells[place] = Item(kind, name, rng.choice(tuple(COLOURS)))
        return cells

    @staticmethod
    def _ask(rng: random.Random, qtype: str, background: str, cells: list[Item | None]) -> tuple[str, str]:
        if qtype == "background":
            return "what colour is the background ?", background
        if qtype == "count":
            return "how many objects are there ?", NUMBERS[sum(c is not None for c in cells)]
        if qtype == "left_of":
            pairs = _left_pairs(cells)
            left, right = rng.choice(pairs)
            target = cells[right]
            return f"what is left of the {target.colour} {_noun(target)} ?", _noun(cells[left])
        kind = "letter" if qtype == "letter" else "shape"
        any_kind = qtype in ("colour", "object")
        choices = [i for i, c in enumerate(cells) if c is not None and (c.kind == kind or any_kind)]
        place = rng.choice(choices)
        item = cells[place]
        where = f"in the {PLACES[place]} cell"
        if qtype == "object":
            return f"what is {where} ?", _noun(item)
        if qtype == "colour":
            return f"what colour is the object {where} ?", item.colour
        if qtype == "shape":
            return f"what shape is {where} ?", item.name
        return f"what letter is {where} ?", item.name

    def draw(self, background: str, cells: list[Item | None], rng: random.Random) -> Tensor:
        size = self.image_size
        cell = size // 3
        image = torch.tensor(BACKGROUND_RGB[background])[:, None, None].repeat(1, size, size)
        image += 0.03 * torch.randn(
            3, size, size, generator=torch.Generator().manual_seed(rng.getrandbits(31))
        )
        for place, item in enumerate(cells):
            if item is None:
                continue
            top, left = (place // 3) * cell, (place % 3) * cell
            mask = _item_mask(item, cell)
            colour = torch.tensor(COLOURS[item.colour])[:, None, None]
            region = image[:, top : top + cell, left : left + cell]
            image[:, top : top + cell, left : left + cell] = torch.where(mask, colour, region)
        return image.clamp(0, 1)


def _answerable(qtype: str, cells: list[Item | None]) -> bool:
    if qtype == "shape":
        return any(c is not None and c.kind == "shape" for c in cells)
    if qtype == "letter":
        return any(c is not None and c.kind == "letter" for c in cells)
    if qtype == "left_of":
        return bool(_left_pairs(cells))
    return True


def _left_pairs(cells: list[Item | None]) -> list[tuple[int, int]]:
    """(left, right) cells side by side in a row, both filled, the right one's colour and noun unique in the image
    (so "the red circle" names one object)."""
    names = [(c.colour, _noun(c)) for c in cells if c is not None]
    pairs = []
    for place in range(9):
        if place % 3 == 2 or cells[place] is None or cells[place + 1] is None:
            continue
        right = cells[place + 1]
        if names.count((right.colour, _noun(right))) == 1:
            pairs.append((place, place + 1))
    return pairs


def _noun(item: Item) -> str:
    return item.name if item.kind == "shape" else f"letter-{item.name}"


def _item_mask(item: Item, cell: int) -> Tensor:
    """(cell, cell) bool: the object's pixels, covering most of the cell (a margin of 1/8 on each side)."""
    margin = cell // 8
    inner = cell - 2 * margin
    y = torch.arange(cell)[:, None].expand(cell, cell).float()
    x = torch.arange(cell)[None, :].expand(cell, cell).float()
    u, v = (x - margin) / inner, (y - margin) / inner  # 0..1 inside the drawing box
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if item.kind == "letter":
        bitmap = torch.tensor([[ch == "1" for ch in row] for row in LETTERS[item.name]])
        rows = (v * 7).clamp(0, 6).long()
        cols = (u * 5).clamp(0, 4).long()
        return inside & bitmap[rows, cols]
    if item.name == "square":
        return inside
    if item.name == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25
    if item.name == "triangle":
        return inside & (v >= 1 - 2 * torch.minimum(u, 1 - u) - 1e-6) & (v < 1)
    band = (abs(u - 0.5) < 0.17) | (abs(v - 0.5) < 0.17)  # cross
    return inside & band


class WordTokenizer:
    """Word-level tokenizer over the task's closed vocabulary: no hub, no files."""

    def __init__(self) -> None:
        words = set()
        for template in (
            "what colour is the background ?",
            "how many objects are there ?",
            "what colour is the object in the cell ?",
            "what shape is in the cell ?",
            "what letter is in the cell ?",
            "what is left of the ?",
            "what is in the cell ?",
            "question : answer :",
        ):
            words.update(template.split())
        for place in PLACES:
            words.update(place.split())
        words.update(COLOURS)
        words.update(BACKGROUNDS)
        words.update(SHAPES)
        words.update(f"letter-{letter}" for letter in LETTERS)
        words.update(LETTERS)
        words.update(NUMBERS)
        self.vocab = list(SPECIAL) + sorted(words)
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.pad_token_id, self.unk_token_id = self.index["<pad>"], self.index["<unk>"]
        self.bos_token_id, self.eos_token_id = self.index["<s>"], self.index["</s>"]
        self.image_token_id = self.index["<image>"]
        self.special = set(SPECIAL)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(word, self.unk_token_id) for word in text.split()]

    def decode(self, ids: list[int] | Tensor, skip_special: bool = True) -> str:
        words = [self.vocab[int(i)] for i in ids]
        if skip_special:
            words = [w for w in words if w not in self.special]
        return " ".join(words)


class QwenWordTokenizer(WordTokenizer):
    """The word tokenizer plus Qwen2-VL's vision placeholders (QWEN_SPECIAL), appended at the end: every id of
    WordTokenizer keeps its value. `image_token_id` is `<|image_pad|>`; `<image>` stays in the vocabulary unused."""

    def __init__(self) -> None:
        super().__init__()
        self.vocab += list(QWEN_SPECIAL)
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.vision_start_token_id = self.index["<|vision_start|>"]
        self.vision_end_token_id = self.index["<|vision_end|>"]
        self.image_token_id = self.index["<|image_pad|>"]
        self.video_token_id = self.index["<|video_pad|>"]
        self.special |= set(QWEN_SPECIAL)


# -- the model's inputs ---------------------------------------------------------------------------------------
def prompt_words(question: str) -> str:
    """The text around the image: `<s> <image> x N question : ... ? answer :` (the answer follows)."""
    return f"question : {question} answer :"


def encode(
    tokenizer: WordTokenizer,
    samples: list[Sample],
    image_tokens: int,
    with_answers: bool = False,
    followups: list[list[Sample]] | None = None,
) -> dict[str, Tensor]:
    """A left-padded batch for a LLaVA-style model: input_ids, attention_mask, pixel_values, and with answers
    appended (answer word, then </s>) labels that supervise the answers only. `followups[i]` (training only):
    more questions on sample i's image, each appended after the previous answer as another
    `question : ... answer : ... </s>` turn."""
    image = [tokenizer.image_token_id] * image_tokens
    batch = _text_batch(tokenizer, samples, image, with_answers, followups)
    batch.pop("image_mask")
    labels = batch.pop("labels")
    batch["pixel_values"] = torch.stack([s.image for s in samples])
    if with_answers:
        batch["labels"] = labels
    return batch


def encode_qwen2_vl(
    tokenizer: QwenWordTokenizer,
    samples: list[Sample],
    with_answers: bool = False,
    followups: list[list[Sample]] | None = None,
    patch_size: int = 4,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> dict[str, Tensor]:
    """`encode` for a Qwen2-VL: `<s> <|vision_start|> <|image_pad|> x N <|vision_end|> question : ... answer :`
    with N = (side / patch_size / merge_size)^2 merged tokens, plus mm_token_type_ids (1 at the image pads, for
    M-RoPE) and the images as Qwen2VLImageProcessor lays them out without resizing or normalising (the pixels
    in [0, 1], as `encode` passes them): pixel_values (images x patches, 3 * temporal * patch^2) and
    image_grid_thw (1, side / patch_size, side / patch_size) per image. See `qwen2_vl_patches`."""
    pixel_values, grid = qwen2_vl_patches(
        torch.stack([s.image for s in samples]), patch_size, merge_size, temporal_patch_size
    )
    image_tokens = int(grid[0, 1] * grid[0, 2]) // merge_size**2
    image = [tokenizer.vision_start_token_id, *[tokenizer.image_token_id] * image_tokens]
    image.append(tokenizer.vision_end_token_id)
    batch = _text_batch(tokenizer, samples, image, with_answers, followups)
    batch["mm_token_type_ids"] = batch.pop("image_mask")
    labels = batch.pop("labels")
    batch["pixel_values"], batch["image_grid_thw"] = pixel_values, grid
    if with_answers:
        batch["labels"] = labels
    return batch


def qwen2_vl_layout(vision_config) -> dict[str, int]:
    """The patch_size, merge_size and temporal_patch_size of a Qwen2-VL vision config, as `encode_qwen2_vl` and
    `qwen2_vl_patches` take them."""
    return dict(
        patch_size=vision_config.patch_size,
        merge_size=vision_config.spatial_merge_size,
        temporal_patch_size=vision_config.temporal_patch_size,
    )


def qwen2_vl_patches(
    images: Tensor, patch_size: int = 4, merge_size: int = 2, temporal_patch_size: int = 2
) -> tuple[Tensor, Tensor]:
    """(B, 3, H, W) images -> Qwen2-VL's pixel_values (B * H/p * W/p, 3 * temporal * p * p) and image_grid_thw
    (B, 3), the layout of Qwen2VLImageProcessor.patchify: patches grouped by merge window (the merge windows in
    raster order, then the merge x merge patches of each window in raster order), each patch flattened as
    (channel, frame, y, x) with the still image repeated over the temporal_patch_size frames. The visual
    merger joins each run of merge^2 patches, so merged token k is the window at row k // (W/p/merge), column
    k % (W/p/merge): raster order on the merged grid."""
    count, channels, height, width = images.shape
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(
            f"image {height} x {width} is not a multiple of patch_size * merge_size = {patch_size * merge_size}"
        )
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(
        count,
        channels,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)  # B, windows h, windows w, merge, merge, C, p, p
    patches = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    pixel_values = patches.reshape(count * grid_h * grid_w, channels * temporal_patch_size * patch_size**2)
    grid = torch.tensor([[1, grid_h, grid_w]] * count, dtype=torch.long)
    return pixel_values, grid


def _text_batch(
    tokenizer: WordTokenizer,
    samples: list[Sample],
    image: list[int],
    with_answers: bool,
    followups: list[list[Sample]] | None,
) -> dict[str, Tensor]:
    """The left-padded token rows `<s> image question : ... answer : [answer </s>] [more turns]`: input_ids,
    attention_mask, labels (the answers only), image_mask (1 at the image tokens of `image`)."""
    if followups is not None and (not with_answers or len(followups) != len(samples)):
        raise ValueError("followups need with_answers=True and one list per sample")
    rows, labels = [], []
    for i, sample in enumerate(samples):
        row = [tokenizer.bos_token_id, *image]
        label = [-100] * len(row)
        for turn in [sample, *(followups[i] if followups else [])]:
            prompt = tokenizer.encode(prompt_words(turn.question))
            answer = tokenizer.encode(turn.answer) + [tokenizer.eos_token_id] if with_answers else []
            row += prompt + answer
            label += [-100] * len(prompt) + answer
        rows.append(row)
        labels.append(label)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    target = torch.full((len(rows), width), -100)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
        target[i, width - len(row) :] = torch.tensor(label)
    image_mask = (input_ids == tokenizer.image_token_id).long()
    return {"input_ids": input_ids, "attention_mask": mask, "labels": target, "image_mask": image_mask}


def cell_targets(samples: list[Sample], side: int) -> tuple[Tensor, Tensor]:
    """Per image token (raster order on a side x side patch grid): the colour (0 none, 1.. COLOURS order) and the
    object (0 none, then SHAPES, then LETTERS) of the cell it lies in; the auxiliary targets of training."""
    colours, objects = list(COLOURS), list(SHAPES) + list(LETTERS)
    per_cell = side // 3
    cell = (torch.arange(side)[:, None] // per_cell * 3 + torch.arange(side)[None, :] // per_cell).flatten()
    colour = torch.zeros(len(samples), 9, dtype=torch.long)
    kind = torch.zeros(len(samples), 9, dtype=torch.long)
    for b, sample in enumerate(samples):
        for place, item in enumerate(sample.cells):
            if item is not None:
                colour[b, place] = 1 + colours.index(item.colour)
                kind[b, place] = 1 + objects.index(item.name)
    return colour[:, cell], kind[:, cell]


def answer_cell(sample: Sample) -> int | None:
    """The cell (0..8, row-major) whose content answers the question: the named cell, or for "what is left of
    the <colour> <object>" the cell left of that object; None for the global questions."""
    if sample.qtype in ("colour", "shape", "letter", "object"):
        place = sample.question.split(" in the ", 1)[1].removesuffix(" cell ?")
        return PLACES.index(place)
    if sample.qtype == "left_of":
        colour, noun = sample.question.removeprefix("what is left of the ").removesuffix(" ?").split(" ")
        (right,) = [
            i for i, c in enumerate(sample.cells) if c is not None and (c.colour, _noun(c)) == (colour, noun)
        ]
        return right - 1
    return None
