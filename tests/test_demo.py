"""The demo's measurements on the shipped shapes model: answers independent of batching and padding, budgets
matched by analytic FLOPs, ratios read from the engine's stats, and the command's table and plot."""

from __future__ import annotations

import pytest
import torch
from chat_model import save_chat_llava
from forced_routers import save_forced_dpn
from PIL import Image
from transformers import AutoProcessor

import tokencompress as tc
from tokencompress import evaluation
from tokencompress.cli import main, methods, shipped_routers
from tokencompress.synthetic import QUESTION_TYPES, QwenWordTokenizer, encode, encode_qwen2_vl


@pytest.fixture(scope="module")
def shipped():
    model, prompts = evaluation.load_shapes_model()
    samples = evaluation.held_out_samples(40, model.config.vision_config.image_size)
    return model, prompts, samples


def test_answers_do_not_depend_on_batching(shipped):
    """The batched, left-padded evaluation gives each sample the answer it gets alone, and the accuracy is the
    share of those answers that equal the first token of the expected word."""
    model, prompts, samples = shipped
    result = evaluation.Result("uncompressed", "-")
    evaluation.run_batch(model, prompts, samples[:20], result)
    evaluation.run_batch(model, prompts, samples[20:], result)
    hits = 0
    with torch.no_grad():
        for sample in samples:
            inputs = encode(prompts.tokenizer, [sample], prompts.image_tokens)
            token = int(model(**inputs).logits[0, -1].argmax())
            hits += token == prompts.tokenizer.encode(sample.answer)[0]
    assert result.accuracy == hits / len(samples)
    assert sum(result.total.values()) == len(samples)
    assert set(result.total) <= set(QUESTION_TYPES)


def test_shipped_model_beats_chance(shipped):
    """The shipped weights answer the global questions (background colour: 4 choices) far above chance."""
    model, prompts, samples = shipped
    result = evaluation.Result("uncompressed", "-")
    evaluation.run_batch(model, prompts, samples, result)
    assert result.total.get("background", 0) >= 3
    assert result.type_accuracy("background") > 0.5


def test_shipped_qwen2_vl_beats_chance():
    """The shipped Qwen2-VL weights load with their prompts and answer the global questions (background colour:
    4 choices; count: 5) far above chance."""
    model, prompts = evaluation.load_shapes_model(evaluation.ASSETS.parent / "shapes_qwen2_vl")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    samples = evaluation.held_out_samples(40, prompts.image_size)
    result = evaluation.Result("uncompressed", "-")
    evaluation.run_batch(model, prompts, samples, result)
    for qtype in ("background", "count"):
        assert result.total.get(qtype, 0) >= 3
        assert result.type_accuracy(qtype) > 0.6


@pytest.mark.parametrize("index", [0, 3])  # FastV and MustDrop
def test_match_budget_reaches_the_target(shipped, index):
    model, prompts, samples = shipped
    config = model.config
    method = methods(config.text_config.num_hidden_layers, prompts.image_tokens)[index]
    value, ratio = evaluation.match_budget(model, prompts, method, 0.6, samples[:10])
    assert abs(ratio - 0.6) < 0.03
    with tc.compressed(model, method.make(value)):
        result = evaluation.Result(method.name, "")
        evaluation.run_batch(model, prompts, samples[:10], result)
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
    dpn = "dpn" in shipped_routers(None)  # trained DPN routers: one more row, at the budget they choose
    assert len(rows) == 2 + 1 + len(methods(8, 144)) + dpn  # header, rule, uncompressed, one per method
    assert rows[2].startswith("| uncompressed |")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy" in capsys.readouterr().out


def test_demo_runs_the_shipped_routers(shipped, tmp_path, monkeypatch, capsys):
    """With trained routers beside the shipped model, the demo runs DPN at the point its routers choose and
    gamma-MoD with its trained router at the matched budget. DPN routers forced to the identity expert must
    answer exactly as the uncompressed model, with all 144 visual tokens."""
    model, _, _ = shipped
    routers = tmp_path / "routers"
    save_forced_dpn(model, routers / "dpn", expert=0)
    with tc.compressed(model, tc.GammaMoD(skip=0.5, mlp_scale="straight_through")):
        tc.save_pretrained(model, routers / "gamma_mod")
    monkeypatch.setattr(evaluation, "ROUTERS", routers)
    table = tmp_path / "demo.md"
    main(
        ["demo", "--samples", "20", "--batch", "10", "--budgets", "0.6", "--markdown", str(table)]
        + ["--plot", str(tmp_path / "demo.png")]
    )
    lines = table.read_text().strip().splitlines()
    header = [cell.strip() for cell in lines[0].split("|")[1:-1]]
    rows = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[1:-1]] for row in lines[2:]}
    assert "gamma-MoD (untrained router)" not in rows
    gamma, dpn, base = rows["gamma-MoD (trained router)"], rows["DPN (trained routers)"], rows["uncompressed"]
    assert abs(float(gamma[header.index("FLOPs")]) - 0.6) < 0.05
    for column in ("accuracy", *QUESTION_TYPES):
        assert dpn[header.index(column)] == base[header.index(column)], column
    assert dpn[header.index("visual/layer")] == "144.0"
    out = capsys.readouterr().out
    assert (
        f"trained by benchmarks/train_routers.py ({routers / 'dpn'})" in out and "not shown: DPN" not in out
    )


@pytest.mark.parametrize(
    ("predicted", "expected", "right"),
    [
        ("Red.", "red", True),
        ("red circle", "red", True),
        ("grey", "gray", True),
        ("The letter Z", "letter-z", False),  # the first word is "the"
        ("letter z", "letter-z", True),
        ("z", "letter-z", True),
        ("square", "letter-z", False),
        ("", "red", False),
        ("reddish", "red", False),
    ],
)
def test_chat_answers_are_read_by_their_first_word(predicted, expected, right):
    assert evaluation.is_correct(predicted, expected) is right


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_chat_llava(tmp_path_factory.mktemp("chat_llava"))


def test_chat_model_answers_match_its_own_generate(chat_model):
    """A hub-style model (processor, chat template): the batched, left-padded evaluation reads the same answers
    as the model's generate on each prompt alone, built by hand from the processor."""
    model, prompts = evaluation.load_model(str(chat_model))
    assert isinstance(prompts, evaluation.ChatPrompts)
    samples = evaluation.held_out_samples(6, prompts.image_size)
    predicted = prompts.answers(model, prompts.inputs(samples), None)
    processor = AutoProcessor.from_pretrained(chat_model)
    for sample, answer in zip(samples, predicted, strict=True):
        question = sample.question.replace(" ?", "?").replace("letter-", "letter ")
        text = f"USER: <image> {question} {evaluation.CHAT_INSTRUCTION} ASSISTANT:"
        pixels = (sample.image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        inputs = processor(text=[text], images=[Image.fromarray(pixels)], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=prompts.max_new_tokens, do_sample=False)
        assert answer == processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_demo_takes_a_hub_style_model(chat_model, tmp_path, capsys):
    """Every method that fits the model runs at the matched budget; one that cannot (gamma-MoD needs a layer
    besides 0, 1, 2 and the last) is skipped with its reason, not a crash."""
    table = tmp_path / "demo.md"
    main(
        ["demo", "--model", str(chat_model), "--samples", "8", "--batch", "4", "--budgets", "0.8"]
        + ["--plot", str(tmp_path / "demo.png"), "--markdown", str(table)]
    )
    rows = table.read_text().strip().splitlines()
    assert len(rows) == 2 + 1 + len(methods(4, 64)) - 1
    assert "skipped, gamma-MoD (untrained router): GammaMoD: a model of 4 layers" in capsys.readouterr().out
    flops = [float(row.split("|")[-5]) for row in rows[3:]]
    assert all(abs(f - 0.8) < 0.05 for f in flops), flops


@pytest.fixture(scope="module")
def shapes_qwen(tmp_path_factory):
    """A Qwen2-VL as benchmarks/train_shapes.py saves one (random weights: the test is about the plumbing)."""
    from benchmarks.train_shapes import build_qwen2_vl

    path = tmp_path_factory.mktemp("shapes_qwen2_vl")
    build_qwen2_vl(QwenWordTokenizer(), seed=1).save_pretrained(path)
    (path / "training.json").write_text("{}")
    return path


def test_shapes_qwen2_vl_answers_match_one_at_a_time(shapes_qwen):
    """A saved shapes Qwen2-VL loads with its own prompts (Qwen's placeholders, its patch layout), and the
    batched, left-padded evaluation gives each sample the answer it gets alone (M-RoPE positions with padding)."""
    model, prompts = evaluation.load_model(str(shapes_qwen))
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    samples = evaluation.held_out_samples(6, prompts.image_size)
    inputs = prompts.inputs(samples)
    assert evaluation.visual_tokens(model, inputs) == prompts.image_tokens == 144
    result = evaluation.Result("uncompressed", "-")
    evaluation.run_batch(model, prompts, samples, result)
    hits = 0
    with torch.no_grad():
        for sample in samples:
            alone = encode_qwen2_vl(prompts.tokenizer, [sample])
            token = int(model(**alone).logits[0, -1].argmax())
            hits += token == prompts.tokenizer.encode(sample.answer)[0]
    assert result.accuracy == hits / len(samples)


def test_demo_runs_on_a_shapes_qwen2_vl(shapes_qwen, tmp_path):
    """The demo's methods run on the Qwen2-VL adapter at the matched budget. MustDrop is only bounded: its vision
    stage merges similar windows, and random vision features are all alike, so even its largest budget keeps
    fewer tokens than 0.7 of the FLOPs needs."""
    table = tmp_path / "demo.md"
    main(
        ["demo", "--model", str(shapes_qwen), "--samples", "4", "--batch", "4", "--budgets", "0.7"]
        + ["--plot", str(tmp_path / "demo.png"), "--markdown", str(table)]
    )
    rows = table.read_text().strip().splitlines()
    assert len(rows) == 2 + 1 + len(methods(8, 144))
    flops = {row.split("|")[1].strip(): float(row.split("|")[-5]) for row in rows[3:]}
    assert flops.pop("MustDrop") < 0.75
    assert all(abs(f - 0.7) < 0.05 for f in flops.values()), flops


def test_budgets_out_of_reach_are_reported_once(tmp_path, capsys):
    """FLOPs targets under every method's floor (FastV keeps at least one token after layer 2: about 0.43 of the
    FLOPs here) all match that floor: the demo evaluates it once per method and says which targets it missed."""
    table = tmp_path / "demo.md"
    main(
        [
            "demo",
            "--samples",
            "10",
            "--batch",
            "10",
            "--budgets",
            "0.6",
            "0.2",
            "0.1",
            "--markdown",
            str(table),
        ]
        + ["--plot", str(tmp_path / "demo.png")]
    )
    rows = [line.split("|")[1:3] for line in table.read_text().strip().splitlines()[2:]]
    labels = [method.strip() for method, _ in rows]
    assert len(rows) == len({tuple(row) for row in rows})  # no setting twice
    assert labels.count("FastV") == 2  # 0.6, and the floor for 0.2 and 0.1
    out = capsys.readouterr().out
    for target in ("0.2", "0.1"):
        assert f"note, FastV: FLOPs target {target} is out of reach, closest 0.4" in out
    assert "note, FastV: FLOPs target 0.6" not in out  # reached (gamma-MoD's floor here is above 0.6)
