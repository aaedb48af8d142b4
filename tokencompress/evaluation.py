"""Accuracy and cost of compressed models on the shapes task, side by side: what `tokencompress demo` measures.

Every method runs on the same batches, interleaved batch by batch with the uncompressed model, so latency ratios
share the machine's state. Accuracy is the greedy first answer token (the answers are one word). Budgets are
matched by analytic prefill FLOPs (decoder, LM head and vision encoder), the currency every method pays in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import api
from .compressors import Compressor
from .synthetic import QUESTION_TYPES, Sample, ShapesTask, WordTokenizer, encode

ASSETS = Path(__file__).parent / "assets" / "shapes_llava"
TEST_SEED = 1  # the shipped model trained on seed 0

Factory = Callable[[float], Compressor]


@dataclass(frozen=True)
class Method:
    """A compressor family with one knob: `make(value)` for value in [low, high]; a larger value keeps more."""

    name: str
    make: Factory
    low: float
    high: float
    note: str = ""


@dataclass
class Result:
    """One setting over the evaluation set."""

    method: str
    setting: str
    right: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    flops: int = 0
    baseline_flops: int = 0
    kv_bytes: int = 0
    kv_bytes_uncompressed: int = 0
    visual_tokens: list[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(self.right.values()) / max(sum(self.total.values()), 1)

    def type_accuracy(self, qtype: str) -> float:
        return self.right.get(qtype, 0) / max(self.total.get(qtype, 0), 1)

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.baseline_flops if self.baseline_flops else 1.0

    @property
    def kv_ratio(self) -> float:
        return self.kv_bytes / self.kv_bytes_uncompressed if self.kv_bytes_uncompressed else 1.0

    @property
    def average_visual_tokens(self) -> float:
        return sum(self.visual_tokens) / max(len(self.visual_tokens), 1)


def load_shapes_model(path: str | Path | None = None) -> tuple[nn.Module, WordTokenizer]:
    """The shipped tiny LLaVA trained on the shapes task (or one saved at `path`), in fp32, eval mode."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path or ASSETS, dtype=torch.float32)
    return model.eval(), WordTokenizer()


def image_tokens(model: nn.Module) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def held_out_samples(count: int, image_size: int, seed: int = TEST_SEED) -> list[Sample]:
    task = ShapesTask(seed, image_size)
    return [task.sample(i) for i in range(count)]


@torch.no_grad()
def run_batch(model: nn.Module, tokenizer: WordTokenizer, samples: list[Sample], result: Result) -> None:
    """One prefill over `samples`: answers, time, and (when compressed) the engine's FLOPs and KV bytes."""
    inputs = encode(tokenizer, samples, image_tokens(model))
    started = time.perf_counter()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    result.seconds += time.perf_counter() - started
    predicted = out.logits[:, -1].argmax(-1).tolist()
    for sample, token in zip(samples, predicted, strict=True):
        result.total[sample.qtype] = result.total.get(sample.qtype, 0) + 1
        hit = tokenizer.encode(sample.answer)[0] == token
        result.right[sample.qtype] = result.right.get(sample.qtype, 0) + int(hit)
    if getattr(model, api.ATTRIBUTE, None) is not None:
        stats = api.stats(model)
        result.flops += stats.prefill.total_flops
        result.baseline_flops += stats.prefill.baseline_total_flops
        result.kv_bytes += stats.kv_cache_bytes
        result.kv_bytes_uncompressed += stats.kv_cache_bytes_uncompressed
        result.visual_tokens.extend(stats.prefill.average_visual_tokens())


def flops_ratio(
    model: nn.Module, tokenizer: WordTokenizer, compressor: Compressor, probe: list[Sample]
) -> float:
    """Analytic prefill FLOPs of `compressor` on the probe batch, as a share of the uncompressed model's."""
    result = Result("probe", "")
    with api.compressed(model, compressor):
        run_batch(model, tokenizer, probe, result)
    return result.flops_ratio


def match_budget(
    model: nn.Module,
    tokenizer: WordTokenizer,
    method: Method,
    target: float,
    probe: list[Sample],
    steps: int = 12,
) -> tuple[float, float]:
    """The knob value whose FLOPs ratio on the probe batch is closest to `target` (bisection; a larger value
    keeps more), and that ratio."""
    low, high = method.low, method.high
    best = (high, flops_ratio(model, tokenizer, method.make(high), probe))
    for _ in range(steps):
        middle = (low + high) / 2
        ratio = flops_ratio(model, tokenizer, method.make(middle), probe)
        if abs(ratio - target) < abs(best[1] - target):
            best = (middle, ratio)
        low, high = (middle, high) if ratio < target else (low, middle)
    return best


def evaluate(
    model: nn.Module,
    tokenizer: WordTokenizer,
    settings: Sequence[tuple[str, str, Compressor | None]],
    samples: list[Sample],
    batch_size: int,
    progress: Callable | None = None,
) -> list[Result]:
    """Every (method, setting, compressor or None for uncompressed) on every batch, interleaved."""
    results = [Result(method, setting) for method, setting, _ in settings]
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    for batch in progress(batches) if progress else batches:
        for (_, _, compressor), result in zip(settings, results, strict=True):
            if compressor is None:
                run_batch(model, tokenizer, batch, result)
                continue
            with api.compressed(model, compressor):
                run_batch(model, tokenizer, batch, result)
    return results


def format_table(results: list[Result], reference: Result) -> str:
    """Markdown table: accuracy overall and per question type, FLOPs, latency and KV ratios."""
    header = ["method", "setting", "accuracy", *QUESTION_TYPES, "FLOPs", "latency", "KV", "visual/layer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        latency = result.seconds / reference.seconds if reference.seconds else 1.0
        cells = [
            result.method,
            result.setting,
            f"{result.accuracy:.3f}",
            *(f"{result.type_accuracy(q):.2f}" for q in QUESTION_TYPES),
            f"{result.flops_ratio:.3f}",
            f"{latency:.3f}",
            f"{result.kv_ratio:.3f}",
            f"{result.average_visual_tokens:.1f}" if result.visual_tokens else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(results: list[Result], reference: Result, path: str | Path) -> None:
    """Accuracy vs analytic prefill FLOPs, one line per method, the uncompressed model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    by_method: dict[str, list[Result]] = {}
    for result in results:
        if result is not reference:
            by_method.setdefault(result.method, []).append(result)
    for method, points in by_method.items():
        points = sorted(points, key=lambda r: r.flops_ratio)
        axes.plot([p.flops_ratio for p in points], [p.accuracy for p in points], marker="o", label=method)
    axes.scatter(
        [1.0], [reference.accuracy], marker="*", s=160, color="black", label="uncompressed", zorder=3
    )
    axes.set_xlabel("prefill FLOPs / uncompressed (analytic, encoder included)")
    axes.set_ylabel("accuracy (held-out shapes questions)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
