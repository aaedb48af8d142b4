"""The `tokencompress` command line: the demo now; benchmarks live in benchmarks/ (see its README)."""

from __future__ import annotations

import argparse

import torch

import tokencompress as tc


def demo(args: argparse.Namespace) -> None:
    """FastV on a tiny random LLaVA: what was kept, the FLOPs saved, and the same answer as the bare model."""
    from tokencompress.tiny import tiny_llava, tiny_llava_inputs

    torch.manual_seed(0)
    model = tiny_llava(
        hidden=128,
        layers=args.layers,
        heads=4,
        kv_heads=2,
        intermediate=352,
        vocab=512,
        image_size=96,
        patch_size=8,
    )
    inputs = tiny_llava_inputs(model, [(12, 20), (5, 30)], [1, 2])
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    print(f"tiny random LLaVA: {args.layers} layers, {grid}x{grid} = {grid * grid} visual tokens per image")
    print("batch of 2 (left-padded): sample 0 has 1 image, sample 1 has 2\n")
    with torch.inference_mode():
        bare = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
        compressor = tc.FastV(layer=args.layer, keep=args.keep)
        with tc.compressed(model, compressor):
            pruned = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
            stats = tc.stats(model)
    print(f"{compressor}\n")
    print(stats)
    prompt = inputs["input_ids"].shape[1]
    print(f"\ngenerated (bare)    : {bare[:, prompt:].tolist()}")
    print(f"generated (FastV)   : {pruned[:, prompt:].tolist()}")
    print(f"\nsample 0, its image's {grid}x{grid} grid from layer {args.layer} on (# kept, . dropped):")
    print(_kept_grid(stats.prefill.layers[args.layer], inputs, grid))


def _kept_grid(layer: tc.accounting.LayerStats, inputs: dict, grid: int) -> str:
    from tokencompress.tiny import IMAGE_TOKEN_ID

    visual = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
    kept = set(layer.kept_positions(0))
    cells = ["#" if position in kept else "." for position in visual[: grid * grid]]
    return "\n".join("  " + " ".join(cells[row * grid : (row + 1) * grid]) for row in range(grid))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokencompress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="FastV on a tiny random LLaVA")
    run_demo.add_argument("--layer", type=int, default=2)
    run_demo.add_argument("--keep", type=float, default=0.5)
    run_demo.add_argument("--layers", type=int, default=6)
    run_demo.add_argument("--new-tokens", type=int, default=8)
    run_demo.set_defaults(run=demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
