"""Train DPN's or gamma-MoD's routers on a shapes model with HF Trainer (the model frozen), for the ablation.

python -m benchmarks.train_routers --method dpn --out tokencompress/assets/shapes_llava_routers/dpn
python -m benchmarks.train_routers --method gamma_mod --out tokencompress/assets/shapes_llava_routers/gamma_mod

The recipe of docs/training.md on the shapes task: `tc.compress` builds the routers, every model parameter is
frozen, and Trainer minimises the answer loss plus the compressor's routing loss (which `forward` adds) on
training-split questions (seed 0, images from --data-offset on, past those the shipped model was trained on).
One question per image, as evaluated. gamma-MoD trains with `mlp_scale="straight_through"` (the frozen model is
unchanged at skip 0 while the router gets the gradient). The result is a `tc.save_pretrained` directory that
`tokencompress ablate` loads with `pretrained: DIR`; routers_training.json beside it records the arguments, the
losses and the minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import tokencompress as tc
from benchmarks.train_shapes import model_inputs
from tokencompress.evaluation import load_shapes_model
from tokencompress.synthetic import IMAGE_SIZE, TRAIN_SEED, ShapesTask


def _loss_weight(args) -> dict:
    """--loss-weight when given; otherwise the compressor's own default."""
    return {} if args.loss_weight is None else {"loss_weight": args.loss_weight}


METHODS = {
    "dpn": lambda args: tc.DPN(**_loss_weight(args)),
    "gamma_mod": lambda args: tc.GammaMoD(skip=args.skip, mlp_scale="straight_through", **_loss_weight(args)),
}


class TrainingQuestions(torch.utils.data.Dataset):
    """Training-split samples (one question each) from image `offset` on."""

    def __init__(self, size: int, offset: int) -> None:
        self.task, self.size, self.offset = ShapesTask(TRAIN_SEED, IMAGE_SIZE), size, offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.task.sample(self.offset + index)


class LossLog(TrainerCallback):
    """Trainer's logged losses, kept for routers_training.json."""

    def __init__(self) -> None:
        self.entries: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.entries.append({"step": state.global_step, **(logs or {})})


def train_routers(model: nn.Module, tokenizer, steps: int, batch: int, lr: float, offset: int) -> list[dict]:
    """Freeze the compressed `model` but its routers and train them with Trainer; returns Trainer's log."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in tc.compressor_parameters(model):
        parameter.requires_grad_(True)
    log = LossLog()
    with tempfile.TemporaryDirectory() as scratch:
        arguments = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch,
            learning_rate=lr,
            warmup_steps=max(1, steps // 20),
            lr_scheduler_type="cosine",
            logging_steps=max(1, steps // 20),
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=TrainingQuestions(steps * batch, offset),
            data_collator=lambda samples: model_inputs(model, tokenizer, samples, with_answers=True),
            callbacks=[log],
        )
        trainer.train()
    model.eval()
    return log.entries


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", choices=sorted(METHODS), required=True)
    parser.add_argument("--out", required=True, help="the tc.save_pretrained directory to write")
    parser.add_argument("--model", default=None, help="a shapes model directory (default: the shipped LLaVA)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--loss-weight", type=float, default=None, help="default: the compressor's own")
    parser.add_argument("--skip", type=float, default=0.5, help="gamma-MoD: share of visual tokens skipped")
    parser.add_argument("--data-offset", type=int, default=500_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, prompts = load_shapes_model(args.model)
    started = time.time()
    tc.compress(model, METHODS[args.method](args))
    log = train_routers(model, prompts.tokenizer, args.steps, args.batch, args.lr, args.data_offset)
    minutes = (time.time() - started) / 60
    tc.save_pretrained(model, args.out)
    record = {"args": vars(args), "minutes": minutes, "log": log}
    (Path(args.out) / "routers_training.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({"minutes": minutes, "last": log[-1] if log else None}), flush=True)


if __name__ == "__main__":
    main()
