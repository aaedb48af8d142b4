"""Efficiency benchmark: realized prefill / decode speedups and memory of compression methods vs analytic FLOPs.

Compares, on a random LLaVA- or Qwen-VL-shaped model built with `tokencompress.tiny` / `tokencompress.tiny_qwen`,
named settings, each a pipeline factory (None for the bare model):

  bare                  the model as loaded, no hooks
  noop                  FastV(layer=K, keep=1.0): every hook active, nothing dropped (the engine's own overhead)
  fastv@K x.xx          FastV(layer=K, keep=x.xx) for each --keeps ratio
  pyramid RxC[,...]     StaticPyramid(kernels=..., pooling="avg") for each --pyramid argument: DPN's pyramid with
                        fixed kernels (one for all stages, or a comma list with one per stage)
  fastv@K =pyramid ...  for each pyramid setting, FastV(layer=K) at the same analytic prefill FLOPs: its keep
                        (a token count) is found by bisection on tc.stats FLOPs of probe forwards, within 1%

With --mustdrop BUDGET... the run compares MustDrop instead (LLaVA only), on a model whose vision tower is deep
enough for MustDrop's vision stage to matter (defaults: a 24-layer CLIP tower of width 256 read at its
penultimate layer, as LLaVA-1.5 does; a 32-layer decoder, so the authors' filter layers 2, 6, 10, 14 apply
unscaled) and on a synthetic image of flat colour blocks and noise, whose flat 3 x 3 patch windows the vision
stage merges:

  bare                  the model as loaded, no hooks
  noop                  FastV(layer=K, keep=1.0), as above
  mustdrop B            MustDrop(budget=B) for each budget: a layer average of B visual tokens (the authors'
                        "passed_on" convention), vision stage on
  mustdrop B novision   MustDrop(budget=B, vision_stage=False) for each --mustdrop-no-vision budget: the same
                        budget without the encoder-side window merge
  fastv@K =mustdrop B   FastV(layer=K) at the same analytic total FLOPs (decoder + LM head + vision encoder) as
                        mustdrop B, found by the same bisection; left out where FastV cannot get that cheap

With --gamma-mod SKIP... the run compares gamma-MoD (mixture of depths) instead, on the MustDrop mode's decoder
(576 image + 60 text tokens, hidden 512, 32 layers, so GammaMoD's default layers="arank" are the authors' 28 MoD
layers 3..30) behind the small default vision tower (gamma-MoD does not touch the encoder, so the prefill stays
decoder-dominated). Every GammaMoD setting shares one router, random (seeded; untrained: which visual tokens run a
layer is arbitrary, how many is what the cost depends on):

  bare                  the model as loaded, no hooks
  noop                  FastV(layer=K, keep=1.0), as above
  gamma-mod S           GammaMoD(skip=S) for each S: top-(N - floor(S N)) visual tokens by router probability run
                        each MoD layer, the rest skip it (S = 0: all run, the routing machinery's own cost)
  gamma-mod S threshold GammaMoD(skip=S, routing="threshold", threshold=T) in eval for S = 0.5: the visual tokens
                        with p > T run; T (--gamma-mod-threshold) is found by bisection so that about half the
                        visual tokens run the MoD layers, unless given
  fastv@K =gamma-mod .. FastV(layer=K) at the same analytic prefill FLOPs (decoder + LM head) as each GammaMoD
                        setting with S > 0, found by the bisection above

Timing follows the project's notes on CPU timing: single-threaded by default,
the settings' runs interleaved round robin on one model (compress / uncompress between runs, outside the timed
region), the median reported. A prefill run is `model(**inputs, use_cache=True, logits_to_keep=1)` as in
`generate`; each prefill is followed by --decode-steps single-token forwards continuing from its cache, each
timed on its own.

Run from the repository root:

    python -m benchmarks.efficiency            # full size (minutes; keep the machine otherwise idle)
    python -m benchmarks.efficiency --quick    # tiny sizes, a smoke run in seconds
    python -m benchmarks.efficiency --pyramid 2x2 --keeps 0.5   # static pyramid vs FastV at equal FLOPs
    python -m benchmarks.efficiency --mustdrop 192 128 64       # MustDrop budgets (about 7 minutes)
    python -m benchmarks.efficiency --gamma-mod 0 0.34 0.5      # gamma-MoD skip ratios (about 6 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tokencompress as tc
from tokencompress.compressors.pyramid import depth_schedule
from tokencompress.tiny import (
    IMAGE_TOKEN_ID,
    finish_tiny_model,
    tiny_llava,
    tiny_llava_inputs,
    tiny_text_config,
)
from tokencompress.tiny_qwen import FAMILIES as QWEN_FAMILIES
from tokencompress.tiny_qwen import tiny_qwen_inputs, tiny_qwen_vl

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "efficiency.json"
MUSTDROP_OUT = DEFAULT_OUT.with_name("mustdrop.json")
GAMMA_MOD_OUT = DEFAULT_OUT.with_name("gamma_mod.json")
MiB = 2**20

# Thresholds of the targets the script reports PASS / MISS for.
TARGET_KEEP = 0.25
TARGET_REALIZED_OVER_ANALYTIC = 0.95
TARGET_NOOP_OVERHEAD = 0.02
# A FastV setting matched to a pyramid must land within this relative distance of its analytic prefill FLOPs.
MATCH_TOLERANCE = 0.01

QUICK = {
    "hidden": 128,
    "layers": 4,
    "heads": 4,
    "kv_heads": 4,
    "intermediate": 352,
    "vocab": 1000,
    "image_size": 112,
    "patch_size": 14,
    "vision_hidden": 32,
    "text_tokens": 16,
    "repeats": 3,
    "warmup": 1,
    "decode_steps": 4,
    "vision_heads": 2,
    "vision_intermediate": None,
}

# --mustdrop's defaults (explicit flags still win; --quick, a smoke run, overrides the sizes again): a LLaVA-1.5
# geometry (576 image tokens, a 24-layer CLIP tower read at layer -2, 32 decoder layers) scaled down in width so
# one bare prefill takes about 2.5 s on one CPU thread; the vision tower is ~16% of the bare analytic FLOPs.
MUSTDROP = {
    "hidden": 512,
    "layers": 32,
    "heads": 8,
    "kv_heads": 8,
    "intermediate": 1408,
    "vision_hidden": 256,
    "vision_layers": 24,
    "vision_heads": 4,
    "vision_intermediate": 1024,
    "vision_feature_layer": -2,
    "image": "blocks",
    "decode_steps": 4,
}
# --gamma-mod's defaults: the MustDrop mode's decoder (32 layers: "arank" = 28 MoD layers, as in the authors' 7B
# setting) and text length, behind the default small vision tower (gamma-MoD leaves the encoder alone).
GAMMA_MOD = {
    key: MUSTDROP[key] for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "decode_steps")
}
# The threshold setting: GammaMoD(skip=THRESHOLD_SKIP, routing="threshold"), its threshold found so that this
# share of the visual tokens runs the MoD layers (averaged over them), within THRESHOLD_SHARE_TOLERANCE.
THRESHOLD_SKIP = 0.5
THRESHOLD_SHARE = 1 - THRESHOLD_SKIP
THRESHOLD_SHARE_TOLERANCE = 0.005
# tiny_llava's vision tower: the plain run keeps building exactly that model.
TINY_VISION = {"vision_layers": 2, "vision_heads": 2, "vision_intermediate": None, "vision_feature_layer": -1}

CPU_MEMORY_METHOD = (
    "peak bytes held by torch's CPU allocator during one prefill, above the level at its start (weights and "
    "inputs excluded; the KV cache and logits the prefill returns included), from torch.profiler allocation "
    "events (profile_memory=True). Exact and repeatable, but blind to allocator caching, fragmentation and "
    "memory that does not go through torch's allocator. Process RSS is not used by default: its high-water "
    "mark is set by model construction, and glibc keeps freed pages; --rss adds a fresh-subprocess RSS "
    "cross-check."
)
CUDA_MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before the "
    "prefill (weights and inputs excluded; the KV cache and logits the prefill returns included)."
)
RSS_METHOD = (
    "peak RSS growth of one prefill in a fresh subprocess per setting: VmHWM after the prefill minus VmRSS "
    "before it, with the high-water mark reset through /proc/self/clear_refs and glibc told to serve "
    "allocations >= 128 KiB with mmap (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the RSS; after one "
    "warm-up prefill."
)


Pipeline = Callable[[], list[tc.Compressor]]


@dataclass
class Setting:
    """A named pipeline factory (None: the bare model) and what the report records about it."""

    name: str
    factory: Pipeline | None  # a fresh pipeline for every tc.compress
    # bare | noop | fastv | pyramid | fastv=pyramid (FastV matched to a pyramid's FLOPs) | mustdrop |
    # fastv=mustdrop (FastV matched to a MustDrop setting's total FLOPs, the vision encoder's included) |
    # gamma_mod | fastv=gamma_mod (FastV matched to a GammaMoD setting's prefill FLOPs)
    method: str = "bare"
    keep: float | None = None  # FastV: the ratio (for a matched setting, kept tokens / visual tokens)
    layer: int | None = None  # FastV's layer
    kernels: tuple[tuple[int, int], ...] | None = None  # pyramid: one kernel for all stages, or one per stage
    after_layers: tuple[int, ...] | None = None  # pyramid: explicit schedule (None: the library's default)
    budget: float | None = None  # mustdrop: the layer-averaged visual-token budget
    vision_stage: bool | None = None  # mustdrop: whether the vision stage (encoder window merge) is on
    skip: float | None = None  # gamma_mod: GammaMoD's skip
    routing: str | None = None  # gamma_mod: "topk" or "threshold"
    threshold: float | None = (
        None  # gamma_mod, routing="threshold": the router probability a token must exceed
    )
    matches: str | None = None  # fastv=...: the name of the setting it matches
    match: dict[str, Any] | None = None  # fastv=...: what match_flops found (keep, FLOPs, mismatch)

    @property
    def compressed(self) -> bool:
        return self.factory is not None

    def pipeline(self) -> list[tc.Compressor] | None:
        if self.factory is None:
            if self.method.startswith("fastv="):
                raise RuntimeError(f"{self.name}: its keep is found by match_flops first")
            return None
        return self.factory()

    def set_keep_count(self, count: int, visual: int) -> None:
        """A matched FastV setting: keep `count` visual tokens per sample (an int keep: exact, no rounding)."""
        layer = self.layer
        self.factory = lambda: [tc.FastV(layer=layer, keep=count)]
        self.keep = count / visual


def fastv_setting(name: str, layer: int, keep: float, method: str = "fastv") -> Setting:
    return Setting(name, lambda: [tc.FastV(layer=layer, keep=keep)], method, keep=keep, layer=layer)


def pyramid_setting(kernels: tuple[tuple[int, int], ...], after_layers: tuple[int, ...] | None) -> Setting:
    def factory() -> list[tc.Compressor]:
        return [tc.StaticPyramid(after_layers=after_layers, kernels=kernels, pooling="avg")]

    return Setting(
        f"pyramid {format_kernels(kernels)}", factory, "pyramid", kernels=kernels, after_layers=after_layers
    )


def mustdrop_setting(budget: float, vision_stage: bool, merge_threshold: float) -> Setting:
    def factory() -> list[tc.Compressor]:
        return [tc.MustDrop(budget=budget, vision_stage=vision_stage, merge_threshold=merge_threshold)]

    name = f"mustdrop {budget:g}" + ("" if vision_stage else " novision")
    return Setting(name, factory, "mustdrop", budget=budget, vision_stage=vision_stage)


def gamma_mod_setting(skip: float, routing: str, router: torch.nn.Linear) -> Setting:
    """GammaMoD(skip, routing) with the shared `router`; a threshold setting's threshold is set on the Setting
    (find_threshold, or --gamma-mod-threshold) before its first use."""
    setting = Setting(
        f"gamma-mod {skip:g}" + (" threshold" if routing == "threshold" else ""),
        None,
        "gamma_mod",
        skip=skip,
        routing=routing,
    )

    def factory() -> list[tc.Compressor]:
        if routing == "threshold" and setting.threshold is None:
            raise RuntimeError(f"{setting.name}: its threshold is found by find_threshold first")
        extra = {"threshold": setting.threshold} if routing == "threshold" else {}
        compressor = tc.GammaMoD(skip=skip, routing=routing, **extra)
        compressor.router = router  # bind keeps a router it already has: every setting routes alike
        return [compressor]

    setting.factory = factory
    return setting


def shared_router(args: argparse.Namespace) -> torch.nn.Linear:
    """GammaMoD's router, Linear(hidden, 2, bias=False), with PyTorch's default init (U(+-1/sqrt(hidden)), as the
    authors' untrained router) drawn from a generator seeded with --seed: reproducible, and the same for every
    setting and for the --rss subprocesses."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    bound = args.hidden**-0.5
    router = torch.nn.Linear(args.hidden, 2, bias=False)
    with torch.no_grad():
        router.weight.copy_((torch.rand(2, args.hidden, generator=generator) * 2 - 1) * bound)
    return router.to(device=args.device, dtype=getattr(torch, args.dtype))


def parse_kernels(text: str) -> tuple[tuple[int, int], ...]:
    """'2x2' -> ((2, 2),); '1x2,2x2,2x2' -> one (rows, cols) kernel per stage."""
    kernels = []
    for part in text.split(","):
        rows, sep, cols = part.strip().lower().partition("x")
        if not sep or not rows.isdigit() or not cols.isdigit() or int(rows) < 1 or int(cols) < 1:
            raise argparse.ArgumentTypeError(
                f"{text!r}: a pyramid is ROWSxCOLS (e.g. 2x2) or a comma list, one per stage (e.g. 1x2,2x2,2x2)"
            )
        kernels.append((int(rows), int(cols)))
    return tuple(kernels)


def format_kernels(kernels: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{r}x{c}" for r, c in kernels)


@dataclass
class Measurements:
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    switch_s: list[float] = field(default_factory=list)


# -- arguments ----------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.efficiency",
        description="Realized vs analytic efficiency of FastV, of static pooling pyramids (DPN without its "
        "routers), of MustDrop (--mustdrop) and of gamma-MoD (--gamma-mod) on a random LLaVA- or Qwen-VL-shaped "
        "model.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="weights / activations dtype (default: float32 on cpu, bfloat16 on cuda)",
    )
    parser.add_argument(
        "--model",
        choices=("llava", *QWEN_FAMILIES),
        default="llava",
        help="model shape: LLaVA-1.5 or a Qwen-VL family (same decoder sizes; the image gives the same token count)",
    )
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (each runs every setting once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps timed after each prefill")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (cpu)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--vision-layers", type=int, default=TINY_VISION["vision_layers"])
    parser.add_argument("--vision-heads", type=int, default=TINY_VISION["vision_heads"])
    parser.add_argument(
        "--vision-intermediate",
        type=int,
        default=TINY_VISION["vision_intermediate"],
        help="vision MLP width (default: 2 x --vision-hidden)",
    )
    parser.add_argument(
        "--vision-feature-layer",
        type=int,
        default=TINY_VISION["vision_feature_layer"],
        help="the vision tower's hidden state LLaVA reads (LLaVA-1.5: -2)",
    )
    parser.add_argument(
        "--image",
        choices=("noise", "blocks"),
        default="noise",
        help="pixel values: Gaussian noise, or flat colour blocks with noise patches (windows MustDrop can merge)",
    )
    parser.add_argument(
        "--text-tokens", type=int, default=60, help="text tokens around the image, per sample"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--fastv-layer", type=int, default=2)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument(
        "--pyramid",
        type=parse_kernels,
        nargs="+",
        default=[],
        metavar="KERNELS",
        help="static pyramid settings (StaticPyramid, avg pooling), each ROWSxCOLS for every stage or a comma list "
        "with one kernel per stage, e.g. --pyramid 2x2 1x2,2x2,2x2; each also gets a FastV setting at equal "
        "analytic prefill FLOPs",
    )
    parser.add_argument(
        "--pyramid-after",
        type=int,
        nargs="+",
        default=None,
        metavar="LAYER",
        help="pool after these decoder layers (default: the library's schedule, floor(L k / 4) - 1 for k = 1..3; "
        "with 8 layers after 1, 3, 5)",
    )
    parser.add_argument(
        "--mustdrop",
        type=float,
        nargs="+",
        default=[],
        metavar="BUDGET",
        help="MustDrop mode (LLaVA only): bare vs tc.MustDrop(budget=B) per budget (layer-averaged visual tokens, "
        "passed_on convention), on a deeper vision tower and a 32-layer decoder (see MUSTDROP in the source; "
        "explicit size flags still win), a block image, and FastV at equal analytic total FLOPs",
    )
    parser.add_argument(
        "--mustdrop-no-vision",
        type=float,
        nargs="*",
        default=None,
        metavar="BUDGET",
        help="budgets also run as MustDrop(budget=B, vision_stage=False) (default: the middle --mustdrop budget; "
        "give none to skip)",
    )
    parser.add_argument(
        "--mustdrop-fastv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a FastV setting at each MustDrop budget's analytic total FLOPs (default: on)",
    )
    parser.add_argument(
        "--gamma-mod",
        type=float,
        nargs="+",
        default=[],
        metavar="SKIP",
        help="gamma-MoD mode: bare vs tc.GammaMoD(skip=S) per skip ratio (0 <= S < 1; 0: every visual token runs, "
        "the routing's own cost), one threshold-routed GammaMoD(skip=0.5) and FastV at each one's analytic prefill "
        "FLOPs, on the MustDrop mode's 32-layer decoder (see GAMMA_MOD in the source; explicit size flags still win)",
    )
    parser.add_argument(
        "--gamma-mod-threshold",
        type=float,
        default=None,
        metavar="P",
        help=f"the threshold setting's router threshold (default: found by bisection so that a share of "
        f"{THRESHOLD_SHARE:g} of the visual tokens runs the MoD layers)",
    )
    parser.add_argument(
        "--gamma-mod-threshold-setting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the threshold-routed GammaMoD setting (default: on)",
    )
    parser.add_argument(
        "--gamma-mod-fastv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a FastV setting at each GammaMoD setting's analytic prefill FLOPs (skip > 0; default: on)",
    )
    parser.add_argument(
        "--merge-threshold",
        type=float,
        default=0.8,
        help="MustDrop's merge_threshold (mean pairwise cosine of a 3x3 window at the encoder's layer 0)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rss",
        action="store_true",
        help="also measure peak RSS growth in a fresh subprocess per setting (cpu)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON results file (default: {DEFAULT_OUT.name}, with --mustdrop {MUSTDROP_OUT.name}, with "
        f"--gamma-mod {GAMMA_MOD_OUT.name}, in benchmarks/results)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few repeats: a smoke run in seconds (explicit size flags still apply)",
    )
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-child-keep", type=int, default=None, help=argparse.SUPPRESS)
    known = parser.parse_known_args(argv)[0]
    if known.mustdrop:  # --mustdrop changes the defaults; explicit flags still win
        parser.set_defaults(**MUSTDROP)
    if known.gamma_mod:  # so does --gamma-mod
        parser.set_defaults(**GAMMA_MOD)
    if known.quick:  # so does --quick, after --mustdrop's (a smoke run)
        parser.set_defaults(**QUICK)
        if known.gamma_mod:  # "arank" leaves no MoD layer in 4 layers; 8 give 3, 4, 5, 6
            parser.set_defaults(layers=8)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = MUSTDROP_OUT if args.mustdrop else GAMMA_MOD_OUT if args.gamma_mod else DEFAULT_OUT
    if args.gamma_mod:
        if args.mustdrop or args.pyramid:
            parser.error("--gamma-mod, --mustdrop and --pyramid are separate runs")
        if any(not 0 <= s < 1 for s in args.gamma_mod):
            parser.error(f"--gamma-mod skip ratios must be in [0, 1), got {args.gamma_mod}")
        if len(set(args.gamma_mod)) != len(args.gamma_mod):
            parser.error(f"--gamma-mod skip ratios given twice: {args.gamma_mod}")
        if args.layers < 5:
            parser.error(
                "--gamma-mod: GammaMoD's default layers ('arank': all but 0, 1, 2 and the last) need 5+"
            )
        threshold = args.gamma_mod_threshold
        if threshold is not None and not 0 <= threshold < 1:
            parser.error(f"--gamma-mod-threshold is a router probability in [0, 1), got {threshold}")
    elif args.gamma_mod_threshold is not None:
        parser.error("--gamma-mod-threshold needs --gamma-mod")
    if args.mustdrop:
        if args.model != "llava":
            parser.error("--mustdrop: LLaVA only (its vision stage needs a CLS-style encoder)")
        if args.pyramid:
            parser.error("--mustdrop and --pyramid are separate runs")
        if any(b <= 0 for b in args.mustdrop):
            parser.error(f"--mustdrop budgets must be positive, got {args.mustdrop}")
        if args.mustdrop_no_vision is None:
            args.mustdrop_no_vision = [sorted(args.mustdrop)[len(args.mustdrop) // 2]]
    elif args.mustdrop_no_vision:
        parser.error("--mustdrop-no-vision needs --mustdrop")
    if args.mustdrop_no_vision is None:
        args.mustdrop_no_vision = []
    if args.model != "llava" and any(getattr(args, k) != v for k, v in TINY_VISION.items()):
        parser.error(
            "--vision-layers / --vision-heads / --vision-intermediate / --vision-feature-layer: LLaVA only"
        )
    if args.model != "llava" and args.image != "noise":
        parser.error("--image: LLaVA only")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.repeats < 1 or args.decode_steps < 1:
        parser.error("--repeats and --decode-steps must be at least 1")
    if not 1 <= args.fastv_layer < args.layers:
        parser.error(f"--fastv-layer must be in [1, {args.layers - 1}]")
    after = args.pyramid_after
    if after is not None:
        increasing = all(a < b for a, b in zip(after, after[1:], strict=False))
        if not increasing or after[0] < 0 or after[-1] > args.layers - 2:
            parser.error(f"--pyramid-after must be increasing layers in [0, {args.layers - 2}], got {after}")
    if args.pyramid:
        if args.layers < 2:
            parser.error("--pyramid needs at least 2 layers")
        stages = len(after) if after is not None else len(depth_schedule(args.layers))
        for kernels in args.pyramid:
            if len(kernels) not in (1, stages):
                parser.error(
                    f"--pyramid {format_kernels(kernels)}: {len(kernels)} kernels for {stages} stages; give one "
                    "kernel for all stages or one per stage"
                )
    return args


def make_settings(args: argparse.Namespace) -> list[Setting]:
    """bare and noop first (the targets read them there), then FastV per --keeps, then each pyramid followed
    by its FLOPs-matched FastV (whose keep match_flops finds once the model is built)."""
    layer = args.fastv_layer
    if args.mustdrop:
        return make_mustdrop_settings(args)
    if args.gamma_mod:
        return make_gamma_mod_settings(args)
    settings = [Setting("bare", None), fastv_setting("noop", layer, 1.0, method="noop")]
    for keep in args.keeps:
        settings.append(fastv_setting(f"fastv@{layer} {keep:.2f}", layer, keep))
    after = tuple(args.pyramid_after) if args.pyramid_after is not None else None
    for kernels in args.pyramid:
        pyramid = pyramid_setting(kernels, after)
        matched = Setting(
            f"fastv@{layer} ={pyramid.name}", None, "fastv=pyramid", layer=layer, matches=pyramid.name
        )
        settings += [pyramid, matched]
    names = [s.name for s in settings]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"settings given twice: {duplicates}")
    return settings


def make_mustdrop_settings(args: argparse.Namespace) -> list[Setting]:
    """bare, noop (the engine's own overhead at this depth), MustDrop per budget (vision stage on), MustDrop
    without its vision stage per --mustdrop-no-vision budget, then FastV at each budget's analytic total FLOPs
    (match_flops finds the keep)."""
    threshold, layer = args.merge_threshold, args.fastv_layer
    settings = [Setting("bare", None), fastv_setting("noop", layer, 1.0, method="noop")]
    settings += [mustdrop_setting(budget, True, threshold) for budget in args.mustdrop]
    settings += [mustdrop_setting(budget, False, threshold) for budget in args.mustdrop_no_vision]
    if args.mustdrop_fastv:
        for budget in args.mustdrop:
            name = f"mustdrop {budget:g}"
            settings.append(
                Setting(f"fastv@{layer} ={name}", None, "fastv=mustdrop", layer=layer, matches=name)
            )
    names = [s.name for s in settings]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"settings given twice: {duplicates}")
    return settings


def make_gamma_mod_settings(args: argparse.Namespace) -> list[Setting]:
    """bare, noop, GammaMoD per skip ratio (top-k routing), the threshold-routed GammaMoD(skip=0.5) (its
    threshold: --gamma-mod-threshold, or find_threshold once the model is built), then FastV at each GammaMoD
    setting's analytic prefill FLOPs (skip > 0; match_flops finds the keep). All GammaMoD settings share one
    seeded router."""
    layer, router = args.fastv_layer, shared_router(args)
    settings = [Setting("bare", None), fastv_setting("noop", layer, 1.0, method="noop")]
    mod = [gamma_mod_setting(skip, "topk", router) for skip in args.gamma_mod]
    if args.gamma_mod_threshold_setting:
        mod.append(gamma_mod_setting(THRESHOLD_SKIP, "threshold", router))
        mod[-1].threshold = args.gamma_mod_threshold
    settings += mod
    if args.gamma_mod_fastv:
        for setting in mod:
            if setting.skip > 0 or setting.routing == "threshold":
                settings.append(
                    Setting(
                        f"fastv@{layer} ={setting.name}",
                        None,
                        "fastv=gamma_mod",
                        layer=layer,
                        matches=setting.name,
                    )
                )
    names = [s.name for s in settings]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SystemExit(f"settings given twice: {duplicates}")
    return settings


# -- model, inputs, switching -------------------------------------------------------------------------------
def build(args: argparse.Namespace) -> tuple[Any, dict[str, torch.Tensor]]:
    dtype = getattr(torch, args.dtype)
    if args.model != "llava":
        return build_qwen(args, dtype)
    sizes = dict(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        image_size=args.image_size,
        patch_size=args.patch_size,
        vision_hidden=args.vision_hidden,
        attn_implementation=args.attn,
        seed=args.seed,
        dtype=dtype,
    )
    if all(getattr(args, k) == v for k, v in TINY_VISION.items()):
        model = tiny_llava(**sizes)
    else:
        model = llava_with_vision(
            **sizes,
            vision_layers=args.vision_layers,
            vision_heads=args.vision_heads,
            vision_intermediate=args.vision_intermediate or 2 * args.vision_hidden,
            vision_feature_layer=args.vision_feature_layer,
        )
    model = model.to(args.device)
    # A LLaVA-1.5 prompt: "USER: <image>\n{question} ASSISTANT:" -- a short prefix, the rest after the image.
    prefix = min(5, args.text_tokens // 4)
    inputs = tiny_llava_inputs(
        model, [(prefix, args.text_tokens - prefix)] * args.batch, [1] * args.batch, seed=args.seed
    )
    if args.image == "blocks":
        images = [block_image(args.image_size, args.seed + i) for i in range(args.batch)]
        inputs["pixel_values"] = torch.stack(images).to(model.dtype)
    return model, {k: v.to(args.device) for k, v in inputs.items()}


def llava_with_vision(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    image_size: int,
    patch_size: int,
    vision_hidden: int,
    vision_layers: int,
    vision_heads: int,
    vision_intermediate: int,
    vision_feature_layer: int,
    attn_implementation: str,
    seed: int,
    dtype: torch.dtype,
) -> Any:
    """tiny_llava with a vision tower of any depth and width (tiny_llava's is fixed at 2 layers, 2 heads)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    if vision_hidden % vision_heads:
        raise SystemExit(
            f"--vision-hidden {vision_hidden} is not a multiple of --vision-heads {vision_heads}"
        )
    if not -vision_layers <= vision_feature_layer <= vision_layers:
        raise SystemExit(
            f"--vision-feature-layer {vision_feature_layer}: the tower has {vision_layers} layers"
        )
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = LlavaConfig(
        text_config=tiny_text_config(hidden, layers, heads, kv_heads, intermediate, vocab),
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    return finish_tiny_model(LlavaForConditionalGeneration(config), hidden, dtype)


def block_image(size: int, seed: int) -> torch.Tensor:
    """(3, size, size) normalized pixel values: a flat background, flat colour rectangles and Gaussian-noise
    rectangles (textured regions) at seeded random places, not aligned to patches."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    def rectangle(low: float, high: float) -> tuple[slice, slice]:
        height, width = (int(size * f) for f in uniform(low, high, 2))
        top, left = (
            int(v) for v in torch.randint(0, size - min(height, width) + 1, (2,), generator=generator)
        )
        return slice(top, top + height), slice(left, left + width)

    image = uniform(-1.5, 1.5, 3, 1, 1).expand(3, size, size).clone()
    for _ in range(4):  # flat colour blocks
        rows, cols = rectangle(0.15, 0.4)
        image[:, rows, cols] = uniform(-1.5, 1.5, 3, 1, 1)
    for _ in range(2):  # textured regions
        rows, cols = rectangle(0.25, 0.45)
        patch = image[:, rows, cols]
        image[:, rows, cols] = torch.randn(patch.shape, generator=generator)
    return image


def build_qwen(args: argparse.Namespace, dtype: torch.dtype) -> tuple[Any, dict[str, torch.Tensor]]:
    """A Qwen-VL-shaped model with the same decoder sizes; the image is (2 side) x (2 side) patches, which the
    2 x 2 merger turns into side x side tokens, side = image_size / patch_size (576 tokens by default)."""
    model = tiny_qwen_vl(
        args.model,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        attn_implementation=args.attn,
        seed=args.seed,
        dtype=dtype,
        vision_hidden=args.vision_hidden,
    ).to(args.device)
    side = 2 * (args.image_size // args.patch_size)
    prefix = min(5, args.text_tokens // 4)
    sample = [("text", prefix), ("image", (side, side)), ("text", args.text_tokens - prefix)]
    inputs = tiny_qwen_inputs(model, [sample] * args.batch, seed=args.seed)
    return model, {k: v.to(args.device) for k, v in inputs.items()}


class Switcher:
    """Puts one model into a setting with tc.compress / tc.uncompress (cheap, and never timed)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.current: Setting | None = None

    def to(self, setting: Setting) -> None:
        if self.current is not None and self.current.compressed:
            tc.uncompress(self.model)
        pipeline = setting.pipeline()
        if pipeline is not None:
            tc.compress(self.model, pipeline)
        self.current = setting


# -- timed pieces -------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prefill(model: Any, inputs: dict[str, torch.Tensor]) -> Any:
    return model(**inputs, use_cache=True, logits_to_keep=1)


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def run_once(
    model: Any, inputs: dict[str, torch.Tensor], steps: int, device: str
) -> tuple[float, list[float]]:
    """One timed prefill, then `steps` timed single-token forwards continuing from its cache."""
    out, prefill_s = timed(lambda: prefill(model, inputs), device)
    batch, length = inputs["input_ids"].shape
    mask = torch.cat(
        [inputs["attention_mask"], inputs["attention_mask"].new_ones(batch, steps)], dim=1
    )  # built once, sliced per step: nothing but the forward is timed
    positions = torch.arange(length, length + steps, device=device).expand(batch, steps)
    rope_deltas = getattr(getattr(model, "model", None), "rope_deltas", None)
    if rope_deltas is not None:  # Qwen-VL: text positions after the image continue from its M-RoPE offset
        positions = positions + rope_deltas
    cache, decode_s = out.past_key_values, []
    token = out.logits[:, -1:].argmax(-1)
    for step in range(steps):

        def forward(step: int = step, token: torch.Tensor = token) -> Any:
            return model(
                input_ids=token,
                attention_mask=mask[:, : length + step + 1],
                position_ids=positions[:, step : step + 1],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )

        step_out, seconds = timed(forward, device)
        decode_s.append(seconds)
        token = step_out.logits[:, -1:].argmax(-1)
    return prefill_s, decode_s


def time_interleaved(
    model: Any, inputs: dict[str, torch.Tensor], settings: list[Setting], args: argparse.Namespace
) -> dict[str, Measurements]:
    """Round robin over the settings; the starting setting rotates each round so none is always first."""
    switcher = Switcher(model)
    results = {s.name: Measurements() for s in settings}
    total = args.warmup + args.repeats
    for round_index in range(total):
        shift = round_index % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            start = time.perf_counter()
            switcher.to(setting)
            switch_s = time.perf_counter() - start
            gc.collect()
            prefill_s, decode_s = run_once(model, inputs, args.decode_steps, args.device)
            if round_index >= args.warmup:
                results[setting.name].prefill_s.append(prefill_s)
                results[setting.name].decode_s.extend(decode_s)
                results[setting.name].switch_s.append(switch_s)
        done = round_index + 1
        label = "warm-up" if done <= args.warmup else "timed"
        print(f"  round {done}/{total} ({label})", file=sys.stderr, flush=True)
    switcher.to(settings[0])
    return results


# -- memory ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_stderr_fd() -> Iterator[None]:
    """The CPU profiler prints start/stop lines straight to fd 2; keep them out of the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_prefill_bytes(model: Any, inputs: dict[str, torch.Tensor], device: str) -> tuple[int, int]:
    """(peak, retained) bytes allocated by one prefill above the level at its start."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = prefill(model, inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        retained = torch.cuda.memory_allocated() - before
        del out
        return peak, retained

    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = prefill(model, inputs)
    del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            level += event.nbytes()
            peak = max(peak, level)
    return peak, level


def rss_child(args: argparse.Namespace) -> None:
    """--rss-child NAME: build the model, run one prefill of setting NAME, print its peak RSS growth as JSON."""

    def status_kib(field_name: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"no {field_name} in /proc/self/status")

    torch.set_num_threads(args.threads)
    model, inputs = build(args)
    setting = next(s for s in make_settings(args) if s.name == args.rss_child)
    if setting.method.startswith("fastv="):  # the parent found the keep (a count) and passes it on
        setting.set_keep_count(args.rss_child_keep, visual=args.rss_child_keep)
    Switcher(model).to(setting)
    with torch.inference_mode():
        prefill(model, inputs)  # warm-up: one-time lazy initialisation stays out of the measurement
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = status_kib("VmRSS")
    with torch.inference_mode():
        out = prefill(model, inputs)
    peak = status_kib("VmHWM")
    del out
    print(json.dumps({"rss_peak_growth_bytes": (peak - before) * 1024}))


def rss_in_subprocess(args: argparse.Namespace, argv: Sequence[str], setting: Setting) -> int | None:
    name = setting.name
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    command = [sys.executable, "-m", "benchmarks.efficiency", *argv, "--rss-child", name]
    if setting.match is not None:
        command += ["--rss-child-keep", str(setting.match["keep_count"])]
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        print(f"  --rss {name}: subprocess failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["rss_peak_growth_bytes"]


def cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


# -- equal-FLOPs matching -------------------------------------------------------------------------------------
def probe_flops(
    model: Any, pipeline: list[tc.Compressor], inputs: dict[str, torch.Tensor], total: bool = False
) -> tuple[int, int]:
    """(analytic prefill FLOPs, fewest visual tokens of a sample at the first layer) of one probe forward;
    total: the vision encoder's FLOPs included (stats.total_flops)."""
    tc.compress(model, pipeline)
    try:
        prefill(model, inputs)
        stats = tc.stats(model).prefill
        return stats.total_flops if total else stats.flops, min(stats.layers[0].visual)
    finally:
        tc.uncompress(model)


def bisect_keep(
    model: Any, inputs: dict[str, torch.Tensor], layer: int, target: int, visual: int, total: bool = False
) -> tuple[int, int, int]:
    """(count, its FLOPs, probe forwards): the FastV(layer, keep=count) with FLOPs closest to `target`. FLOPs
    grow with the count, so bisect for the fewest tokens reaching the target, then take it or the one below."""
    costs: dict[int, int] = {}

    def cost(count: int) -> int:
        if count not in costs:
            costs[count] = probe_flops(model, [tc.FastV(layer=layer, keep=count)], inputs, total)[0]
        return costs[count]

    low, high = 1, visual
    while low < high:
        middle = (low + high) // 2
        if cost(middle) >= target:
            high = middle
        else:
            low = middle + 1
    count = min((c for c in (low - 1, low) if c >= 1), key=lambda c: abs(cost(c) - target))
    return count, cost(count), len(costs)


def match_flops(model: Any, inputs: dict[str, torch.Tensor], settings: list[Setting]) -> list[dict[str, Any]]:
    """Give every fastv=pyramid (fastv=gamma_mod) setting the FastV keep (a token count) whose analytic prefill
    FLOPs come closest to its pyramid's (GammaMoD setting's), and every fastv=mustdrop setting the one whose analytic total FLOPs (the vision
    encoder's included) come closest to its MustDrop setting's: bisection over the count, each candidate costed
    by a probe forward. A fastv=mustdrop setting no keep brings within MATCH_TOLERANCE is removed from
    `settings` (FastV cannot get that cheap) and returned, with what the closest keep gave."""
    by_name = {s.name: s for s in settings}
    unmatched = []
    for setting in list(settings):
        if not setting.method.startswith("fastv="):
            continue
        total = setting.method == "fastv=mustdrop"
        partner = by_name[setting.matches]
        target, visual = probe_flops(model, partner.pipeline(), inputs, total)
        count, flops, probes = bisect_keep(model, inputs, setting.layer, target, visual, total)
        mismatch = flops / target - 1
        setting.set_keep_count(count, visual)
        setting.match = {
            "matches": partner.name,
            "measure": "total (decoder + LM head + vision encoder)"
            if total
            else "prefill (decoder + LM head)",
            "keep_count": count,
            "visual_tokens": visual,
            "keep": setting.keep,
            "flops": flops,
            "target_flops": target,
            "mismatch": mismatch,
            "probe_forwards": probes + 1,
        }
        print(
            f"  {setting.name}: keep {count}/{visual} = {setting.keep:.4f}, FLOPs mismatch {mismatch:+.3%} "
            f"({probes + 1} probe forwards)",
            file=sys.stderr,
            flush=True,
        )
        if abs(mismatch) > MATCH_TOLERANCE and total:
            print(
                f"  {setting.name}: FastV at layer {setting.layer} cannot reach {partner.name}'s total FLOPs "
                "(its unpruned first layers and full vision encoder cost more); left out",
                file=sys.stderr,
                flush=True,
            )
            settings.remove(setting)
            unmatched.append({"setting": setting.name, **setting.match})
            continue
        if abs(mismatch) > MATCH_TOLERANCE:
            raise SystemExit(
                f"{setting.name}: the closest FastV keep ({count} of {visual} tokens) is {mismatch:+.2%} off "
                f"{partner.name}'s analytic prefill FLOPs (tolerance {MATCH_TOLERANCE:.0%}): FastV at layer "
                f"{setting.layer} cannot reach them; try a smaller --fastv-layer or a gentler setting"
            )
    return unmatched


def routed_share(stats: Any, layers: Sequence[int]) -> float:
    """The share of the visual tokens entering the decoder that ran the given (MoD) layers, over those layers and
    the batch: sum of visual tokens processed there / (layers x visual tokens at layer 0)."""
    entering = sum(stats.layers[0].visual)
    ran = sum(sum(stats.layers[index].visual) for index in layers)
    return ran / (len(layers) * entering) if entering else float("nan")


def find_threshold(
    model: Any, inputs: dict[str, torch.Tensor], setting: Setting, target: float
) -> dict[str, Any]:
    """Set a threshold-routed GammaMoD setting's threshold so that a `target` share of the visual tokens runs its
    MoD layers: bisection over [0, 1) on the probe forwards' routed_share (fewer run as the threshold rises),
    until within THRESHOLD_SHARE_TOLERANCE or 30 probes; the closest threshold tried is kept."""
    tried: dict[float, float] = {}

    def share(threshold: float) -> float:
        setting.threshold = threshold
        tc.compress(model, setting.pipeline())
        try:
            prefill(model, inputs)
            layers = tc.compressors_of(model)[0].acting_layers()
            tried[threshold] = routed_share(tc.stats(model).prefill, layers)
        finally:
            tc.uncompress(model)
        return tried[threshold]

    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        achieved = share(middle)
        if abs(achieved - target) <= THRESHOLD_SHARE_TOLERANCE:
            break
        if achieved > target:
            low = middle
        else:
            high = middle
    best = min(tried, key=lambda t: abs(tried[t] - target))
    setting.threshold = best
    print(
        f"  {setting.name}: threshold {best:.6f} routes {tried[best]:.2%} of the visual tokens through the MoD "
        f"layers (target {target:.0%}; {len(tried)} probe forwards)",
        file=sys.stderr,
        flush=True,
    )
    return {
        "threshold": best,
        "routed_share": tried[best],
        "target_share": target,
        "probe_forwards": len(tried),
    }


# -- probe: analytic FLOPs, KV bytes, memory, sanity --------------------------------------------------------
def probe(
    model: Any, inputs: dict[str, torch.Tensor], settings: list[Setting], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    switcher = Switcher(model)
    info: dict[str, dict[str, Any]] = {}
    reference = None
    for setting in settings:
        switcher.to(setting)
        out = prefill(model, inputs)
        logits = out.logits[:, -1].float()
        if reference is None:
            reference = logits
        row: dict[str, Any] = {
            "kv_bytes": cache_bytes(out.past_key_values),
            "max_abs_logit_diff_vs_bare": (logits - reference).abs().max().item(),
            "same_next_token_as_bare": bool(torch.equal(logits.argmax(-1), reference.argmax(-1))),
        }
        if setting.compressed:
            stats = tc.stats(model)
            row.update(
                prefill_flops=stats.prefill.flops,
                prefill_baseline_flops=stats.prefill.baseline_flops,
                scoring_flops=stats.prefill.scoring_flops,
                compressor_extra_flops=stats.prefill.extra_flops,
                kv_bytes_stats=stats.kv_cache_bytes,
                kv_bytes_uncompressed_stats=stats.kv_cache_bytes_uncompressed,
                kv_cache_entries=stats.kv_cache_entries,
                kept_tokens_per_layer=[t[0] for t in stats.prefill.kept_tokens()],
                visual_tokens_per_layer=[layer.visual[0] for layer in stats.prefill.layers],
                encoder_flops=stats.prefill.encoder_flops,
                baseline_encoder_flops=stats.prefill.baseline_encoder_flops,
                total_flops=stats.prefill.total_flops,
                baseline_total_flops=stats.prefill.baseline_total_flops,
                tokens_per_stage=stats.prefill.tokens_per_stage(),
                average_visual_tokens_passed_on=stats.prefill.average_visual_tokens("passed_on"),
                average_visual_tokens_processed=stats.prefill.average_visual_tokens("processed"),
            )
            if setting.method == "mustdrop":  # the filter schedule the library resolved for this model
                compressor = tc.compressors_of(model)[0]
                row.update(
                    mustdrop_acting_layers=compressor.acting_layers(),
                    mustdrop_filter_layers=list(compressor.after),
                )
            if setting.method == "gamma_mod":  # the MoD layers the library resolved, and what ran them
                compressor = tc.compressors_of(model)[0]
                layers = compressor.acting_layers()
                row.update(
                    gamma_mod_layers=layers,
                    gamma_mod_skip=setting.skip,
                    gamma_mod_routing=setting.routing,
                    gamma_mod_threshold=setting.threshold,
                    gamma_mod_mlp_scale=compressor.mlp_scale,
                    routed_share=routed_share(stats.prefill, layers),
                    routed_per_layer=[int(stats.prefill.decisions[i]["routed"][0]) for i in layers],
                )
            if setting.method == "pyramid":  # the schedule the library resolved for this model
                acting = tc.compressors_of(model)[0].acting_layers()
                row.update(pyramid_acting_layers=acting, pyramid_after_layers=[a - 1 for a in acting])
            run_once(model, inputs, 1, args.device)
            last = tc.stats(model).last
            row.update(decode_flops=last.flops, decode_baseline_flops=last.baseline_flops)
        del out
        peak, retained = peak_prefill_bytes(model, inputs, args.device)
        row.update(peak_bytes=peak, retained_bytes=retained)
        info[setting.name] = row
    # The bare model has no stats of its own: its analytic cost is what every compressed run calls baseline.
    compressed = [info[s.name] for s in settings if s.compressed]
    bare = info[settings[0].name]
    bare["prefill_flops"] = bare["prefill_baseline_flops"] = compressed[0]["prefill_baseline_flops"]
    bare["decode_flops"] = bare["decode_baseline_flops"] = compressed[0]["decode_baseline_flops"]
    bare["scoring_flops"] = 0
    first = compressed[0]
    bare["encoder_flops"] = bare["baseline_encoder_flops"] = first["baseline_encoder_flops"]
    bare["total_flops"] = bare["baseline_total_flops"] = first["baseline_total_flops"]
    bare["tokens_per_stage"] = {"input": first["tokens_per_stage"]["input"]}
    bare["average_visual_tokens_passed_on"] = [float(n) for n in first["tokens_per_stage"]["input"]]
    bare["average_visual_tokens_processed"] = bare["average_visual_tokens_passed_on"]
    switcher.to(settings[0])
    return info


def vision_seconds(model: Any, inputs: dict[str, torch.Tensor], args: argparse.Namespace) -> float:
    """Median time of the vision tower + projector alone: a fixed cost that compression cannot touch and that
    the analytic FLOPs (decoder + LM head) leave out."""
    config = model.config
    if args.model == "llava":
        extra = {
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
        }
    else:
        extra = {"image_grid_thw": inputs["image_grid_thw"]}
    times = []
    for index in range(args.warmup + args.repeats):
        _, seconds = timed(
            lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra), args.device
        )
        if index >= args.warmup:
            times.append(seconds)
    return statistics.median(times)


def encoder_seconds_interleaved(
    model: Any, inputs: dict[str, torch.Tensor], settings: list[Setting], args: argparse.Namespace
) -> dict[str, list[float]]:
    """Per setting, the times of the vision tower + projector alone (get_image_features, under the setting's
    hooks, so MustDrop's vision stage runs the shortened encoder), interleaved round robin like the prefills.
    The hooks keep each call's merge record for a next prefill; switching (tc.uncompress) drops it."""
    config = model.config
    extra = {
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }
    switcher = Switcher(model)
    times: dict[str, list[float]] = {s.name: [] for s in settings}
    for round_index in range(args.warmup + args.repeats):
        shift = round_index % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            switcher.to(setting)
            gc.collect()
            _, seconds = timed(
                lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra),
                args.device,
            )
            if round_index >= args.warmup:
                times[setting.name].append(seconds)
    switcher.to(settings[0])
    return times


# -- report ---------------------------------------------------------------------------------------------------
def spread(values: list[float]) -> float:
    """Interquartile range over the median."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[2] - q[0]) / statistics.median(values)


def summarize(
    settings: list[Setting], timings: dict[str, Measurements], info: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    bare = settings[0].name
    bare_prefill = statistics.median(timings[bare].prefill_s)
    bare_decode = statistics.median(timings[bare].decode_s)
    bare_peak = info[bare]["peak_bytes"]
    bare_kv = info[bare]["kv_bytes"]
    rows = []
    for setting in settings:
        t, i = timings[setting.name], info[setting.name]
        prefill_s = statistics.median(t.prefill_s)
        decode_s = statistics.median(t.decode_s)
        realized = bare_prefill / prefill_s
        analytic = i["prefill_baseline_flops"] / i["prefill_flops"]
        row = {
            "setting": setting.name,
            "method": setting.method,
            "keep": setting.keep,
            "fastv_layer": setting.layer,
            "pyramid_kernels": None if setting.kernels is None else [list(k) for k in setting.kernels],
            "pyramid_after_layers_requested": setting.after_layers and list(setting.after_layers),
            "matches": setting.matches,
            "flops_match": setting.match,
            "budget": setting.budget,
            "vision_stage": setting.vision_stage,
            "prefill_ms": prefill_s * 1e3,
            "prefill_spread_iqr_over_median": spread(t.prefill_s),
            "prefill_speedup": realized,
            "analytic_flops_ratio_vs_bare": i["prefill_flops"] / i["prefill_baseline_flops"],
            "analytic_flops_speedup": analytic,
            "realized_over_analytic": realized / analytic,
            "decode_ms_per_step": decode_s * 1e3,
            "decode_spread_iqr_over_median": spread(t.decode_s),
            "decode_speedup": bare_decode / decode_s,
            "decode_analytic_flops_speedup": i["decode_baseline_flops"] / i["decode_flops"],
            "peak_mib": i["peak_bytes"] / MiB,
            "peak_ratio_vs_bare": i["peak_bytes"] / bare_peak if bare_peak else float("nan"),
            "kv_mib": i["kv_bytes"] / MiB,
            "kv_ratio_vs_bare": i["kv_bytes"] / bare_kv if bare_kv else float("nan"),
            "switch_ms_mean_untimed": statistics.fmean(t.switch_s) * 1e3,
            "prefill_ms_all": [s * 1e3 for s in t.prefill_s],
            "decode_ms_all": [s * 1e3 for s in t.decode_s],
            **i,
        }
        if i.get("baseline_encoder_flops"):  # the vision encoder counted too (the adapter exposes it)
            total_speedup = i["baseline_total_flops"] / i["total_flops"]
            row.update(
                analytic_encoder_flops_ratio_vs_bare=i["encoder_flops"] / i["baseline_encoder_flops"],
                analytic_total_flops_ratio_vs_bare=i["total_flops"] / i["baseline_total_flops"],
                analytic_total_flops_speedup=total_speedup,
                realized_over_analytic_total=realized / total_speedup,
            )
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], rss: bool) -> str:
    header = [
        "setting",
        "prefill ms",
        "iqr",
        "speedup",
        "FLOPs/bare",
        "FLOPs x",
        "real/anl",
        "decode ms",
        "iqr",
        "dec x",
        "peak MiB",
        "mem x",
        "KV MiB",
    ]
    if rss:
        header.append("RSS MiB")
    lines = []
    for r in rows:
        cells = [
            r["setting"],
            f"{r['prefill_ms']:.1f}",
            f"{r['prefill_spread_iqr_over_median']:.0%}",
            f"{r['prefill_speedup']:.3f}",
            f"{r['analytic_flops_ratio_vs_bare']:.3f}",
            f"{r['analytic_flops_speedup']:.3f}",
            f"{r['realized_over_analytic']:.3f}",
            f"{r['decode_ms_per_step']:.2f}",
            f"{r['decode_spread_iqr_over_median']:.0%}",
            f"{r['decode_speedup']:.3f}",
            f"{r['peak_mib']:.2f}",
            f"{r['peak_ratio_vs_bare']:.3f}",
            f"{r['kv_mib']:.2f}",
        ]
        if rss:
            value = r.get("rss_peak_growth_bytes")
            cells.append("n/a" if value is None else f"{value / MiB:.1f}")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*c) for c in lines]
    return "\n".join(out)


def render(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    return "\n".join(out + [fmt.format(*c) for c in lines])


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def add_mustdrop_figures(
    rows: list[dict[str, Any]], encoder_times: dict[str, list[float]], args: argparse.Namespace
) -> None:
    """Per row: the encoder's median time and speedup, its analytic speedup, the windows the vision stage merged
    (sample means), and the KV cache against the uncompressed one."""
    window = 3  # MustDrop's default merge_window
    side = args.image_size // args.patch_size
    windows = (side // window) ** 2
    bare_encoder = statistics.median(encoder_times[rows[0]["setting"]])
    bare_kv = rows[0]["kv_bytes"]
    for r in rows:
        encoder_s = statistics.median(encoder_times[r["setting"]])
        stages = r.get("tokens_per_stage", {})
        entering = stages.get("vision encoder", stages.get("input"))
        merged = [(n - m) / (window * window - 1) for n, m in zip(stages["input"], entering, strict=True)]
        r.update(
            encoder_ms=encoder_s * 1e3,
            encoder_ms_all=[t * 1e3 for t in encoder_times[r["setting"]]],
            encoder_spread_iqr_over_median=spread(encoder_times[r["setting"]]),
            encoder_speedup=bare_encoder / encoder_s,
            encoder_analytic_flops_speedup=r["baseline_encoder_flops"] / r["encoder_flops"],
            decoder_ms_estimate=r["prefill_ms"] - encoder_s * 1e3,
            decoder_speedup_estimate=(rows[0]["prefill_ms"] - bare_encoder * 1e3)
            / (r["prefill_ms"] - encoder_s * 1e3),
            visual_tokens_after_encoder=entering,
            windows_merged=merged,
            windows_merged_fraction=mean(merged) / windows,
            windows_per_image=windows,
            kv_bytes_stats=r.get("kv_bytes_stats", bare_kv),  # bare: the returned cache's bytes
            kv_bytes_uncompressed=r.get("kv_bytes_uncompressed_stats", bare_kv),
        )


def format_mustdrop_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "setting",
        "vis passed_on",
        "vis processed",
        "enc tokens",
        "dec FLOPs",
        "enc FLOPs",
        "total FLOPs",
        "prefill ms",
        "iqr",
        "speedup",
        "total x",
        "real/anl",
        "enc ms",
        "enc x",
        "dec x",
        "decode ms",
        "KV MiB",
        "KV/full",
    ]
    lines = []
    for r in rows:
        lines.append(
            [
                r["setting"],
                f"{mean(r['average_visual_tokens_passed_on']):.1f}",
                f"{mean(r['average_visual_tokens_processed']):.1f}",
                f"{mean(r['visual_tokens_after_encoder']):.0f}",
                f"{r['analytic_flops_ratio_vs_bare']:.3f}",
                f"{r['analytic_encoder_flops_ratio_vs_bare']:.3f}",
                f"{r['analytic_total_flops_ratio_vs_bare']:.3f}",
                f"{r['prefill_ms']:.0f}",
                f"{r['prefill_spread_iqr_over_median']:.0%}",
                f"{r['prefill_speedup']:.3f}",
                f"{r['analytic_total_flops_speedup']:.3f}",
                f"{r['realized_over_analytic_total']:.3f}",
                f"{r['encoder_ms']:.0f}",
                f"{r['encoder_speedup']:.3f}",
                f"{r['decoder_speedup_estimate']:.3f}",
                f"{r['decode_ms_per_step']:.1f}",
                f"{r['kv_bytes_stats'] / MiB:.2f}",
                f"{r['kv_bytes_stats'] / r['kv_bytes_uncompressed']:.3f}",
            ]
        )
    return render(header, lines)


def format_gamma_mod_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "setting",
        "vis/layer",
        "routed",
        "FLOPs/bare",
        "FLOPs x",
        "prefill ms",
        "iqr",
        "speedup",
        "real/anl",
        "excess ms",
        "decode ms",
        "iqr",
        "dec x",
        "KV MiB",
        "KV/full",
        "peak MiB",
        "mem x",
    ]
    lines = []
    for r in rows:
        share = r.get("routed_share")
        lines.append(
            [
                r["setting"],
                f"{mean(r['average_visual_tokens_processed']):.1f}",
                "-" if share is None else f"{share:.3f}",
                f"{r['analytic_flops_ratio_vs_bare']:.3f}",
                f"{r['analytic_flops_speedup']:.3f}",
                f"{r['prefill_ms']:.0f}",
                f"{r['prefill_spread_iqr_over_median']:.0%}",
                f"{r['prefill_speedup']:.3f}",
                f"{r['realized_over_analytic']:.3f}",
                f"{r['excess_ms_over_proportional']:+.0f}",
                f"{r['decode_ms_per_step']:.1f}",
                f"{r['decode_spread_iqr_over_median']:.0%}",
                f"{r['decode_speedup']:.3f}",
                f"{r['kv_bytes_stats'] / MiB:.2f}",
                f"{r['kv_bytes_stats'] / r['kv_bytes_uncompressed']:.3f}",
                f"{r['peak_mib']:.1f}",
                f"{r['peak_ratio_vs_bare']:.3f}",
            ]
        )
    return render(header, lines)


def gamma_mod_report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    thresholds: dict[str, dict[str, Any]],
    vision_s: float,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    params: int,
    length: int,
) -> dict[str, Any]:
    """Print and write (args.out) the gamma-MoD comparison."""
    bare = rows[0]
    vision_share = vision_s * 1e3 / bare["prefill_ms"]
    for r in rows:
        r["kv_bytes_stats"] = r.get("kv_bytes_stats", bare["kv_bytes"])  # bare: the returned cache's bytes
        r["kv_bytes_uncompressed"] = r.get("kv_bytes_uncompressed_stats", bare["kv_bytes"])
        # Time beyond what the FLOPs ratio predicts from bare: the work that does not shrink with the tokens.
        r["excess_ms_over_proportional"] = (
            r["prefill_ms"] - bare["prefill_ms"] * r["analytic_flops_ratio_vs_bare"]
        )
        r["analytic_speedup_with_vision_time"] = 1 / (
            vision_share + (1 - vision_share) * r["analytic_flops_ratio_vs_bare"]
        )
        if r["setting"] in thresholds:
            r["threshold_search"] = thresholds[r["setting"]]
    side = args.image_size // args.patch_size
    print()
    print(
        f"tokencompress efficiency, gamma-MoD -- random {args.model}: decoder hidden {args.hidden}, {args.layers} "
        f"layers, heads {args.heads}/{args.kv_heads} kv, intermediate {args.intermediate}, vocab {args.vocab}; "
        f"{params / 1e6:.1f}M params, {args.dtype}, attn {args.attn}"
    )
    print(
        f"input: batch {args.batch} x {length} tokens ({side * side} image tokens, {side}x{side} grid from "
        f"{args.image_size}px / patch {args.patch_size}; {args.text_tokens} text); FastV layer {args.fastv_layer}"
    )
    mod = [r for r in rows if r["method"] == "gamma_mod"]
    if mod:
        layers = mod[0]["gamma_mod_layers"]
        print(
            f"GammaMoD: layers='arank' -> {len(layers)} MoD layers ({layers[0]}..{layers[-1]}), one shared random "
            f"(untrained, seeded) router, mlp_scale {mod[0]['gamma_mod_mlp_scale']!r}; text tokens run every layer"
        )
    threads = f"{torch.get_num_threads()} thread(s)" if args.device == "cpu" else torch.cuda.get_device_name()
    print(
        f"timing: {args.device}, {threads}, {args.repeats} interleaved rounds after {args.warmup} warm-up, median; "
        f"prefill = model(**inputs, use_cache=True, logits_to_keep=1); decode = median of {args.decode_steps} "
        "single-token steps per round from that prefill's cache"
    )
    print(
        f"load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} (cpu count {os.cpu_count()})"
    )
    spare = (os.cpu_count() or 1) - args.threads
    if args.device == "cpu" and max(load_before[0], load_after[0] - args.threads) > spare:
        print("WARNING: other processes were using the CPU; timings are likely noisy")
    if args.quick:
        print("NOTE: --quick sizes are far too small for the figures to be meaningful (smoke run only)")
    print()
    print(format_gamma_mod_table(rows))
    print()
    print(
        "vis/layer: tc.stats(model).prefill.average_visual_tokens() (processed), sample mean; routed: share of the "
        "visual tokens that ran the MoD layers, averaged over them; FLOPs/bare: prefill flops / baseline_flops "
        "(decoder + LM head + router / FastV scoring, matmuls only); FLOPs x: its inverse; speedup: bare prefill "
        "median / setting's; real/anl: speedup / FLOPs x; excess ms: prefill ms - bare ms x FLOPs/bare, the time "
        "beyond proportional; dec x: bare decode median / setting's; KV MiB, KV/full: tc.stats kv_cache_bytes "
        "and its ratio to kv_cache_bytes_uncompressed; peak MiB, mem x: peak prefill memory and its ratio to bare."
    )
    memory_method = CUDA_MEMORY_METHOD if args.device == "cuda" else CPU_MEMORY_METHOD
    print(f"peak MiB: {memory_method}")
    print(
        f"vision tower + projector alone: {vision_s * 1e3:.1f} ms = {vision_share:.1%} of the bare prefill (not in "
        "the analytic FLOPs, untouched by compression); analytic speedup counting that fixed time: "
        + ", ".join(f"{r['setting']} {r['analytic_speedup_with_vision_time']:.3f}x" for r in rows[1:])
    )
    noop = next((r for r in rows if r["method"] == "noop"), None)
    if noop is not None:
        print(
            f"engine overhead (noop, FastV keep 1.0): {noop['prefill_ms'] / bare['prefill_ms'] - 1:+.2%} prefill, "
            f"{noop['decode_ms_per_step'] / bare['decode_ms_per_step'] - 1:+.2%} per decode step"
        )
    for r in mod:
        if r["gamma_mod_skip"] == 0 and r["gamma_mod_routing"] == "topk":
            print(
                f"routing overhead ({r['setting']}: every visual token runs every MoD layer, routed through the "
                f"engine's gather / scatter): {r['prefill_ms'] / bare['prefill_ms'] - 1:+.2%} prefill at "
                f"{r['analytic_flops_ratio_vs_bare'] - 1:+.3%} analytic FLOPs (the router), "
                f"{(r['prefill_ms'] - bare['prefill_ms']) / len(r['gamma_mod_layers']):.1f} ms per MoD layer"
            )
    for r in rows[1:]:
        if r["method"] == "noop":
            continue
        line = f"{r['setting']}: visual tokens per layer {run_lengths(r['visual_tokens_per_layer'])}"
        if r["method"] == "gamma_mod":
            line += f"; routed share {r['routed_share']:.3f}"
            if r["gamma_mod_routing"] == "threshold":
                line += f" at threshold {r['gamma_mod_threshold']:.6f}"
                per_layer = r["routed_per_layer"]
                line += f" (per MoD layer {min(per_layer)}..{max(per_layer)} of {r['visual_tokens_per_layer'][0]})"
        match = r.get("flops_match")
        if match is not None:
            line += (
                f"; keep {match['keep_count']}/{match['visual_tokens']}, prefill FLOPs {match['mismatch']:+.2%} off "
                f"{match['matches']}"
            )
        line += (
            f"; logits max |diff| vs bare {r['max_abs_logit_diff_vs_bare']:.2e}, same next token "
            f"{r['same_next_token_as_bare']}"
        )
        print(line)
    by_name = {r["setting"]: r for r in rows}
    for r in rows:
        if r["method"] != "fastv=gamma_mod":
            continue
        g = by_name[r["matches"]]
        print(
            f"{g['setting']} vs {r['setting']} at {g['analytic_flops_ratio_vs_bare']:.3f} of bare FLOPs: prefill "
            f"{g['prefill_ms']:.0f} vs {r['prefill_ms']:.0f} ms ({g['prefill_speedup']:.3f}x vs "
            f"{r['prefill_speedup']:.3f}x; excess {g['excess_ms_over_proportional']:+.0f} vs "
            f"{r['excess_ms_over_proportional']:+.0f} ms), decode {g['decode_ms_per_step']:.1f} vs "
            f"{r['decode_ms_per_step']:.1f} ms, KV {g['kv_bytes_stats'] / MiB:.2f} vs "
            f"{r['kv_bytes_stats'] / MiB:.2f} MiB, peak {g['peak_mib']:.1f} vs {r['peak_mib']:.1f} MiB"
        )
    for r in rows:
        if r["kv_bytes_stats"] != r["kv_bytes"]:
            print(
                f"NOTE {r['setting']}: tc.stats kv_cache_bytes {r['kv_bytes_stats']} != the returned cache's "
                f"{r['kv_bytes']} bytes"
            )
    result = {
        "config": config_record(args),
        "input": {"batch": args.batch, "length": length, "image_tokens": side * side, "params": params},
        "environment": environment(args),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "memory_method": memory_method,
        "router": "untrained: nn.Linear(hidden, 2, bias=False), U(+-1/sqrt(hidden)) from seed --seed + 1, shared",
        "vision_ms": vision_s * 1e3,
        "vision_share_of_bare_prefill": vision_share,
        "settings": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


def evaluate_targets(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    by_keep = {r["keep"]: r for r in rows if r["method"] == "fastv"}  # the --keeps settings
    bare, noop = rows[0], rows[1]
    targets = []

    at = by_keep.get(TARGET_KEEP)
    if at is None:
        targets.append(
            {
                "name": f"realized >= {TARGET_REALIZED_OVER_ANALYTIC} x analytic at keep {TARGET_KEEP}",
                "status": "SKIP",
                "detail": f"keep {TARGET_KEEP} not among --keeps",
            }
        )
    else:
        ratio = at["realized_over_analytic"]
        targets.append(
            {
                "name": f"realized >= {TARGET_REALIZED_OVER_ANALYTIC} x analytic at keep {TARGET_KEEP}",
                "status": "PASS" if ratio >= TARGET_REALIZED_OVER_ANALYTIC else "MISS",
                "value": ratio,
                "detail": f"{at['prefill_speedup']:.3f}x realized / {at['analytic_flops_speedup']:.3f}x analytic "
                f"= {ratio:.3f}",
            }
        )

    overhead = noop["prefill_ms"] / bare["prefill_ms"] - 1
    targets.append(
        {
            "name": f"no-op overhead <= {TARGET_NOOP_OVERHEAD:.0%}",
            "status": "PASS" if overhead <= TARGET_NOOP_OVERHEAD else "MISS",
            "value": overhead,
            "detail": f"noop prefill median / bare median - 1 = {overhead:+.2%}",
        }
    )

    dropping = [r for r in rows if r["method"] == "fastv" and r["keep"] < 1]
    worst = max(dropping, key=lambda r: r["peak_bytes"]) if dropping else None
    name = "peak memory with FastV (keep < 1) <= bare under sdpa"
    if worst is None:
        targets.append({"name": name, "status": "SKIP", "detail": "no FastV setting with keep < 1"})
    else:
        ok = worst["peak_bytes"] <= bare["peak_bytes"]
        status = ("PASS" if ok else "MISS") if args.attn == "sdpa" else "INFO"
        detail = (
            f"worst {worst['setting']}: {worst['peak_mib']:.2f} MiB vs bare {bare['peak_mib']:.2f} MiB "
            f"(x{worst['peak_ratio_vs_bare']:.3f})"
        )
        if args.attn != "sdpa":
            detail += f"; the target is defined for sdpa, this run used {args.attn}"
        targets.append(
            {"name": name, "status": status, "value": worst["peak_ratio_vs_bare"], "detail": detail}
        )
    return targets


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokencompress": tc.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    env.update(git_state())
    return env


def git_state() -> dict[str, Any]:
    """The checkout's commit and its uncommitted files (the figures are of that code), where git answers."""
    root = Path(__file__).resolve().parent.parent

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], capture_output=True, text=True, cwd=root, timeout=30)
        return done.stdout.rstrip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit or None, "git_uncommitted": [line[3:] for line in dirty]}


def run_lengths(values: Sequence[int]) -> str:
    """576,320,320,222 -> '576,320x2,222'."""
    parts: list[list[int]] = []
    for value in values:
        if parts and parts[-1][0] == value:
            parts[-1][1] += 1
        else:
            parts.append([value, 1])
    return ",".join(f"{v}" if n == 1 else f"{v}x{n}" for v, n in parts)


def config_record(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("rss_child", "rss_child_keep")
    }


def mustdrop_report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    encoder_times: dict[str, list[float]],
    unmatched: list[dict[str, Any]],
    vision_s: float,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    params: int,
    length: int,
) -> dict[str, Any]:
    """Print and write (args.out) the MustDrop comparison."""
    add_mustdrop_figures(rows, encoder_times, args)
    bare = rows[0]
    side = args.image_size // args.patch_size
    print()
    print(
        f"tokencompress efficiency, MustDrop -- random llava: decoder hidden {args.hidden}, {args.layers} layers, "
        f"heads {args.heads}/{args.kv_heads} kv, intermediate {args.intermediate}, vocab {args.vocab}; CLIP vision "
        f"tower {args.vision_layers} layers, width {args.vision_hidden}, {args.vision_heads} heads, MLP "
        f"{args.vision_intermediate or 2 * args.vision_hidden}, read at layer {args.vision_feature_layer}; "
        f"{params / 1e6:.1f}M params, {args.dtype}, attn {args.attn}"
    )
    print(
        f"input: batch {args.batch} x {length} tokens ({side * side} image tokens, {side}x{side} grid "
        f"from {args.image_size}px / patch {args.patch_size}; {args.text_tokens} text); image: {args.image}; "
        f"merge_threshold {args.merge_threshold}; FastV layer {args.fastv_layer}"
    )
    md = next((r for r in rows if r["method"] == "mustdrop"), None)
    if md is not None:
        print(
            f"MustDrop filters after decoder layers {md['mustdrop_filter_layers']} (acting before "
            f"{md['mustdrop_acting_layers']}, layer 1 being the vision stage's merge of the copies)"
        )
    threads = f"{torch.get_num_threads()} thread(s)" if args.device == "cpu" else torch.cuda.get_device_name()
    print(
        f"timing: {args.device}, {threads}, {args.repeats} interleaved rounds after {args.warmup} warm-up, median; "
        "prefill = the whole model(**inputs, use_cache=True, logits_to_keep=1), vision encoder included"
    )
    print(
        f"load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} (cpu count {os.cpu_count()})"
    )
    spare = (os.cpu_count() or 1) - args.threads
    if args.device == "cpu" and max(load_before[0], load_after[0] - args.threads) > spare:
        print("WARNING: other processes were using the CPU; timings are likely noisy")
    if args.quick:
        print("NOTE: --quick sizes are far too small for the figures to be meaningful (smoke run only)")
    print()
    print(format_mustdrop_table(rows))
    print()
    print(
        "vis passed_on / processed: visual tokens per decoder layer averaged over the layers, "
        "tc.stats(model).prefill.average_visual_tokens(convention), sample mean; enc tokens: visual tokens "
        "after the vision stage's window merge (tokens_per_stage()['vision encoder']); dec / enc / total FLOPs: "
        "analytic, over bare (flops / baseline_flops, encoder_flops / baseline_encoder_flops, total_flops / "
        "baseline_total_flops); speedup: bare prefill median / setting's; total x: baseline_total_flops / "
        "total_flops; real/anl: speedup / total x; enc ms, enc x: the vision tower + projector alone "
        "(get_image_features under the setting's hooks), median and speedup over bare; dec x: (prefill - enc ms) of bare over the setting's, an estimate of the "
        "decoder's own speedup (its analytic one: 1 / dec FLOPs); decode ms: median "
        "single-token step; KV MiB, KV/full: tc.stats kv_cache_bytes and its ratio to "
        "kv_cache_bytes_uncompressed."
    )
    print(
        f"vision tower alone, bare: {bare['encoder_ms']:.1f} ms (interleaved median; {vision_s * 1e3:.1f} ms timed "
        f"back to back after the rounds) = {bare['encoder_ms'] / bare['prefill_ms']:.1%} of the bare prefill; "
        f"analytically {bare['baseline_encoder_flops'] / bare['baseline_total_flops']:.1%} of the total FLOPs"
    )
    noop = next((r for r in rows if r["method"] == "noop"), None)
    if noop is not None:
        print(
            f"engine overhead (noop, FastV keep 1.0): {noop['prefill_ms'] / bare['prefill_ms'] - 1:+.2%} prefill, "
            f"{noop['encoder_ms'] / bare['encoder_ms'] - 1:+.2%} vision tower (its hooks count FLOPs), "
            f"logits max |diff| vs bare {noop['max_abs_logit_diff_vs_bare']:.2e}"
        )
    for r in rows[1:]:
        if r["method"] == "noop":
            continue
        merged = r["windows_merged"]
        line = f"{r['setting']}: visual tokens per layer {run_lengths(r['visual_tokens_per_layer'])}"
        if r["method"] == "mustdrop" and r["vision_stage"]:
            line += (
                f"; windows merged {mean(merged):.1f}/{r['windows_per_image']} ({r['windows_merged_fraction']:.1%}), "
                f"{mean(r['visual_tokens_after_encoder']):.0f} encoder tokens"
            )
        match = r.get("flops_match")
        if match is not None:
            line += (
                f"; keep {match['keep_count']}/{match['visual_tokens']}, total FLOPs {match['mismatch']:+.2%} off "
                f"{match['matches']}"
            )
        line += (
            f"; logits max |diff| vs bare {r['max_abs_logit_diff_vs_bare']:.2e}, same next token "
            f"{r['same_next_token_as_bare']}"
        )
        print(line)
    for u in unmatched:
        print(
            f"{u['setting']}: left out; the cheapest FastV@{args.fastv_layer} tried (keep {u['keep_count']}) costs "
            f"{u['mismatch']:+.1%} of {u['matches']}'s total FLOPs"
        )
    for r in rows:
        if r["kv_bytes_stats"] != r["kv_bytes"]:
            print(
                f"NOTE {r['setting']}: tc.stats kv_cache_bytes {r['kv_bytes_stats']} != the returned cache's "
                f"{r['kv_bytes']} bytes"
            )
    result = {
        "config": config_record(args),
        "input": {
            "batch": args.batch,
            "length": length,
            "image_tokens": side * side,
            "params": params,
        },
        "environment": environment(args),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "memory_method": CUDA_MEMORY_METHOD if args.device == "cuda" else CPU_MEMORY_METHOD,
        "vision_ms": vision_s * 1e3,
        "vision_share_of_bare_prefill": vision_s * 1e3 / bare["prefill_ms"],
        "settings": rows,
        "fastv_unmatched": unmatched,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.rss_child is not None:
        rss_child(args)
        return {}
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    settings = make_settings(args)
    load_before = os.getloadavg()

    print("building model ...", file=sys.stderr, flush=True)
    model, inputs = build(args)
    batch, length = inputs["input_ids"].shape
    image_tokens = (args.image_size // args.patch_size) ** 2
    params = sum(p.numel() for p in model.parameters())

    with torch.inference_mode():
        thresholds: dict[str, dict[str, Any]] = {}
        for setting in settings:
            if setting.routing == "threshold" and setting.threshold is None:
                if not thresholds:
                    print("finding the router threshold (bisection) ...", file=sys.stderr, flush=True)
                thresholds[setting.name] = find_threshold(model, inputs, setting, THRESHOLD_SHARE)
        unmatched: list[dict[str, Any]] = []
        if any(s.method.startswith("fastv=") for s in settings):
            print("matching FastV's analytic FLOPs (bisection) ...", file=sys.stderr, flush=True)
            unmatched = match_flops(model, inputs, settings)
        print("probing FLOPs, KV cache and memory ...", file=sys.stderr, flush=True)
        info = probe(model, inputs, settings, args)
        print("timing (interleaved) ...", file=sys.stderr, flush=True)
        timings = time_interleaved(model, inputs, settings, args)
        vision_s = vision_seconds(model, inputs, args)
        if args.mustdrop:
            print("timing the vision tower per setting (interleaved) ...", file=sys.stderr, flush=True)
            encoder_times = encoder_seconds_interleaved(model, inputs, settings, args)
    if args.rss:
        if args.device != "cpu":
            print("--rss applies to --device cpu only; skipped", file=sys.stderr)
        else:
            child_argv = [a for a in argv if a != "--rss"]
            for setting in settings:  # a threshold found here, passed on (one threshold setting at most)
                if setting.name in thresholds:
                    child_argv += ["--gamma-mod-threshold", repr(setting.threshold)]
            for setting in settings:
                print(f"  --rss {setting.name} ...", file=sys.stderr, flush=True)
                info[setting.name]["rss_peak_growth_bytes"] = rss_in_subprocess(args, child_argv, setting)
    load_after = os.getloadavg()

    rows = summarize(settings, timings, info)
    if args.gamma_mod:
        return gamma_mod_report(args, rows, thresholds, vision_s, load_before, load_after, params, length)
    if args.mustdrop:
        return mustdrop_report(
            args, rows, encoder_times, unmatched, vision_s, load_before, load_after, params, length
        )
    targets = evaluate_targets(rows, args)
    bare = rows[0]
    vision_share = vision_s * 1e3 / bare["prefill_ms"]

    print()
    print(
        f"tokencompress efficiency -- random {args.model}: hidden {args.hidden}, {args.layers} layers, heads "
        f"{args.heads}/{args.kv_heads} kv, intermediate {args.intermediate}, vocab {args.vocab}, "
        f"{params / 1e6:.1f}M params, {args.dtype}, attn {args.attn}"
    )
    side = args.image_size // args.patch_size
    grid = (
        f"{side}x{side} grid"
        if args.model == "llava"
        else f"{2 * side}x{2 * side} patches merged 2x2 to {side}x{side}"
    )
    print(
        f"input: batch {batch} x {length} tokens ({image_tokens} image tokens from {args.image_size}px / patch "
        f"{args.patch_size}, {grid}; {args.text_tokens} text); FastV layer {args.fastv_layer}"
    )
    pyramids = [r for r in rows if r["method"] == "pyramid"]
    if pyramids:
        after = pyramids[0]["pyramid_after_layers"]
        source = "--pyramid-after" if args.pyramid_after is not None else "the library's default schedule"
        print(
            f"pyramids: StaticPyramid, avg pooling, kernel = stride, pooling after layers {after} ({source}), "
            f"i.e. acting before layers {pyramids[0]['pyramid_acting_layers']}; grids under 16 cells are left alone"
        )
    threads = f"{torch.get_num_threads()} thread(s)" if args.device == "cpu" else torch.cuda.get_device_name()
    print(
        f"timing: {args.device}, {threads}, {args.repeats} interleaved rounds after {args.warmup} warm-up, "
        f"median; prefill = model(**inputs, use_cache=True, logits_to_keep=1); decode = median of "
        f"{args.decode_steps} single-token steps per round from that prefill's cache"
    )
    print(
        f"load average before / after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        f"(cpu count {os.cpu_count()})"
    )
    # Our own run adds about `threads` to the load average; anything beyond the cores left over competes.
    spare = (os.cpu_count() or 1) - args.threads
    if args.device == "cpu" and max(load_before[0], load_after[0] - args.threads) > spare:
        print("WARNING: other processes were using the CPU; timings are likely noisy")
    if args.quick:
        print("NOTE: --quick sizes are far too small for the targets to be meaningful (smoke run only)")
    print()
    print(format_table(rows, args.rss))
    print()
    print(
        "speedup: bare median / setting median; FLOPs/bare: tc.stats prefill flops / baseline_flops (decoder + "
        "LM head + FastV scoring, matmuls only; pooling is not a matmul); FLOPs x: its inverse; real/anl: "
        "speedup / FLOPs x; dec x: bare decode median / setting's; mem x: peak / bare peak; iqr: interquartile "
        "range / median; KV MiB: bytes of the returned cache tensors."
    )
    memory_method = CUDA_MEMORY_METHOD if args.device == "cuda" else CPU_MEMORY_METHOD
    print(f"peak MiB: {memory_method}")
    if args.rss:
        print(f"RSS MiB: {RSS_METHOD}")
    print(
        f"vision tower + projector alone: {vision_s * 1e3:.1f} ms = {vision_share:.1%} of the bare prefill; "
        "it is not in the analytic FLOPs and compression does not shrink it."
    )
    for r in rows[1:]:
        predicted = 1 / (vision_share + (1 - vision_share) / r["analytic_flops_speedup"])
        r["analytic_speedup_with_vision_time"] = predicted
    print(
        "analytic speedup counting that fixed time: "
        + ", ".join(f"{r['setting']} {r['analytic_speedup_with_vision_time']:.3f}x" for r in rows[1:])
    )
    print(
        "visual tokens per layer (sample 0): "
        + "; ".join(f"{r['setting']} {','.join(map(str, r['visual_tokens_per_layer']))}" for r in rows[1:])
    )
    by_name = {r["setting"]: r for r in rows}
    for r in rows:
        if r["method"] != "fastv=pyramid":
            continue
        m, p = r["flops_match"], by_name[r["matches"]]
        print(
            f"{p['setting']} vs {r['setting']} (keep {m['keep_count']}/{m['visual_tokens']} = {m['keep']:.3f}, "
            f"analytic FLOPs {m['flops'] / 1e9:.4g} vs {m['target_flops'] / 1e9:.4g} G: {m['mismatch']:+.2%}): "
            f"prefill {p['prefill_speedup']:.3f}x vs {r['prefill_speedup']:.3f}x, decode "
            f"{p['decode_speedup']:.3f}x vs {r['decode_speedup']:.3f}x, peak memory {p['peak_ratio_vs_bare']:.3f} "
            f"vs {r['peak_ratio_vs_bare']:.3f} of bare, KV {p['kv_mib']:.2f} vs {r['kv_mib']:.2f} MiB"
        )
    noop = rows[1]
    print(
        f"no-op overhead: {noop['prefill_ms'] / bare['prefill_ms'] - 1:+.2%} prefill, "
        f"{noop['decode_ms_per_step'] / bare['decode_ms_per_step'] - 1:+.2%} per decode step; "
        f"noop vs bare max |logit diff| {noop['max_abs_logit_diff_vs_bare']:.2e}"
    )
    print(
        "compress + uncompress between runs (untimed): "
        f"{statistics.fmean(r['switch_ms_mean_untimed'] for r in rows):.2f} ms mean"
    )
    print()
    for target in targets:
        print(f"{target['status']:<4}  {target['name']}: {target['detail']}")

    result = {
        "config": config_record(args),
        "input": {"batch": batch, "length": length, "image_tokens": image_tokens, "params": params},
        "environment": environment(args),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "memory_method": memory_method,
        "rss_method": RSS_METHOD if args.rss else None,
        "vision_ms": vision_s * 1e3,
        "vision_share_of_bare_prefill": vision_share,
        "settings": rows,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
