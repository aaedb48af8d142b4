"""lmms-eval integration: `--model tokencompress` through lmms-eval's own evaluator on a tiny LLaVA.

The model, its processor (a word-level tokenizer, a CLIP image processor, a chat template) and a small local
task (four images with questions, as an imagefolder with metadata.jsonl) are all built here; nothing is
downloaded. The answers lmms-eval records are checked against an independent reference: `model.generate`
called directly on the same compressed model, and teacher-forced generate logits for the multiple-choice task.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

lmms_eval = pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (pip install tokencompress[lmms])"
)

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

import tokencompress as tc  # noqa: E402
from tokencompress.lmms_eval_model import TokenCompressLMM, parse_value  # noqa: E402
from tokencompress.tiny import IMAGE_TOKEN_ID, tiny_llava  # noqa: E402

LAYERS = 4
VISUAL = 16  # (32 / 8)^2 patches per image
MAX_NEW_TOKENS = 5
QUESTIONS = ["what color is the shape ?", "what shape ?", "what is the color of the shape ?", "shape ?"]
CHOICES = ["red circle", "green square", "blue"]
TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_processor() -> LlavaProcessor:
    specials = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
    # "abcdef": the probe transformers' StopStringCriteria tokenizes to map the vocabulary to strings
    words = ["USER", "ASSISTANT", ":", "?", "what", "color", "is", "the", "of", "shape", "abcdef"]
    words += ["red", "green", "blue", "circle", "square"]
    words += [f"w{i}" for i in range(128 - len(specials) - len(words))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    assert vocab["<image>"] == IMAGE_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    model = tiny_llava(layers=LAYERS, seed=0)
    for config in (model.config.text_config, model.generation_config):
        config.bos_token_id, config.eos_token_id = 1, 2
    model.save_pretrained(root / "model")
    tiny_processor().save_pretrained(root / "model")
    data = root / "data"
    data.mkdir()
    rng = np.random.RandomState(0)
    for i in range(len(QUESTIONS)):
        size = (40 + 8 * i, 36 + 4 * i)  # different shapes: the processor resizes and crops them
        Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8")).save(data / f"{i}.png")
    return root, data, [Image.open(data / f"{i}.png").convert("RGB") for i in range(len(QUESTIONS))]


def reference_model(root, compressed=True):
    model = AutoModelForImageTextToText.from_pretrained(root / "model", attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(root / "model")
    if compressed:
        tc.compress(model, tc.FastV(layer=1, keep=0.5))
    return model, processor


def reference_inputs(processor, image, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=[image], text=[prompt], return_tensors="pt")


def reference_answers(model, processor, images):
    """Each question alone through model.generate: the raw decoded continuation."""
    answers = []
    for image, question in zip(images, QUESTIONS, strict=True):
        inputs = reference_inputs(processor, image, question)
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(
            processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        )
    return answers


def choice_losses(model, processor, image, question):
    """Mean NLL of each choice given the prompt, from generate's raw logits with the choice's tokens forced."""
    inputs = reference_inputs(processor, image, question)
    losses = []
    for choice in CHOICES:
        ids = processor.tokenizer(" " + choice, add_special_tokens=False).input_ids
        out = model.generate(
            **inputs,
            max_new_tokens=len(ids),
            min_new_tokens=len(ids),
            do_sample=False,
            prefix_allowed_tokens_fn=lambda batch, sent, ids=ids: [
                ids[len(sent) - inputs["input_ids"].shape[1]]
            ],
            output_logits=True,
            return_dict_in_generate=True,
        )
        logits = torch.cat(out.logits)  # raw logits of each step, before the forcing
        losses.append(float(-torch.log_softmax(logits, -1)[range(len(ids)), ids].mean()))
    return losses


def write_tasks(root, data, targets, labels):
    with open(data / "metadata.jsonl", "w") as handle:
        for i, question in enumerate(QUESTIONS):
            row = {"file_name": f"{i}.png", "question": question, "answer": targets[i], "label": labels[i]}
            handle.write(json.dumps(row) + "\n")
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    common = (
        "dataset_path: imagefolder\n"
        f"dataset_kwargs:\n  data_dir: {data}\n  cache_dir: {root / 'hf_cache'}\n"
        "test_split: train\n"
        "doc_to_visual: image\n"
        'doc_to_text: "{{question}}"\n'
    )
    (tasks / "tiny_vqa.yaml").write_text(
        "task: tc_tiny_vqa\noutput_type: generate_until\n" + common + "doc_to_target: answer\n"
        f"generation_kwargs:\n  until: {json.dumps(['</s>', targets['stop']])}\n"
        f"  max_new_tokens: {MAX_NEW_TOKENS}\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "tiny_mc.yaml").write_text(
        "task: tc_tiny_mc\noutput_type: multiple_choice\n" + common + "doc_to_target: label\n"
        f"doc_to_choice: {json.dumps(CHOICES)}\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks


def evaluate(model, model_args, tasks, task, batch_size):
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        batch_size=batch_size,
        device="cpu",
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        process_docs_parallel=1,
    )


def answers_of(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] for s in samples]


@pytest.fixture(scope="module")
def reference(setup):
    """The compressed model's own answers and choice scores, called directly; the tasks' targets built from them
    so that exact match is 2/4 and accuracy 2/4 if, and only if, the evaluated answers are the reference's."""
    root, data, images = setup
    model, processor = reference_model(root)
    raw = reference_answers(model, processor, images)
    assert all(raw), raw

    def cut(stop):
        return [answer.split(stop)[0].strip() for answer in raw]

    # a stop string some answer holds after its first words: the answers are cut there; the one that keeps the
    # answers most distinct, so that a mix-up of answers between documents cannot go unnoticed
    candidates = [word for answer in raw for word in answer.split()[1:] if word not in answer.split()[:1]]
    stop = max(candidates, key=lambda word: (len(set(cut(word))), all(cut(word))))
    expected = cut(stop)
    assert all(expected) and expected != [answer.strip() for answer in raw], (raw, stop)
    plain = reference_answers(*reference_model(root, compressed=False), images)
    assert plain != raw, "the tiny model answers the same with and without FastV; the test could not tell"
    losses = [choice_losses(model, processor, image, q) for image, q in zip(images, QUESTIONS, strict=True)]
    predicted = [int(np.argmin(row)) for row in losses]
    targets = {0: expected[0], 1: expected[1], 2: "no such answer", 3: "no such answer", "stop": stop}
    labels = [predicted[0], predicted[1], (predicted[2] + 1) % 3, (predicted[3] + 1) % 3]
    tasks = write_tasks(root, data, targets, labels)
    return {
        "model": model,
        "processor": processor,
        "expected": expected,
        "plain": [answer.split(stop)[0].strip() for answer in plain],
        "stop": stop,
        "losses": losses,
        "tasks": tasks,
    }


def test_entry_point_registers_the_model():
    cls = get_model("tokencompress")
    assert cls is TokenCompressLMM, (
        "reinstall tokencompress (pip install -e .) to register its lmms_eval entry point"
    )


def test_simple_evaluate_runs_the_compressed_model(setup, reference):
    root, tasks, expected = setup[0], reference["tasks"], reference["expected"]
    args = f"pretrained={root / 'model'},compressor=fastv,layer=1,keep=0.5"
    by_name = evaluate("tokencompress", args, tasks, "tc_tiny_vqa", batch_size=1)  # the CLI's path
    assert by_name["results"]["tc_tiny_vqa"]["exact_match,none"] == pytest.approx(0.5)
    assert answers_of(by_name, "tc_tiny_vqa") == expected

    lm = get_model("tokencompress").create_from_arg_string(args, {"batch_size": 2, "device": "cpu"})
    model = lm.model  # the evaluator's lm.clean() drops the model from `lm` when it is done
    batched = evaluate(lm, None, tasks, "tc_tiny_vqa", batch_size=2)  # prompts of different lengths together
    assert answers_of(batched, "tc_tiny_vqa") == expected
    assert batched["results"]["tc_tiny_vqa"]["exact_match,none"] == pytest.approx(0.5)
    stats = tc.stats(model)
    assert stats.prefill.batch == 2 and stats.prefill.tokens_per_stage()["input"] == [VISUAL, VISUAL]
    visual = [layer.visual for layer in stats.prefill.layers]
    assert visual[0] == [VISUAL] * 2 and all(v == [VISUAL // 2] * 2 for v in visual[1:]), visual


def test_loglikelihood_scores_as_generate_does(setup, reference):
    """The interface directly: Instances as lmms-eval builds them for multiple-choice tasks."""
    root, images = setup[0], setup[2]
    lm = TokenCompressLMM.create_from_arg_string(
        f"pretrained={root / 'model'},compressor=fastv,layer=1,keep=0.5"
    )
    lm.task_dict = {"t": {"test": [{"image": image} for image in images]}}

    def visual_of(doc):
        return [doc["image"]]

    def request(doc, continuation):
        metadata = {"task": "t", "doc_id": doc, "repeats": 1}
        return Instance(
            "loglikelihood", (QUESTIONS[doc], continuation, visual_of, doc, "t", "test"), 0, metadata
        )

    requests = [request(doc, " " + choice) for doc in range(len(QUESTIONS)) for choice in CHOICES]
    scores = lm.loglikelihood(requests)
    losses = [loss for loss, _ in scores]
    assert losses == pytest.approx([x for row in reference["losses"] for x in row], abs=1e-4)

    model, processor = reference["model"], reference["processor"]
    inputs = reference_inputs(processor, images[0], QUESTIONS[0])
    out = model.generate(
        **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :]
    greedy = processor.decode(tokens, skip_special_tokens=True)
    assert processor.tokenizer(" " + greedy, add_special_tokens=False).input_ids == tokens.tolist(), greedy
    other = greedy.rsplit(" ", 1)[0] + (" w98" if not greedy.endswith(" w98") else " w99")
    (loss, is_greedy), (other_loss, other_greedy) = lm.loglikelihood(
        [request(0, " " + greedy), request(0, " " + other)]
    )
    assert is_greedy and not other_greedy and other_loss > loss
    assert loss == pytest.approx(
        float(-torch.log_softmax(torch.cat(out.logits), -1)[range(3), tokens].mean()), abs=1e-4
    )


def test_no_compressor_and_a_saved_pipeline(setup, reference, tmp_path):
    """compressor=none answers as the uncompressed model; compressor_dir re-applies a tc.save_pretrained pipeline."""
    root, images = setup[0], setup[2]
    tc.save_pretrained(reference["model"], tmp_path / "pipeline")
    gen_kwargs = {"until": [reference["stop"]], "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0}
    for args, expected in [
        ("compressor=none", reference["plain"]),
        (f"compressor_dir={tmp_path / 'pipeline'},batch_size=4", reference["expected"]),
    ]:
        lm = TokenCompressLMM.create_from_arg_string(f"pretrained={root / 'model'},{args}")
        lm.task_dict = {"t": {"test": [{"image": image} for image in images]}}
        requests = [
            Instance(
                "generate_until",
                (question, dict(gen_kwargs), lambda doc: [doc["image"]], doc, "t", "test"),
                0,
                {"task": "t", "doc_id": doc, "repeats": 1},
            )
            for doc, question in enumerate(QUESTIONS)
        ]
        assert lm.generate_until(requests) == expected, args
    assert tc.compressors_of(lm.model)[0].to_dict() == tc.FastV(layer=1, keep=0.5).to_dict()


# lmms-eval 0.7 to 0.7.3 pass every model output through unwrap_generation_output, which turns the (loss, greedy)
# pairs of loglikelihood requests into strings, so multiple_choice tasks fail in process_results for any model.
_unwrap = getattr(lmms_eval.api.instance, "unwrap_generation_output", lambda output: (output, None))
STRINGIFIES_LOGLIKELIHOOD = isinstance(_unwrap((0.5, True))[0], str)


@pytest.mark.xfail(
    STRINGIFIES_LOGLIKELIHOOD, reason="this lmms-eval turns loglikelihood results into strings", run=False
)
def test_multiple_choice_task(setup, reference):
    args = f"pretrained={setup[0] / 'model'},compressor=fastv,layer=1,keep=0.5"
    results = evaluate("tokencompress", args, reference["tasks"], "tc_tiny_mc", batch_size=1)
    assert results["results"]["tc_tiny_mc"]["acc,none"] == pytest.approx(0.5)


def test_parse_value():
    assert parse_value("none") is None
    assert parse_value("1|3") == [1, 3]
    assert parse_value("[[1, 1], [1, 2]]") == [[1, 1], [1, 2]]
    assert parse_value("0.5") == 0.5 and parse_value("64") == 64 and parse_value("text") == "text"
    assert parse_value(2) == 2 and parse_value("false") is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("compressor=nope", "registered: "),
        ("compressor=fastv,layr=1", "its parameters are ['layer', 'keep', 'query']"),
        ("compressor=fastv,keep=2.0", "outside (0, 1]"),
        ("compressor=none,layer=1", "compressor=none takes no parameters"),
        ("compressor=fastv,batch_size=0", "batch_size must be an int >= 1"),
        ("compressor=fastv,dtype=float8", "dtype='float8'"),
        ("compressor=static_pyramid,after_layers=2|1", "must be increasing"),
    ],
)
def test_bad_model_args_fail_before_loading(args, message):
    """A pretrained path that does not exist: the error is about the args, raised before loading anything."""
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace("]", r"\]")):
        TokenCompressLMM.create_from_arg_string(f"pretrained=/nonexistent/model,{args}")


def test_bad_layer_for_the_model(setup):
    root = setup[0]
    with pytest.raises(ValueError, match="outside this model"):
        TokenCompressLMM.create_from_arg_string(
            f"pretrained={root / 'model'},compressor=fastv,layer={LAYERS}"
        )
