#!/usr/bin/env bash
# The two shipped tiny models, trained from scratch on CPU (no pretrained weights), each stage continuing the
# previous one's weights on new images (--data-offset) with fresh auxiliary heads:
#   1. the LLaVA's stages 1-3 (LLaMA decoder, CLIP vision tower);
#   2. the Qwen2-VL's stages 1-4 (tokencompress/assets/shapes_qwen2_vl): its decoder starts from the stage-3
#      LLaVA's (--init-decoder-from), its image tokens are pulled toward that LLaVA projector's output
#      (--distill-from), its vision tower learns from scratch. Its second stage was a 700-step schedule cut at
#      step 200 (a session ended; --stop-at replays exactly that);
#   3. the LLaVA's stage 4 (tokencompress/assets/shapes_llava): stage 3's vision tower and projector, the
#      Qwen2-VL's decoder (a LLaMA decoder with attention biases takes it), trained on with stage 3's recipe.
# docs/quality.md gives each stage's minutes and held-out accuracy; training.json beside each model holds its
# logs. Run from the repository root:
#   bash benchmarks/reproduce_shapes.sh [LLAVA_OUT] [QWEN2_VL_OUT]    # about 7.5 CPU hours
# Thread counts and CPU kernels change float rounding, so a rerun lands near, not bit for bit on, the weights.
set -euo pipefail
llava_out=${1:-tokencompress/assets/shapes_llava}
qwen_out=${2:-tokencompress/assets/shapes_qwen2_vl}
work=$(mktemp -d)
common=(--questions 6 --where --attend-layer 4)
left_of=(--left-neighbour --attend-object-layer 4 --attend-object-head 1)

# LLaVA 1. answer loss + per-token colour/object/place heads + head 0 of layer 4 supervised to the answer's cell
python -m benchmarks.train_shapes --steps 1000 "${common[@]}" --out "$work/llava1"
# LLaVA 2. + every token predicts its left neighbour's object; head 1 of layer 4 supervised to the object a
#    left_of question names
python -m benchmarks.train_shapes --init-from "$work/llava1" --steps 400 --lr 5e-4 --data-offset 32000 \
  "${common[@]}" "${left_of[@]}" --out "$work/llava2"
# LLaVA 3. + left_of questions drawn 3 times as often
python -m benchmarks.train_shapes --init-from "$work/llava2" --steps 500 --lr 5e-4 --data-offset 48000 \
  "${common[@]}" "${left_of[@]}" --left-of-weight 3 --out "$work/llava3"

# Qwen2-VL 1-4, with the LLaVA's stage-3 losses, one thread each
qwen=(--arch qwen2_vl --distill-from "$work/llava3" "${common[@]}" "${left_of[@]}" --left-of-weight 3 --threads 1)
python -m benchmarks.train_shapes "${qwen[@]}" --init-decoder-from "$work/llava3" --steps 300 --out "$work/qwen1"
python -m benchmarks.train_shapes "${qwen[@]}" --init-from "$work/qwen1" --steps 700 --stop-at 200 \
  --data-offset 10000 --out "$work/qwen2"
python -m benchmarks.train_shapes "${qwen[@]}" --init-from "$work/qwen2" --steps 600 --lr 7e-4 \
  --data-offset 20000 --out "$work/qwen3"
python -m benchmarks.train_shapes "${qwen[@]}" --init-from "$work/qwen3" --steps 600 --lr 7e-4 \
  --data-offset 40000 --out "$qwen_out"

# LLaVA 4. stage 3's vision side + the Qwen2-VL's decoder, stage 3's recipe, one thread
python -m benchmarks.train_shapes --init-from "$work/llava3" --init-decoder-from "$qwen_out" --steps 500 \
  --lr 5e-4 --data-offset 80000 "${common[@]}" "${left_of[@]}" --left-of-weight 3 --threads 1 --out "$llava_out"
