"""Where a shapes LLaVA fails on left_of questions ("what is left of the red circle ?"): does the supervised answer
head find the answer's cell, does the first-hop head find the named object, and which answers go wrong.

python -m benchmarks.left_of_diagnosis --model tokencompress/assets/shapes_llava --samples 400

Held-out left_of questions only (seed 1), eager attention, from the last prompt position: the attention mass of
head `--answer-head` of layer `--layer` on the answer's 16 tokens and of `--object-head` on the named object's,
the accuracy split by whether the answer head puts more than half its attention on the answer's cell, and the
accuracy by the kind of answer (a shape, or a `letter-x` word), and by the number of objects in the image, with
how often the object head finds the named object (> 0.5 of its attention on it).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.train_shapes import CELL_OF_TOKEN
from tokencompress.evaluation import load_shapes_model
from tokencompress.synthetic import IMAGE_SIZE, TEST_SEED, ShapesTask, answer_cell


@torch.no_grad()
def diagnose(
    model_dir: str, samples: int, layer: int, answer_head: int, object_head: int, batch: int = 50
) -> dict:
    model, prompts = load_shapes_model(model_dir)
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    tokenizer = prompts.tokenizer
    task = ShapesTask(TEST_SEED, IMAGE_SIZE, question_types=("left_of",))
    right = {"shape": [0, 0], "letter": [0, 0], "found": [0, 0], "missed": [0, 0]}
    answer_mass, object_mass = [], []
    by_objects: dict[int, list[int]] = {}  # objects in the image -> [right, object head found it, total]
    for start in range(0, samples, batch):
        chunk = [task.sample(i) for i in range(start, min(samples, start + batch))]
        inputs = prompts.inputs(chunk)
        out = model(**inputs, output_attentions=True)
        predicted = out.logits[:, -1].argmax(-1).tolist()
        attention = out.attentions[layer][:, :, -1]  # (batch, heads, length): from the last prompt position
        for b, sample in enumerate(chunk):
            image = torch.nonzero(inputs["input_ids"][b] == tokenizer.image_token_id).flatten()
            cell = answer_cell(sample)
            answer_mass.append(float(attention[b, answer_head, image[cell == CELL_OF_TOKEN]].sum()))
            object_mass.append(float(attention[b, object_head, image[cell + 1 == CELL_OF_TOKEN]].sum()))
            hit = int(predicted[b] == tokenizer.encode(sample.answer)[0])
            kind = "letter" if sample.answer.startswith("letter-") else "shape"
            found = "found" if answer_mass[-1] > 0.5 else "missed"
            for key in (kind, found):
                right[key][0] += hit
                right[key][1] += 1
            objects = by_objects.setdefault(sum(c is not None for c in sample.cells), [0, 0, 0])
            objects[0] += hit
            objects[1] += object_mass[-1] > 0.5
            objects[2] += 1
    return {
        "questions": samples,
        "accuracy": (right["shape"][0] + right["letter"][0]) / samples,
        "answer_head_mass_on_answer_cell": sum(answer_mass) / samples,
        "object_head_mass_on_named_object": sum(object_mass) / samples,
        **{f"{key} (right, total)": value for key, value in right.items()},
        "by objects in the image (right, object head > 0.5 on the named object, total)": {
            n: by_objects[n] for n in sorted(by_objects)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a shapes LLaVA directory (default: the shipped one)")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--answer-head", type=int, default=0)
    parser.add_argument("--object-head", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = diagnose(args.model, args.samples, args.layer, args.answer_head, args.object_head)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
