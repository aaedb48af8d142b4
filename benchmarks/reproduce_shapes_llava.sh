#!/usr/bin/env bash
# The shipped tiny LLaVA (tokencompress/assets/shapes_llava), trained from scratch in three stages on CPU; each
# stage continues the previous one's weights on new images (--data-offset) with fresh auxiliary heads.
# docs/quality.md gives each stage's minutes and held-out accuracy; training.json beside the weights holds the
# three logs. Run from the repository root:
#   bash benchmarks/reproduce_shapes_llava.sh [OUT]       # about 110 CPU minutes on 2 cores
# Thread counts and CPU kernels change float rounding, so a rerun lands near, not bit for bit on, the shipped
# weights.
set -euo pipefail
out=${1:-tokencompress/assets/shapes_llava}
work=$(mktemp -d)
common=(--questions 6 --where --attend-layer 4)
left_of=(--left-neighbour --attend-object-layer 4 --attend-object-head 1)

# 1. answer loss + per-token colour/object/place heads + head 0 of layer 4 supervised to the answer's cell
python -m benchmarks.train_shapes --steps 1000 "${common[@]}" --out "$work/stage1"
# 2. + every token predicts its left neighbour's object; head 1 of layer 4 supervised to the object a left_of
#    question names
python -m benchmarks.train_shapes --init-from "$work/stage1" --steps 400 --lr 5e-4 --data-offset 32000 \
  "${common[@]}" "${left_of[@]}" --out "$work/stage2"
# 3. + left_of questions drawn 3 times as often
python -m benchmarks.train_shapes --init-from "$work/stage2" --steps 500 --lr 5e-4 --data-offset 48000 \
  "${common[@]}" "${left_of[@]}" --left-of-weight 3 --out "$out"
