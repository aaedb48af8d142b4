"""The `tokencompress` command line. `demo`: every compressor on the shipped shapes model at matched budgets.
`ablate CONFIG`: a grid over compressors x settings from a YAML or JSON config (docs/ablations.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import tokencompress as tc

from . import evaluation


def methods(
    num_layers: int,
    visual: int,
    model: torch.nn.Module | None = None,
    router: evaluation.Trained | None = None,
) -> list[evaluation.Method]:
    """The compressors the demo compares, each with the knob that sets its budget (larger keeps more); gamma-MoD
    with `router`'s trained weights when given (loaded through `model`), else with an untrained router."""

    def pyramid(value: float) -> tc.StaticPyramid:
        first = round(value)
        after = [first] + ([first + 2] if first + 2 <= num_layers - 2 else [])
        return tc.StaticPyramid(after_layers=after, kernels=(2, 2))

    return [
        evaluation.Method("FastV", lambda v: tc.FastV(layer=2, keep=float(v)), 0.01, 1.0),
        evaluation.Method("RandomDrop", lambda v: tc.RandomDrop(layer=2, keep=float(v)), 0.01, 1.0),
        evaluation.Method("StaticPyramid 2x2", pyramid, 0, num_layers - 2),
        evaluation.Method("MustDrop", lambda v: tc.MustDrop(budget=float(v)), 1.0, float(visual)),
        gamma_mod(model, router),
    ]


def gamma_mod(model: torch.nn.Module | None, router: evaluation.Trained | None) -> evaluation.Method:
    """gamma-MoD with its knob (the share of visual tokens that run the MoD layers, 1 - skip)."""
    if router is None:
        return evaluation.Method(
            "gamma-MoD (untrained router)",
            lambda v: tc.GammaMoD(skip=min(0.99, 1.0 - float(v)), mlp_scale="straight_through"),
            0.01,
            1.0,
            note="its router is untrained here (random routing); train it with HF Trainer (docs/training.md)",
        )
    params = {key: value for key, value in router.params.items() if key != "skip"}
    return evaluation.Method(
        "gamma-MoD (trained router)",
        lambda v: evaluation.with_weights(
            model, tc.GammaMoD(**params, skip=min(0.99, 1.0 - float(v))), router.weights
        ),
        0.01,
        1.0,
        note=f"router trained by benchmarks/train_routers.py ({router.directory})",
    )


def shipped_routers(name: str | None) -> dict[str, evaluation.Trained]:
    """The trained routers shipped for the shipped shapes model (none for any other model)."""
    if name is not None:
        return {}
    return {
        kind: evaluation.read_trained(evaluation.ROUTERS / kind)
        for kind in ("dpn", "gamma_mod")
        if (evaluation.ROUTERS / kind).is_dir()
    }


def demo(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, prompts = evaluation.load_model(args.model, args.device, args.dtype)
    samples = evaluation.held_out_samples(args.samples, prompts.image_size)
    probe = samples[: args.batch]
    visual = evaluation.visual_tokens(model, prompts.inputs(probe))
    num_layers = model.config.get_text_config().num_hidden_layers
    print(
        f"{type(model).__name__} ({args.model or evaluation.ASSETS}): {num_layers} decoder layers, "
        f"{visual} visual tokens; {len(samples)} held-out shapes questions, batches of {args.batch}"
    )
    routers = shipped_routers(args.model)
    compared = methods(num_layers, visual, model, routers.get("gamma_mod"))
    settings: list[tuple[str, str, tc.Compressor | None]] = [("uncompressed", "-", None)]
    skipped, unreached = [], []
    for method in tqdm(compared, desc="matching budgets"):
        try:
            matched = [evaluation.match_budget(model, prompts, method, t, probe) for t in args.budgets]
        except ValueError as error:  # the method does not fit this model (e.g. too few layers)
            skipped.append(f"{method.name}: {error}")
            continue
        evaluated = set()  # targets below a method's floor all match its floor: one row for it
        for target, (value, ratio) in zip(args.budgets, matched, strict=True):
            if abs(ratio - target) > evaluation.BUDGET_TOLERANCE:
                unreached.append(
                    f"{method.name}: FLOPs target {target:g} is out of reach, closest {ratio:.3f}"
                )
            if value not in evaluated:
                evaluated.add(value)
                settings.append((method.name, f"{value:.3g} (FLOPs {ratio:.2f})", method.make(value)))
    if "dpn" in routers:  # its routers choose the budget: one point, where they land
        dpn = routers["dpn"]
        trained = evaluation.with_weights(model, tc.build("dpn", **dpn.params), dpn.weights)
        settings.append(("DPN (trained routers)", "learned", trained))
    results = evaluation.evaluate(
        model, prompts, settings, samples, args.batch, progress=lambda b: tqdm(b, desc="evaluating")
    )
    table = evaluation.format_table(results, results[0])
    print()
    print(table)
    for method in compared:
        if method.note:
            print(f"note, {method.name}: {method.note}")
    if "dpn" in routers:
        print(
            f"note, DPN (trained routers): trained by benchmarks/train_routers.py ({routers['dpn'].directory})"
        )
    else:
        print("not shown: DPN (its routers need training; see docs/training.md)")
    for reason in unreached:
        print(f"note, {reason}")
    for reason in skipped:
        print(f"skipped, {reason}")
    evaluation.pareto_plot(results, results[0], args.plot)
    print(f"Pareto plot: {args.plot}")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


def ablate(args: argparse.Namespace) -> None:
    from . import ablation

    try:
        ablation.run(args.config, out=args.out, fresh=args.fresh, dry_run=args.dry_run)
    except ablation.ConfigError as error:
        raise SystemExit(f"tokencompress ablate: {error}") from error
    except KeyboardInterrupt:  # the rows done are saved; the run has said how to go on
        raise SystemExit(130) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokencompress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="every compressor on the shipped shapes model, side by side")
    run_demo.add_argument(
        "--model",
        default=None,
        help="a Hugging Face model id (or local copy) of a chat MLLM, or a shapes model saved by "
        "benchmarks/train_shapes.py (default: the shipped one)",
    )
    run_demo.add_argument("--device", default="cpu")
    run_demo.add_argument("--dtype", default="auto", help="for hub models: auto, float16, bfloat16, float32")
    run_demo.add_argument("--samples", type=int, default=600)
    run_demo.add_argument("--batch", type=int, default=50)
    run_demo.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.55, 0.45])
    run_demo.add_argument("--plot", default="tokencompress_demo.png")
    run_demo.add_argument("--markdown", default=None, help="also write the table to this file")
    run_demo.add_argument("--threads", type=int, default=torch.get_num_threads())
    run_demo.set_defaults(run=demo)
    run_ablate = commands.add_parser(
        "ablate",
        help="a grid over compressors x settings from a YAML/JSON config, resumable (docs/ablations.md)",
    )
    run_ablate.add_argument(
        "config", help="the config: .yaml/.yml or .json (e.g. benchmarks/ablations/shapes.yaml)"
    )
    run_ablate.add_argument(
        "--out", default=None, help="results directory (default: ablations/<config name>)"
    )
    run_ablate.add_argument("--fresh", action="store_true", help="discard the results already in --out")
    run_ablate.add_argument(
        "--dry-run", action="store_true", help="validate the config and list its settings; load no model"
    )
    run_ablate.set_defaults(run=ablate)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
