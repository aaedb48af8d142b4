"""Train the tiny LLaVA the demo and the quality benchmark use, on the synthetic shapes task.

python -m benchmarks.train_shapes --out tokencompress/assets/shapes_llava

A LlavaForConditionalGeneration built from configs (CLIP 96 px / 8 px patches = 144 image tokens on a 12 x 12
grid, 3 x 3 cells of 4 x 4 tokens; a LLaMA decoder), trained from scratch on CPU with two losses: the answer's
cross-entropy (answer word and </s>), and an auxiliary per-token loss in which every image token, as the decoder
receives it, predicts the colour and the object of its cell (linear heads, dropped after training). No attention
supervision: attention-based pruning is not favoured by the recipe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from tokencompress.synthetic import (
    COLOURS,
    LETTERS,
    QUESTION_TYPES,
    SHAPES,
    ShapesTask,
    WordTokenizer,
    cell_targets,
    encode,
)

IMAGE_SIZE, PATCH = 96, 8
SIDE = IMAGE_SIZE // PATCH
TRAIN_SEED, TEST_SEED = 0, 1
CELL_OF_TOKEN = (
    torch.arange(SIDE)[:, None] // (SIDE // 3) * 3 + torch.arange(SIDE)[None, :] // (SIDE // 3)
).flatten()


def build_model(tokenizer: WordTokenizer, seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
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


class CellHeads(nn.Module):
    """Auxiliary heads: each image token predicts its cell's colour and object, and (with `--where`) which of the
    nine cells it lies in, so a question's "top left" can find its tokens."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.colour = nn.Linear(hidden, 1 + len(COLOURS))
        self.object = nn.Linear(hidden, 1 + len(SHAPES) + len(LETTERS))
        self.cell = nn.Linear(hidden, 9)


@torch.no_grad()
def evaluate(model, tokenizer, task: ShapesTask, count: int, batch: int = 100) -> dict[str, float]:
    """Accuracy of the greedy first answer token, overall and per question type."""
    model.eval()
    right: dict[str, list[int]] = {q: [0, 0] for q in QUESTION_TYPES}
    for start in range(0, count, batch):
        samples = [task.sample(i) for i in range(start, min(count, start + batch))]
        inputs = encode(tokenizer, samples, SIDE * SIDE)
        predicted = model(**inputs, logits_to_keep=1).logits[:, -1].argmax(-1)
        for sample, token in zip(samples, predicted.tolist(), strict=True):
            right[sample.qtype][0] += tokenizer.encode(sample.answer)[0] == token
            right[sample.qtype][1] += 1
    model.train()
    scores = {q: hit / max(total, 1) for q, (hit, total) in right.items()}
    scores["overall"] = sum(h for h, _ in right.values()) / sum(t for _, t in right.values())
    return scores


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    tokenizer = WordTokenizer()
    model = build_model(tokenizer, args.seed)
    heads = CellHeads(model.config.text_config.hidden_size)
    features = {}
    model.model.multi_modal_projector.register_forward_hook(
        lambda m, a, out: features.__setitem__("image", out)
    )
    parameters = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    task, test = ShapesTask(TRAIN_SEED, IMAGE_SIZE), ShapesTask(TEST_SEED, IMAGE_SIZE)
    started, log = time.time(), []
    model.train()
    for step in range(args.steps):
        samples = [task.sample(step * args.batch + i) for i in range(args.batch)]
        inputs = encode(tokenizer, samples, SIDE * SIDE, with_answers=True)
        out = model(**inputs)
        colour, kind = cell_targets(samples, SIDE)
        image = features["image"].reshape(len(samples), SIDE * SIDE, -1)
        aux = F.cross_entropy(heads.colour(image).flatten(0, 1), colour.flatten()) + F.cross_entropy(
            heads.object(image).flatten(0, 1), kind.flatten()
        )
        if args.where:
            aux = aux + F.cross_entropy(heads.cell(image).flatten(0, 1), CELL_OF_TOKEN.repeat(len(samples)))
        loss = out.loss + args.aux_weight * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            entry = {
                "step": step,
                "answer_loss": out.loss.item(),
                "aux_loss": aux.item(),
                "minutes": (time.time() - started) / 60,
            }
            if step % args.eval_every == 0 or step == args.steps - 1:
                entry["test"] = evaluate(model, tokenizer, test, args.eval_samples)
            log.append(entry)
            print(json.dumps(entry), flush=True)
    scores = evaluate(model, tokenizer, test, args.final_samples)
    minutes = (time.time() - started) / 60
    print(json.dumps({"final_test": scores, "minutes": minutes}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    (out / "training.json").write_text(
        json.dumps({"args": vars(args), "final_test": scores, "minutes": minutes, "log": log}, indent=1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="tokencompress/assets/shapes_llava")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--aux-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--where", action="store_true", help="also predict each image token's cell")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--final-samples", type=int, default=2000)
    train(parser.parse_args())


if __name__ == "__main__":
    main()
