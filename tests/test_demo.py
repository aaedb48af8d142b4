"""The demo's measurements on the shipped shapes model: answers independent of batching and padding, budgets
matched by analytic FLOPs, ratios read from the engine's stats, and the command's table and plot."""

from __future__ import annotations

import pytest
import torch

import tokencompress as tc
from tokencompress import evaluation
from tokencompress.cli import main, methods
from tokencompress.synthetic import QUESTION_TYPES, encode


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = evaluation.load_shapes_model()
    samples = evaluation.held_out_samples(40, model.config.vision_config.image_size)
    return model, tokenizer, samples


def test_answers_do_not_depend_on_batching(shipped):
    """The batched, left-padded evaluation gives each sample the answer it gets alone, and the accuracy is the
    share of those answers that equal the first token of the expected word."""
    model, tokenizer, samples = shipped
    result = evaluation.Result("uncompressed", "-")
    evaluation.run_batch(model, tokenizer, samples[:20], result)
    evaluation.run_batch(model, tokenizer, samples[20:], result)
    hits = 0
    with torch.no_grad():
        for sample in samples:
            inputs = encode(tokenizer, [sample], evaluation.image_tokens(model))
            token = int(model(**inputs).logits[0, -1].argmax())
            hits += token == tokenizer.encode(sample.answer)[0]
    assert result.accuracy == hits / len(samples)
    assert sum(result.total.values()) == len(samples)
    assert set(result.total) <= set(QUESTION_TYPES)


def test_shipped_model_beats_chance(shipped):
    """The shipped weights answer the global questions (background colour: 4 choices) far above chance."""
    model, tokenizer, samples = shipped
    result = evaluation.Result("uncompressed", "-")
    evaluation.run_batch(model, tokenizer, samples, result)
    assert result.total.get("background", 0) >= 3
    assert result.type_accuracy("background") > 0.5


@pytest.mark.parametrize("index", [0, 3])  # FastV and MustDrop
def test_match_budget_reaches_the_target(shipped, index):
    model, tokenizer, samples = shipped
    config = model.config
    method = methods(config.text_config.num_hidden_layers, evaluation.image_tokens(model))[index]
    value, ratio = evaluation.match_budget(model, tokenizer, method, 0.6, samples[:10])
    assert abs(ratio - 0.6) < 0.03
    with tc.compressed(model, method.make(value)):
        result = evaluation.Result(method.name, "")
        evaluation.run_batch(model, tokenizer, samples[:10], result)
        stats = tc.stats(model)
    assert result.flops_ratio == pytest.approx(stats.prefill.total_flops / stats.prefill.baseline_total_flops)
    assert 0 < result.kv_ratio < 1


def test_demo_command_writes_table_and_plot(tmp_path, capsys):
    plot, table = tmp_path / "demo.png", tmp_path / "demo.md"
    main(
        [
            "demo",
            "--samples",
            "20",
            "--batch",
            "10",
            "--budgets",
            "0.6",
            "--plot",
            str(plot),
            "--markdown",
            str(table),
        ]
    )
    rows = table.read_text().strip().splitlines()
    assert len(rows) == 2 + 1 + len(methods(8, 144))  # header, rule, uncompressed, one per method
    assert rows[2].startswith("| uncompressed |")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy" in capsys.readouterr().out
