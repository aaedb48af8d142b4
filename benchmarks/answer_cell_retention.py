"""How much of the answer's cell a pruning method keeps, on shapes models: does a training recipe favour
attention-based pruning?

python -m benchmarks.answer_cell_retention --models tokencompress/assets/shapes_llava OTHER_DIR --keeps 0.5 0.25

The shipped shapes LLaVA was trained with one attention head (layer 4, head 0) supervised toward the answer's
cell (benchmarks/train_shapes.py --attend-layer 4). FastV scores tokens by the attention the last token pays
them at layer K - 1; if supervision leaks into those scores, FastV keeps the answer cell far more often than a
method blind to the question would. For every question whose answer lies in one cell (colour, shape, letter,
left-of), this reports the share of that cell's 16 image tokens each method keeps at layer 2, and the accuracy on
those questions, per model: compare a model trained without the supervision (e.g. the interim model of the
project's history) to see how much of FastV's retention is the recipe's doing. RandomDrop keeps `keep` of every
cell on average.
"""

from __future__ import annotations

import argparse

import torch

import tokencompress as tc
from benchmarks.train_shapes import CELL_OF_TOKEN
from tokencompress import evaluation
from tokencompress.synthetic import answer_cell


def retention(model, prompts, samples, compressor: tc.Compressor, layer: int) -> tuple[float, float]:
    """Mean share of the answer cell's image tokens that `layer` processes, and the accuracy, over `samples`."""
    result = evaluation.Result("", "")
    shares = []
    with tc.compressed(model, compressor):
        for start in range(0, len(samples), 50):
            batch = samples[start : start + 50]
            evaluation.run_batch(model, prompts, batch, result)
            inputs = prompts.inputs(batch)
            prefill = tc.stats(model).prefill
            for b, sample in enumerate(batch):
                image = torch.nonzero(inputs["input_ids"][b] == prompts.tokenizer.image_token_id).flatten()
                cell = image[answer_cell(sample) == CELL_OF_TOKEN]
                kept = set(prefill.layers[layer].kept_positions(b))
                shares.append(sum(int(p) in kept for p in cell) / len(cell))
    return sum(shares) / len(shares), result.accuracy


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=[str(evaluation.ASSETS)])
    parser.add_argument(
        "--samples", type=int, default=600, help="held-out questions drawn (the global ones are skipped)"
    )
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | method | keep | answer-cell tokens kept | accuracy (cell questions) |")
    print("|---|---|---|---|---|")
    for path in args.models:
        model, prompts = evaluation.load_model(path)
        samples = evaluation.held_out_samples(args.samples, prompts.image_size)
        samples = [s for s in samples if answer_cell(s) is not None]
        for keep in args.keeps:
            for name, compressor in (
                ("FastV", tc.FastV(layer=args.layer, keep=keep)),
                ("RandomDrop", tc.RandomDrop(layer=args.layer, keep=keep, seed=0)),
            ):
                share, accuracy = retention(model, prompts, samples, compressor, args.layer)
                print(
                    f"| {path} | {name} | {keep} | {share:.3f} | {accuracy:.3f} ({len(samples)} questions) |"
                )


if __name__ == "__main__":
    main()
