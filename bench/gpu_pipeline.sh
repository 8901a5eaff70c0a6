#!/usr/bin/env bash
# The real command lines on a Gemma-3-4B-shaped model (random weights) on the GPU machine:
# train.py (4-bit QLoRA, a few dozen steps) -> adapter -> merge -> generate.
#   source bench/device_setup.sh && bash bench/gpu_pipeline.sh .cache/gemma3-4b .cache/bench-data
#   IMAGES=4 bash bench/gpu_pipeline.sh .cache/gemma3-4b /tmp/bench-data-x4 /tmp/run4b-x4   # 4-image studies
set -euo pipefail
model=$1 data=$2 out=${3:-.cache/run4b}
images=${IMAGES:-1} steps=${STEPS:-24}
study_flags=()
if [ "$images" -gt 1 ]; then
  # A dataset of studies: $images images per row in an `images` column (bench/train_throughput.py writes it).
  python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from train_throughput import synthetic_study_dataset as s; s(Path('$data'), rows=4 * $steps, images=$images)"
  study_flags=(--images_column images --max_images "$images" --max_length $((images * 300 + 512)))
fi
python3 train.py --config recipes/gemma3-4b-qlora.yaml --model_name_or_path "$model" --processor_name_or_path "$model" \
  --dataset_name "$data" --output_dir "$out" --max_steps "$steps" --logging_steps 4 --save_strategy steps --save_steps "$steps" \
  --report_to none --overwrite_output_dir true "${study_flags[@]}"
python3 - "$out" <<'PY'
import json, sys, glob
state = json.load(open(sorted(glob.glob(sys.argv[1] + "/checkpoint-*/trainer_state.json"))[-1]))
print(json.dumps({"log_history_tail": state["log_history"][-2:]}))
PY
image_flags=()
for i in $(seq 1 "$images"); do
  python3 -c "from PIL import Image; import numpy as np; Image.fromarray((np.random.default_rng($i).random((28,28))*255).astype('uint8')).resize((896,896)).save('/tmp/probe$i.png')"
  image_flags+=(--image "/tmp/probe$i.png")
done
time python3 -m radiology.generate --model "$out/merged" "${image_flags[@]}" --max_new_tokens 24
ls -la "$out" "$out/merged"
