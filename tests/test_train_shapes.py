"""The training script's parts that the shipped models' quality rests on, against independent references: the
supervised head's attention and loss as eager attention gives them (LLaMA rotary and Qwen2-VL's M-RoPE), the
left-neighbour targets as read from the cells, the decoder warm start as the source decoder's own logits, and
the distillation target as what the teacher's decoder receives."""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.train_shapes import (
    AnswerCellAttention,
    ProjectorTeacher,
    build_model,
    build_qwen2_vl,
    copy_decoder,
    distinct_followups,
    model_inputs,
    neighbour_targets,
)
from tokencompress.synthetic import (
    COLOURS,
    LETTERS,
    SHAPES,
    QwenWordTokenizer,
    ShapesTask,
    WordTokenizer,
    answer_cell,
    cell_targets,
    encode,
)


def _eager(model):
    """Eager attention, so that output_attentions returns the weights the check compares with."""
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    return model.eval()


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_supervised_head_weights_are_eager_attention(arch):
    """The loss's attention (recomputed from the layer input) equals the weights eager attention returns, at every
    answer position of a left-padded multi-turn batch, for LLaMA's 1-D rotary and Qwen2-VL's M-RoPE."""
    tokenizer = QwenWordTokenizer() if arch == "qwen2_vl" else WordTokenizer()
    model = _eager(build_qwen2_vl(tokenizer) if arch == "qwen2_vl" else build_model(tokenizer))
    task = ShapesTask(seed=5)
    samples = [task.sample(i) for i in range(3)]
    followups = [distinct_followups(task, s, random.Random(i), i) for i, s in enumerate(samples)]
    inputs = model_inputs(model, tokenizer, samples, with_answers=True, followups=followups)
    layer, head = 3, 2
    supervised = AnswerCellAttention(model, layer, head)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        labels = inputs["labels"]
        starts = torch.nonzero((labels != -100) & (labels.roll(1, dims=1) == -100))
        rows, queries = starts[:, 0], starts[:, 1] - 1
        assert len(rows) == 1 + 2 + 3  # one query per turn, the padded rows included
        weights = supervised.weights(inputs, rows, queries)
    eager = out.attentions[layer][rows, head, queries]
    torch.testing.assert_close(weights, eager, atol=1e-5, rtol=1e-4)
    # the loss: -log of the eager mass on each cell-answer turn's cell, the turns matched to the samples by hand
    turns = [[s, *more] for s, more in zip(samples, followups, strict=True)]
    expected = []
    for (row, query), sample in zip(starts.tolist(), [t for per in turns for t in per], strict=True):
        cell = answer_cell(sample)
        if cell is None:
            continue
        image = torch.nonzero(inputs["input_ids"][row] == model.config.image_token_id).flatten()
        tokens = [int(image[k]) for k in range(144) if (k // 12) // 4 * 3 + (k % 12) // 4 == cell]
        expected.append(-torch.log(out.attentions[layer][row, head, query - 1, tokens].sum() + 1e-6))
    assert expected
    with torch.no_grad():
        model(**inputs)  # the hook captures this forward's layer input
        loss = supervised.loss(inputs, turns, model.config.image_token_id)
    torch.testing.assert_close(loss, torch.stack(expected).mean(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("step", [-1, 1])
def test_neighbour_targets_read_from_the_cells(step):
    """Each token's targets are the object and colour in the cell `step` columns from its own cell (0 if that cell
    is empty), ignored where no such cell exists; checked token by token against the sample's cells."""
    samples = [ShapesTask(seed=2).sample(i) for i in range(6)]
    colour, kind = cell_targets(samples, 12)
    objects, colours = neighbour_targets(kind, step), neighbour_targets(colour, step)
    names, colour_names = list(SHAPES) + list(LETTERS), list(COLOURS)
    for b, sample in enumerate(samples):
        for token in range(144):
            row, col = divmod(token, 12)
            cell = (row // 4) * 3 + col // 4
            if not 0 <= cell % 3 + step <= 2:
                assert objects[b, token] == colours[b, token] == -100
                continue
            item = sample.cells[cell + step]
            assert objects[b, token] == (0 if item is None else 1 + names.index(item.name))
            assert colours[b, token] == (0 if item is None else 1 + colour_names.index(item.colour))


def test_decoder_warm_start_reproduces_the_source_decoder():
    """A Qwen2-VL whose decoder starts from a LLaVA's (copy_decoder) gives the LLaVA's logits on text-only input:
    M-RoPE with equal t/h/w positions is 1-D rotary, and the q/k/v biases Qwen2 adds start at zero."""
    source = build_model(WordTokenizer(), seed=3).eval()
    tokenizer = QwenWordTokenizer()
    model = build_qwen2_vl(tokenizer, seed=4).eval()
    copied = copy_decoder(model, source)
    decoder = [n for n, _ in source.named_parameters() if n.startswith(("model.language_model.", "lm_head."))]
    assert copied == len(decoder) > 8 * 9
    ids = torch.tensor([WordTokenizer().encode("question : what shape is in the top left cell ? answer :")])
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got[..., : expected.shape[-1]], expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        copy_decoder(build_qwen2_vl(tokenizer), _wider(source))


def _wider(source):
    """A LLaVA whose decoder is wider than the Qwen2-VL's: copy_decoder must refuse it."""
    from transformers import LlavaForConditionalGeneration

    config = source.config
    config = type(config).from_dict(config.to_dict())
    config.text_config.hidden_size = 256
    config.text_config.head_dim = 64
    return LlavaForConditionalGeneration(config)


def test_distillation_target_is_what_the_teacher_decoder_reads(tmp_path):
    """The teacher's per-token targets are the embeddings its own decoder receives at the image positions, in
    prompt order (raster order on the 12 x 12 grid, as the student's merged tokens)."""
    tokenizer = WordTokenizer()
    build_model(tokenizer, seed=6).save_pretrained(tmp_path)
    teacher = ProjectorTeacher(str(tmp_path))
    samples = [ShapesTask(seed=4).sample(i) for i in range(2)]
    inputs = encode(tokenizer, samples, 144)
    received = {}
    decoder = teacher.model.model.language_model
    decoder.register_forward_pre_hook(
        lambda m, a, k: received.__setitem__("embeds", k["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        teacher.model(**inputs)
    image = inputs["input_ids"] == tokenizer.image_token_id
    expected = received["embeds"][image].reshape(2, 144, -1)
    torch.testing.assert_close(teacher.features(samples), expected)
    assert teacher.loss(samples, expected.reshape(-1, expected.shape[-1])) == 0


def test_stop_at_reproduces_an_interrupted_run(tmp_path, monkeypatch):
    """`--steps 4 --stop-at 2` ends with the weights a 4-step run saved at step 2 (`--save-every 2`): the same
    data, the same learning-rate schedule, cut short (how an interrupted stage is reproduced)."""
    import sys

    from benchmarks import train_shapes

    saved = []

    def capture(model, args, record):
        saved.append((record.get("saved_at_step"), {k: v.clone() for k, v in model.state_dict().items()}))

    monkeypatch.setattr(train_shapes, "save", capture)
    common = ["--steps", "4", "--batch", "2", "--eval-samples", "4", "--final-samples", "4", "--threads", "1"]
    for extra in (["--save-every", "2"], ["--stop-at", "2"]):
        monkeypatch.setattr(sys, "argv", ["train_shapes", *common, *extra, "--out", str(tmp_path)])
        train_shapes.main()
    (at_two, interrupted), (_, finished), (_, stopped) = saved
    assert at_two == 2
    for key, value in stopped.items():
        torch.testing.assert_close(value, interrupted[key], rtol=0, atol=0)
    assert any(not torch.equal(finished[k], stopped[k]) for k in stopped)  # the full run went on


def _qwen2_vl_with_biases(seed):
    """A Qwen2-VL whose q/k/v biases are not zero, so that a copy that dropped them would show."""
    model = build_qwen2_vl(QwenWordTokenizer(), seed=seed).eval()
    with torch.no_grad():
        for name, value in model.named_parameters():
            if name.startswith("model.language_model.") and name.endswith("_proj.bias"):
                value.normal_(std=0.1)
    return model


def test_llava_decoder_from_a_qwen2_vl_reproduces_its_text_logits():
    """The other way: a LLaVA whose LLaMA decoder has attention biases, started from a Qwen2-VL's decoder, gives
    the Qwen2-VL's logits on text over the shared vocabulary (its placeholders' rows are left out). Without
    attention biases the copy is refused and nothing is changed."""
    source = _qwen2_vl_with_biases(seed=5)
    model = build_model(WordTokenizer(), seed=6, attention_bias=True).eval()
    copy_decoder(model, source)
    ids = torch.tensor([WordTokenizer().encode("question : what is left of the red circle ? answer :")])
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert got.shape[-1] == len(WordTokenizer()) < expected.shape[-1]
    torch.testing.assert_close(got, expected[..., : got.shape[-1]], atol=1e-4, rtol=1e-4)
    unbiased = build_model(WordTokenizer(), seed=6).eval()
    before = {k: v.clone() for k, v in unbiased.state_dict().items()}
    with pytest.raises(ValueError, match="q_proj.bias of the source has no counterpart"):
        copy_decoder(unbiased, source)
    assert all(torch.equal(before[k], v) for k, v in unbiased.state_dict().items())


def test_init_from_then_decoder_from_a_qwen2_vl(tmp_path, monkeypatch):
    """`--arch llava --init-from LLAVA --init-decoder-from QWEN2_VL` trains a LLaVA whose vision tower and
    projector are the saved LLaVA's and whose decoder is the Qwen2-VL's (checked after one step at lr 0)."""
    import sys

    from benchmarks import train_shapes

    llava, qwen = build_model(WordTokenizer(), seed=7), _qwen2_vl_with_biases(seed=8)
    llava.save_pretrained(tmp_path / "llava")
    qwen.save_pretrained(tmp_path / "qwen")
    saved = []
    monkeypatch.setattr(train_shapes, "save", lambda model, args, record: saved.append(model))
    argv = [
        "--init-from",
        str(tmp_path / "llava"),
        "--init-decoder-from",
        str(tmp_path / "qwen"),
        "--lr",
        "0",
    ]
    small = ["--steps", "1", "--batch", "2", "--eval-samples", "2", "--final-samples", "2", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", ["train_shapes", *argv, *small, "--out", str(tmp_path / "out")])
    train_shapes.main()
    (model,) = saved
    assert model.config.text_config.attention_bias
    trained = model.state_dict()
    for name, value in llava.state_dict().items():
        if not name.startswith(("model.language_model.", "lm_head.")):
            torch.testing.assert_close(trained[name], value, rtol=0, atol=0)
    for name, value in qwen.state_dict().items():
        if name.startswith(("model.language_model.", "lm_head.")):
            torch.testing.assert_close(trained[name], value[: trained[name].shape[0]], rtol=0, atol=0)
    assert not trained["model.language_model.layers.0.self_attn.o_proj.bias"].any()


def test_saved_weights_are_fp16_and_say_so(tmp_path):
    """`save` writes fp16 weights with a config.json whose dtype is float16, and leaves the training copy fp32."""
    import argparse
    import json

    from safetensors.torch import load_file

    from benchmarks.train_shapes import save

    model = build_model(WordTokenizer(), seed=9)
    save(model, argparse.Namespace(out=str(tmp_path)), {"note": "test"})
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    assert all(value.dtype == torch.float16 for value in load_file(tmp_path / "model.safetensors").values())
    loaded = type(model).from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(loaded[name], value.half().float(), rtol=0, atol=0)
    assert json.loads((tmp_path / "training.json").read_text()) == {"note": "test"}
