#!/usr/bin/env bash
# The shipped tiny Qwen2-VL (tokencompress/assets/shapes_qwen2_vl), trained on CPU in four stages from the shipped
# shapes LLaVA: its decoder starts from the LLaVA's (--init-decoder-from) and its image tokens are pulled toward
# the LLaVA projector's output (--distill-from); the vision tower learns from scratch. Each stage continues the
# previous one's weights on new images. The second stage was a 700-step schedule cut at step 200 (the session
# ended; --stop-at replays exactly that). docs/quality.md gives each stage's minutes and held-out accuracy;
# training.json beside the weights holds the logs. Run from the repository root:
#   bash benchmarks/reproduce_shapes_qwen2_vl.sh [OUT]     # about 5 CPU hours with one thread per run
# Thread counts and CPU kernels change float rounding, so a rerun lands near, not bit for bit on, the weights.
set -euo pipefail
out=${1:-tokencompress/assets/shapes_qwen2_vl}
llava=tokencompress/assets/shapes_llava
work=$(mktemp -d)
common=(--arch qwen2_vl --distill-from "$llava" --questions 6 --where --left-neighbour --left-of-weight 3
  --attend-layer 4 --attend-object-layer 4 --attend-object-head 1 --threads 1)

python -m benchmarks.train_shapes "${common[@]}" --init-decoder-from "$llava" --steps 300 --out "$work/stage1"
python -m benchmarks.train_shapes "${common[@]}" --init-from "$work/stage1" --steps 700 --stop-at 200 \
  --data-offset 10000 --out "$work/stage2"
python -m benchmarks.train_shapes "${common[@]}" --init-from "$work/stage2" --steps 600 --lr 7e-4 \
  --data-offset 20000 --out "$work/stage3"
python -m benchmarks.train_shapes "${common[@]}" --init-from "$work/stage3" --steps 600 --lr 7e-4 \
  --data-offset 40000 --out "$out"
