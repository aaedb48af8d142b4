"""Train the tiny LLaVA the demo and the quality benchmark use (or a tiny Qwen2-VL), on the synthetic shapes task.

python -m benchmarks.train_shapes --out tokencompress/assets/shapes_llava
python -m benchmarks.train_shapes --arch qwen2_vl  # -> tokencompress/assets/shapes_qwen2_vl

A LlavaForConditionalGeneration built from configs (CLIP 96 px / 8 px patches = 144 image tokens on a 12 x 12
grid, 3 x 3 cells of 4 x 4 tokens; a LLaMA decoder), trained from scratch on CPU: the answer's cross-entropy
(answer word and </s>), an auxiliary per-token loss in which every image token, as the decoder receives it,
predicts what is in its cell (colour, object; `--where` its place, `--left-neighbour` its left neighbour's object,
`--right-neighbour` its right neighbour's colour and object; linear heads, dropped after training), and
optionally supervised attention heads (`--attend-layer`: toward the answer's cell; `--attend-object-layer`:
toward the object a left_of question names), whose bias in favour of attention-based pruning
benchmarks/answer_cell_retention.py measures. `--questions K` asks K questions per image
in one sequence (turns after the first see the earlier turns; evaluation asks one), which shares the cost of the
144 image tokens among K answers. The shipped models' stages: benchmarks/reproduce_shapes.sh.

`--arch qwen2_vl`: a Qwen2VLForConditionalGeneration of the same decoder size (Qwen2 layers with M-RoPE) and a
Qwen2-VL vision tower (4 x 4 px patches x 2 frames, 2 x 2 spatial merge: 24 x 24 patches -> the same 144 tokens
on a 12 x 12 grid), prompted `<s> <|vision_start|> <|image_pad|> x 144 <|vision_end|> question : ...` with the
word tokenizer plus Qwen's placeholders (QwenWordTokenizer, encode_qwen2_vl). The auxiliary heads read the
visual merger's output, whose tokens are in raster order on the merged 12 x 12 grid. On CPU it can start from a
trained shapes LLaVA: `--init-decoder-from` copies the decoder, `--distill-from` pulls its image tokens toward
that LLaVA's projector output. The other way, `--arch llava --init-decoder-from QWEN2_VL_DIR` gives the LLaVA's
LLaMA decoder attention biases (`attention_bias`) and copies a trained Qwen2-VL's decoder into it; with
`--init-from` the vision tower and projector come from that saved LLaVA.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from tokencompress.synthetic import (
    COLOURS,
    IMAGE_SIZE,
    LETTERS,
    QUESTION_TYPES,
    SHAPES,
    TEST_SEED,
    TRAIN_SEED,
    QwenWordTokenizer,
    ShapesTask,
    WordTokenizer,
    cell_targets,
    encode,
    encode_qwen2_vl,
    qwen2_vl_layout,
)

PATCH = 8
SIDE = IMAGE_SIZE // PATCH
CELL_OF_TOKEN = (
    torch.arange(SIDE)[:, None] // (SIDE // 3) * 3 + torch.arange(SIDE)[None, :] // (SIDE // 3)
).flatten()
FIRST_TOKEN_OF_CELL = torch.stack([torch.nonzero(cell == CELL_OF_TOKEN)[0, 0] for cell in range(9)])
# Qwen2-VL: 4 px patches, 2 x 2 merge -> 24 x 24 patches, 12 x 12 = SIDE x SIDE merged tokens in raster order
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2
ARCHES = ("llava", "qwen2_vl")
DEFAULT_OUT = {
    "llava": "tokencompress/assets/shapes_llava",
    "qwen2_vl": "tokencompress/assets/shapes_qwen2_vl",
}


def decoder_size(tokenizer: WordTokenizer) -> dict:
    """The decoder both architectures share: 8 layers of width 192, 4 heads of 48, MLP 512, untied embeddings."""
    return dict(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        rms_norm_eps=1e-6,  # LLaMA's default; Qwen2's is 1e-5
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_model(
    tokenizer: WordTokenizer, seed: int = 0, attention_bias: bool = False
) -> LlavaForConditionalGeneration:
    """`attention_bias`: q/k/v/o biases in the LLaMA decoder, so that it can take a Qwen2 decoder's weights."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(**decoder_size(tokenizer), attention_bias=attention_bias)
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config)


def build_qwen2_vl(tokenizer: QwenWordTokenizer, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """The LLaVA's decoder size (8 layers of width 192, 4 heads of 48, MLP 512) as Qwen2 layers with M-RoPE
    (t, h, w sections 6 + 9 + 9 = head_dim / 2, Qwen2-VL's 16:24:24 split), and a Qwen2-VL vision tower
    (depth 4, width 128, 4 heads) whose merger maps 2 x 2 patches to one decoder token."""
    torch.manual_seed(seed)
    text = dict(
        **decoder_size(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 9, 9]},
    )
    vision = dict(
        depth=4,
        embed_dim=128,
        num_heads=4,
        mlp_ratio=4,
        hidden_size=192,  # the merger's output: the decoder width
        in_channels=3,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.vision_start_token_id,
        vision_end_token_id=tokenizer.vision_end_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return Qwen2VLForConditionalGeneration(config)


def model_inputs(
    model, tokenizer, samples, with_answers: bool = False, followups=None
) -> dict[str, torch.Tensor]:
    """The batch each architecture takes: `encode` (LLaVA, SIDE x SIDE image tokens) or `encode_qwen2_vl` with the
    model's own patch layout (Qwen2-VL)."""
    if model.config.model_type == "qwen2_vl":
        layout = qwen2_vl_layout(model.config.vision_config)
        return encode_qwen2_vl(tokenizer, samples, with_answers, followups, **layout)
    return encode(tokenizer, samples, SIDE * SIDE, with_answers=with_answers, followups=followups)


def image_token_features(model, features: dict) -> nn.Module:
    """Hooks the module whose output is the image tokens as the decoder receives them (LLaVA's projector,
    Qwen2-VL's visual merger: both (images x SIDE x SIDE tokens in raster order) rows); stores it in features."""
    if model.config.model_type == "qwen2_vl":
        module = model.model.visual.merger
    else:
        module = model.model.multi_modal_projector
    module.register_forward_hook(lambda m, a, out: features.__setitem__("image", out))
    return module


class CellHeads(nn.Module):
    """Auxiliary heads: each image token predicts its cell's colour and object, (with `--where`) which of the
    nine cells it lies in, (with `--left-neighbour`) the object of the cell on its left, so "what is left of the
    red circle" can be read at the red circle, and (with `--right-neighbour`) the colour and object of the cell
    on its right, so the answer's own tokens match "the red circle" and one head can find them."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        objects = 1 + len(SHAPES) + len(LETTERS)
        self.colour = nn.Linear(hidden, 1 + len(COLOURS))
        self.object = nn.Linear(hidden, objects)
        self.cell = nn.Linear(hidden, 9)
        self.left = nn.Linear(hidden, objects)
        self.right_colour = nn.Linear(hidden, 1 + len(COLOURS))
        self.right_object = nn.Linear(hidden, objects)


def neighbour_targets(targets: torch.Tensor, step: int) -> torch.Tensor:
    """Per-token targets (images, SIDE * SIDE) -> the target of the cell `step` columns away in the same row
    (-1: left, +1: right) for each token, -100 (ignored) where that cell is off the grid."""
    per_cell = targets[:, FIRST_TOKEN_OF_CELL]
    column = CELL_OF_TOKEN % 3 + step
    neighbour = per_cell[:, (CELL_OF_TOKEN + step).clamp(0, 8)]
    return neighbour.masked_fill((column < 0) | (column > 2), -100)


@torch.no_grad()
def evaluate(model, tokenizer, task: ShapesTask, count: int, batch: int = 100) -> dict[str, float]:
    """Accuracy of the greedy first answer token, overall and per question type."""
    model.eval()
    right: dict[str, list[int]] = {q: [0, 0] for q in QUESTION_TYPES}
    for start in range(0, count, batch):
        samples = [task.sample(i) for i in range(start, min(count, start + batch))]
        inputs = model_inputs(model, tokenizer, samples)
        predicted = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
        for sample, token in zip(samples, predicted.tolist(), strict=True):
            right[sample.qtype][0] += tokenizer.encode(sample.answer)[0] == token
            right[sample.qtype][1] += 1
    model.train()
    scores = {q: hit / max(total, 1) for q, (hit, total) in right.items()}
    scores["overall"] = sum(h for h, _ in right.values()) / sum(t for _, t in right.values())
    return scores


def distinct_followups(task: ShapesTask, sample, rng: random.Random, count: int) -> list:
    """Up to `count` more questions on the sample's image, none repeating an earlier one (a repeated question
    would be answered by copying the earlier answer, which teaches nothing)."""
    seen, more = {sample.question}, []
    for _ in range(10 * count):
        if len(more) == count:
            break
        other = task.reask(sample, rng)
        if other.question not in seen:
            seen.add(other.question)
            more.append(other)
    return more


def image_token_id(model) -> int:
    return model.config.image_token_id


class AnswerCellAttention:
    """Supervision of one attention head (`--attend-layer L --attend-head H`): at every turn whose answer lies in
    one cell, the attention of the position that predicts the answer, in that head, should fall on that cell's
    image tokens (loss: -log of its attention mass there). The head's attention is recomputed from the layer's
    input (q/k projections, rotary, causal and padding mask), since sdpa returns no weights."""

    def __init__(self, model, layer: int, head: int, target=None) -> None:
        from tokencompress.synthetic import answer_cell

        self.attention = model.model.language_model.layers[layer].self_attn
        self.head = head
        self.target = target or answer_cell
        self.captured: dict = {}
        self.attention.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs) -> None:
        self.captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        self.captured["rotary"] = kwargs["position_embeddings"]

    def weights(self, inputs: dict, rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(len(rows), length): the head's attention from position queries[i] of row rows[i], softmaxed over the
        positions the model lets it see (causal, not padding). Rotary as the layer applies it: LLaMA's 1-D
        positions, or Qwen2-VL's M-RoPE, which transformers folds into the same (cos, sin) pair."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attention, hidden = self.attention, self.captured["hidden"]
        batch, length, _ = hidden.shape
        head_dim = attention.head_dim
        kv_head = self.head // (attention.config.num_attention_heads // attention.config.num_key_value_heads)
        q = attention.q_proj(hidden).view(batch, length, -1, head_dim)[:, :, self.head]
        k = attention.k_proj(hidden).view(batch, length, -1, head_dim)[:, :, kv_head]
        cos, sin = self.captured["rotary"]
        q, k = apply_rotary_pos_emb(q[:, None], k[:, None], cos, sin)
        q, k = q[:, 0], k[:, 0]
        scores = torch.einsum("qd,qld->ql", q[rows, queries], k[rows]) * attention.scaling
        allowed = inputs["attention_mask"][rows].bool() & (torch.arange(length) <= queries[:, None])
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)

    def loss(self, inputs: dict, turns: list[list], image_token: int) -> torch.Tensor:
        labels = inputs["labels"]
        batch, length = labels.shape
        answer_starts = (labels != -100) & (labels.roll(1, dims=1) == -100)
        rows, queries, targets = [], [], []
        for b in range(batch):
            image = torch.nonzero(inputs["input_ids"][b] == image_token).flatten()
            starts = torch.nonzero(answer_starts[b]).flatten().tolist()
            for start, sample in zip(starts, turns[b], strict=True):
                cell = self.target(sample)
                if cell is None:
                    continue
                target = torch.zeros(length, dtype=torch.bool)
                target[image[cell == CELL_OF_TOKEN]] = True
                rows.append(b)
                queries.append(start - 1)
                targets.append(target)
        if not rows:
            return self.captured["hidden"].new_zeros(())
        weights = self.weights(inputs, torch.tensor(rows), torch.tensor(queries))
        mass = (weights * torch.stack(targets)).sum(-1)
        return -(mass + 1e-6).log().mean()


def named_object_cell(sample) -> int | None:
    """For "what is left of the <colour> <object>": the cell of the named object (the first hop)."""
    from tokencompress.synthetic import answer_cell

    return answer_cell(sample) + 1 if sample.qtype == "left_of" else None


def decoder_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The decoder's and LM head's parameters, by name (the same names in both architectures)."""
    return {
        name: value
        for name, value in model.named_parameters()
        if name.startswith(("model.language_model.", "lm_head."))
    }


def copy_decoder(model: nn.Module, source: nn.Module) -> int:
    """Starts `model`'s decoder and LM head from another trained shapes model's (`--init-decoder-from`), either
    way between the architectures: same sizes and parameter names (Qwen2 layers are LLaMA layers plus q/k/v
    biases). A bias the source lacks starts at zero (Qwen2's q/k/v biases from a LLaVA; the output bias of a LLaMA
    with `attention_bias` from a Qwen2-VL), so the copy computes the source's function on text. The word
    embeddings and LM head rows of the shared vocabulary are copied (QwenWordTokenizer appends its placeholders
    after it). The vision side is left as it is. Returns the number of tensors copied."""
    target, given = decoder_parameters(model), decoder_parameters(source)
    shared, rows = len(WordTokenizer()), {}
    for name, value in given.items():  # check everything before changing anything
        if name not in target:
            raise ValueError(f"{name} of the source has no counterpart in {type(model).__name__}")
        words = name.endswith("embed_tokens.weight") or name.startswith("lm_head.")
        rows[name] = min(value.shape[0], target[name].shape[0])
        same_rows = rows[name] >= shared if words else value.shape[0] == target[name].shape[0]
        if target[name].shape[1:] != value.shape[1:] or not same_rows:
            raise ValueError(f"{name}: source {tuple(value.shape)} does not fit {tuple(target[name].shape)}")
    unmatched = [name for name in target if name not in given]
    if any(not name.endswith(".bias") for name in unmatched):
        raise ValueError(f"{unmatched} of {type(model).__name__} have no counterpart in the source")
    with torch.no_grad():
        for name, value in given.items():
            target[name][: rows[name]].copy_(value[: rows[name]].float())
        for name in unmatched:
            target[name].zero_()
    return len(given)


class ProjectorTeacher:
    """`--distill-from`: a trained shapes LLaVA whose projector output (the image tokens its decoder reads, raster
    order on the same 12 x 12 grid) the student's image tokens are pulled toward, per token (mean squared error
    over the teacher's feature variance). A dense target for a vision tower trained from scratch."""

    def __init__(self, path: str) -> None:
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def features(self, samples: list) -> torch.Tensor:
        pixels = torch.stack([s.image for s in samples])
        return torch.stack(list(self.model.model.get_image_features(pixel_values=pixels).pooler_output))

    def loss(self, samples: list, student: torch.Tensor) -> torch.Tensor:
        target = self.features(samples)
        return F.mse_loss(student.reshape(target.shape), target) / target.var()


def train(args: argparse.Namespace) -> None:
    if args.left_of_weight < 1:
        raise ValueError(f"--left-of-weight must be a positive integer, got {args.left_of_weight}")
    if args.object_questions < 0:
        raise ValueError(f"--object-questions must be >= 0, got {args.object_questions}")
    if args.stop_at is not None and not 0 < args.stop_at <= args.steps:
        raise ValueError(f"--stop-at must be in 1..--steps ({args.steps}), got {args.stop_at}")
    steps = args.steps if args.stop_at is None else args.stop_at
    torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = DEFAULT_OUT[args.arch]
    decoder_source = None
    if args.init_decoder_from:
        decoder_source = AutoModelForImageTextToText.from_pretrained(args.init_decoder_from)
    # a LLaMA decoder takes a Qwen2 decoder's q/k/v biases only with attention_bias
    biased = args.arch == "llava" and isinstance(decoder_source, Qwen2VLForConditionalGeneration)
    if args.arch == "qwen2_vl":
        tokenizer = QwenWordTokenizer()
        model = build_qwen2_vl(tokenizer, args.seed)
    else:
        tokenizer = WordTokenizer()
        model = build_model(tokenizer, args.seed, attention_bias=biased)
    if args.init_from:  # continue training saved weights (fp16 on disk, trained in fp32)
        config = AutoConfig.from_pretrained(args.init_from)
        if biased:
            config.text_config.attention_bias = True
        model = type(model).from_pretrained(args.init_from, config=config, dtype=torch.float32)
    if decoder_source is not None:  # after --init-from: its decoder is replaced, its vision side kept
        copied = copy_decoder(model, decoder_source)
        print(json.dumps({"decoder_tensors_copied": copied}), flush=True)
    heads = CellHeads(model.config.text_config.hidden_size)
    teacher = ProjectorTeacher(args.distill_from) if args.distill_from else None
    supervised = []  # the supervised heads: to the answer's cell, and (left_of) to the object it names
    if args.attend_layer is not None:
        supervised.append(AnswerCellAttention(model, args.attend_layer, args.attend_head))
    if args.attend_object_layer is not None:
        object_heads = args.attend_object_head or [args.attend_head]
        for object_head in object_heads:
            supervised.append(
                AnswerCellAttention(model, args.attend_object_layer, object_head, named_object_cell)
            )
    features = {}
    image_token_features(model, features)
    parameters = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    # a question type listed k times is drawn k times as often (ShapesTask draws uniformly from its list)
    asked = QUESTION_TYPES + ("left_of",) * (args.left_of_weight - 1) + ("object",) * args.object_questions
    task, test = ShapesTask(TRAIN_SEED, IMAGE_SIZE, asked), ShapesTask(TEST_SEED, IMAGE_SIZE)
    started, log = time.time(), []
    model.train()
    for step in range(steps):
        first = args.data_offset + step * args.batch
        indices = range(first, first + args.batch)
        samples = [task.sample(i) for i in indices]
        followups = [
            distinct_followups(task, s, random.Random(i), args.questions - 1)
            for i, s in zip(indices, samples, strict=True)
        ]
        inputs = model_inputs(model, tokenizer, samples, with_answers=True, followups=followups)
        out = model(**inputs)
        turns = [[s, *more] for s, more in zip(samples, followups, strict=True)]
        attend = sum(head.loss(inputs, turns, image_token_id(model)) for head in supervised)
        colour, kind = cell_targets(samples, SIDE)
        image = features["image"].reshape(len(samples), SIDE * SIDE, -1)
        aux = F.cross_entropy(heads.colour(image).flatten(0, 1), colour.flatten()) + F.cross_entropy(
            heads.object(image).flatten(0, 1), kind.flatten()
        )
        if args.where:
            aux = aux + F.cross_entropy(heads.cell(image).flatten(0, 1), CELL_OF_TOKEN.repeat(len(samples)))
        if args.left_neighbour:
            left = neighbour_targets(kind, -1)
            aux = aux + F.cross_entropy(heads.left(image).flatten(0, 1), left.flatten(), ignore_index=-100)
        if args.right_neighbour:
            for head, target in ((heads.right_colour, colour), (heads.right_object, kind)):
                right = neighbour_targets(target, 1).flatten()
                aux = aux + F.cross_entropy(head(image).flatten(0, 1), right, ignore_index=-100)
        if teacher is not None:
            aux = aux + teacher.loss(samples, image)
        loss = out.loss + args.aux_weight * aux
        if supervised:
            loss = loss + args.attend_weight * attend
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == steps - 1:
            entry = {
                "step": step,
                "answer_loss": out.loss.item(),
                "aux_loss": aux.item(),
                **({"attend_loss": attend.item()} if supervised else {}),
                "minutes": (time.time() - started) / 60,
            }
            if step % args.eval_every == 0 or step == steps - 1:
                entry["test"] = evaluate(model, tokenizer, test, args.eval_samples)
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
            save(model, args, {"args": vars(args), "saved_at_step": step + 1, "log": log})
    scores = evaluate(model, tokenizer, test, args.final_samples)
    minutes = (time.time() - started) / 60
    print(json.dumps({"final_test": scores, "minutes": minutes}), flush=True)
    save(model, args, {"args": vars(args), "final_test": scores, "minutes": minutes, "log": log})


def save(model: nn.Module, args: argparse.Namespace, record: dict) -> None:
    """The weights in fp16 (the training copy stays fp32) and training.json, into --out. An fp16 copy is saved, so
    that config.json's dtype says what the weights are."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).half().save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=ARCHES, default="llava")
    parser.add_argument("--out", default=None, help="default: tokencompress/assets/shapes_<arch>")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--aux-weight", type=float, default=1.0)
    parser.add_argument(
        "--distill-from",
        default=None,
        help="a trained shapes LLaVA whose projector output the image tokens should match (an auxiliary loss)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", default=None, help="a saved model to continue training (new heads)")
    parser.add_argument(
        "--init-decoder-from",
        default=None,
        help="a saved shapes model (LLaVA or Qwen2-VL) whose decoder and LM head start this model's, after "
        "--init-from if both are given",
    )
    parser.add_argument(
        "--data-offset",
        type=int,
        default=0,
        help="first training image index (a continuation sees new images)",
    )
    parser.add_argument(
        "--questions", type=int, default=1, help="questions per training image (one sequence, several turns)"
    )
    parser.add_argument(
        "--attend-layer",
        type=int,
        default=None,
        help="supervise one head of this decoder layer to the answer cell",
    )
    parser.add_argument("--attend-head", type=int, default=0)
    parser.add_argument(
        "--attend-object-layer",
        type=int,
        default=None,
        help="also supervise that head of this layer toward the object a left_of question names (first hop)",
    )
    parser.add_argument(
        "--attend-object-head",
        type=int,
        nargs="+",
        default=None,
        help="the head (or heads, each supervised alike) of --attend-object-layer (default: --attend-head)",
    )
    parser.add_argument("--attend-weight", type=float, default=1.0)
    parser.add_argument("--where", action="store_true", help="also predict each image token's cell")
    parser.add_argument(
        "--left-neighbour",
        action="store_true",
        help="also predict the object of the cell left of each image token's cell",
    )
    parser.add_argument(
        "--right-neighbour",
        action="store_true",
        help="also predict the colour and object of the cell right of each image token's cell",
    )
    parser.add_argument(
        "--left-of-weight",
        type=int,
        default=1,
        help="draw left_of questions this many times as often in training (the held-out split stays uniform)",
    )
    parser.add_argument(
        "--object-questions",
        type=int,
        default=0,
        help='also ask the training-only "what is in the <place> cell ?" (answer: its shape or letter-x noun), '
        "weighted like --left-of-weight (0: never; the held-out split never asks it)",
    )
    parser.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this many steps of the --steps schedule (the learning rate follows the full schedule)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--save-every", type=int, default=0, help="also save the weights every N steps (0: only at the end)"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--final-samples", type=int, default=2000)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
