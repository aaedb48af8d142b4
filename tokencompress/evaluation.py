"""Accuracy and cost of compressed models on the shapes task, side by side: what `tokencompress demo` measures.

Every method runs on the same batches, interleaved batch by batch with the uncompressed model, so latency ratios
share the machine's state. Accuracy is the greedy first answer token (the answers are one word). Budgets are
matched by analytic prefill FLOPs (decoder, LM head and vision encoder), the currency every method pays in.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from . import api
from .compressors import Compressor
from .synthetic import (
    IMAGE_SIZE,
    QUESTION_TYPES,
    TEST_SEED,
    QwenWordTokenizer,
    Sample,
    ShapesTask,
    WordTokenizer,
    encode,
    encode_qwen2_vl,
    qwen2_vl_layout,
)

ASSETS = Path(__file__).parent / "assets" / "shapes_llava"
# routers trained on ASSETS (benchmarks/train_routers.py): dpn/, gamma_mod/
ROUTERS = Path(__file__).parent / "assets" / "shapes_llava_routers"
CHAT_IMAGE_SIZE = 192  # shapes images for chat models (their processors resize them)
CHAT_INSTRUCTION = "Answer with one word."

Factory = Callable[[float], Compressor]


class Prompts(Protocol):
    """How a model is asked the shapes questions and how its answer is read back."""

    image_size: int

    def inputs(self, samples: list[Sample]) -> dict[str, Tensor]: ...

    def answers(self, model: nn.Module, inputs: dict[str, Tensor], logits: Tensor) -> list[str]: ...


@dataclass
class ShapesPrompts:
    """A model trained on the shapes task: its word tokenizer, its prompt, one answer word = one token (read from
    the prefill's last logits, no decoding step). `qwen_layout` (a Qwen2-VL): the patch_size, merge_size and
    temporal_patch_size its images are cut with (encode_qwen2_vl); None for a LLaVA."""

    tokenizer: WordTokenizer
    image_tokens: int
    image_size: int
    qwen_layout: dict[str, int] | None = None

    def inputs(self, samples: list[Sample]) -> dict[str, Tensor]:
        if self.qwen_layout is not None:
            return encode_qwen2_vl(self.tokenizer, samples, **self.qwen_layout)
        return encode(self.tokenizer, samples, self.image_tokens)

    def answers(self, model: nn.Module, inputs: dict[str, Tensor], logits: Tensor) -> list[str]:
        return [self.tokenizer.vocab[i] for i in logits[:, -1].argmax(-1).tolist()]


@dataclass
class ChatPrompts:
    """A pretrained chat MLLM from the hub (or a local copy): its processor and chat template, the question plus
    an instruction to answer with one word, greedy decoding of a few tokens after the prefill."""

    processor: object
    image_size: int = CHAT_IMAGE_SIZE
    max_new_tokens: int = 5

    def inputs(self, samples: list[Sample]) -> dict[str, Tensor]:
        from PIL import Image

        texts, images = [], []
        for sample in samples:
            question = sample.question.replace(" ?", "?").replace("letter-", "letter ")
            content = [{"type": "image"}, {"type": "text", "text": f"{question} {CHAT_INSTRUCTION}"}]
            conversation = [{"role": "user", "content": content}]
            texts.append(self.processor.apply_chat_template(conversation, add_generation_prompt=True))
            pixels = (sample.image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            images.append(Image.fromarray(pixels))
        self.processor.tokenizer.padding_side = "left"
        return dict(self.processor(text=texts, images=images, padding=True, return_tensors="pt"))

    def answers(self, model: nn.Module, inputs: dict[str, Tensor], logits: Tensor) -> list[str]:
        generated = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = generated[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new, skip_special_tokens=True)


def is_correct(predicted: str, expected: str) -> bool:
    """The first word of the prediction, lower-cased without punctuation, against the one-word answer (a
    "letter-x" answer also accepts "x"; "grey" counts as "gray")."""
    words = re.sub(r"[^a-z0-9\- ]", " ", predicted.lower().replace("grey", "gray")).split()
    if not words:
        return False
    first = words[0]
    if first == "letter" and len(words) > 1:
        first = f"letter-{words[1]}"
    accepted = {expected, expected.removeprefix("letter-")}
    return first in accepted


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


@dataclass(frozen=True)
class Trained:
    """One trained compressor saved by `tc.save_pretrained`: its name, parameters and weights (routers)."""

    directory: str
    name: str
    params: dict
    weights: dict[str, Tensor]


def read_trained(directory: str | Path) -> Trained:
    """Read a `tc.save_pretrained` directory that holds one compressor with trained weights."""
    try:
        saved, weights = api.read_saved(directory)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from error
    if len(saved) != 1:
        raise ValueError(
            f"{directory} holds the pipeline {[c.get('name') for c in saved]}, not one compressor"
        )
    if weights is None:
        raise ValueError(f"{directory} has no trained weights ({api.WEIGHTS_NAME})")
    weights = {key.removeprefix("0."): value for key, value in weights.items()}
    params = {key: value for key, value in saved[0].items() if key != "name"}
    return Trained(str(directory), saved[0].get("name"), params, weights)


def with_weights(model: nn.Module, compressor: Compressor, weights: dict[str, Tensor]) -> Compressor:
    """The compressor with trained weights: compressing the model once builds its routers (sized to the model),
    the weights are loaded (strictly), and the routers stay for every later compress of this instance."""
    api.compress(model, compressor)
    try:
        compressor.load_state_dict(weights)
    finally:
        api.uncompress(model)
    return compressor


def load_shapes_model(path: str | Path | None = None) -> tuple[nn.Module, ShapesPrompts]:
    """The shipped tiny LLaVA trained on the shapes task, or a LLaVA or Qwen2-VL saved at `path` by
    benchmarks/train_shapes.py; in fp32, eval mode, with its prompts."""
    from transformers import AutoConfig, LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    path = path or ASSETS
    if AutoConfig.from_pretrained(path).model_type == "qwen2_vl":
        model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        layout = qwen2_vl_layout(model.config.vision_config)
        image_tokens = (IMAGE_SIZE // (layout["patch_size"] * layout["merge_size"])) ** 2
        return model, ShapesPrompts(QwenWordTokenizer(), image_tokens, IMAGE_SIZE, layout)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    vision = model.config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    return model, ShapesPrompts(WordTokenizer(), image_tokens, vision.image_size)


def load_model(
    name: str | Path | None = None, device: str = "cpu", dtype: str = "auto"
) -> tuple[nn.Module, Prompts]:
    """The model the demo and the ablations evaluate: None = the shipped shapes model; a directory written by
    benchmarks/train_shapes.py (it holds training.json); else a Hugging Face model id or local copy of a chat
    MLLM (AutoModelForImageTextToText + AutoProcessor)."""
    if name is None or (Path(name) / "training.json").is_file():
        model, prompts = load_shapes_model(name)
        return model.to(device), prompts
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(name)
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype).to(device).eval()
    return model, ChatPrompts(processor)


def visual_tokens(model: nn.Module, inputs: dict[str, Tensor]) -> int:
    """Image placeholder tokens per prompt (the most in the batch): the visual tokens the decoder receives."""
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is None:
        image_token = model.config.image_token_index
    return int((inputs["input_ids"] == image_token).sum(1).max())


def held_out_samples(count: int, image_size: int, seed: int = TEST_SEED) -> list[Sample]:
    task = ShapesTask(seed, image_size)
    return [task.sample(i) for i in range(count)]


@torch.no_grad()
def run_batch(model: nn.Module, prompts: Prompts, samples: list[Sample], result: Result) -> None:
    """One timed prefill over `samples`, (when compressed) the engine's FLOPs and KV bytes of that prefill, then
    the answers."""
    inputs, logits = prefill(model, prompts, samples, result)
    for sample, predicted in zip(samples, prompts.answers(model, inputs, logits), strict=True):
        result.total[sample.qtype] = result.total.get(sample.qtype, 0) + 1
        result.right[sample.qtype] = result.right.get(sample.qtype, 0) + int(
            is_correct(predicted, sample.answer)
        )


@torch.no_grad()
def prefill(
    model: nn.Module, prompts: Prompts, samples: list[Sample], result: Result
) -> tuple[dict[str, Tensor], Tensor]:
    """The timed prefill alone (adds its seconds, FLOPs, KV bytes and visual tokens to `result`): its inputs and
    last logits."""
    inputs = {k: v.to(model.device) for k, v in prompts.inputs(samples).items()}
    _synchronize(model.device)
    started = time.perf_counter()
    logits = model(**inputs, use_cache=True, logits_to_keep=1).logits
    _synchronize(model.device)
    result.seconds += time.perf_counter() - started
    if getattr(model, api.ATTRIBUTE, None) is not None:
        stats = api.stats(model)
        result.flops += stats.prefill.total_flops
        result.baseline_flops += stats.prefill.baseline_total_flops
        result.kv_bytes += stats.kv_cache_bytes
        result.kv_bytes_uncompressed += stats.kv_cache_bytes_uncompressed
        result.visual_tokens.extend(stats.prefill.average_visual_tokens())
    return inputs, logits


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_ratio(model: nn.Module, prompts: Prompts, compressor: Compressor, probe: list[Sample]) -> float:
    """Analytic prefill FLOPs of `compressor` on the probe batch, as a share of the uncompressed model's."""
    result = Result("probe", "")
    with api.compressed(model, compressor):
        prefill(model, prompts, probe, result)
    return result.flops_ratio


# a matched FLOPs ratio further than this from its target is reported (the demo; `ablate`'s default)
BUDGET_TOLERANCE = 0.02


def match_budget(
    model: nn.Module,
    prompts: Prompts,
    method: Method,
    target: float,
    probe: list[Sample],
    steps: int = 12,
) -> tuple[float, float]:
    """The knob value whose FLOPs ratio on the probe batch is closest to `target` (bisection; a larger value
    keeps more), and that ratio."""
    low, high = method.low, method.high
    best = (high, flops_ratio(model, prompts, method.make(high), probe))
    for _ in range(steps):
        middle = (low + high) / 2
        ratio = flops_ratio(model, prompts, method.make(middle), probe)
        if abs(ratio - target) < abs(best[1] - target):
            best = (middle, ratio)
        low, high = (middle, high) if ratio < target else (low, middle)
    return best


def evaluate(
    model: nn.Module,
    prompts: Prompts,
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
                run_batch(model, prompts, batch, result)
                continue
            with api.compressed(model, compressor):
                run_batch(model, prompts, batch, result)
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
