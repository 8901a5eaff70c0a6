#!/usr/bin/env bash
# The real command lines on a Gemma-3-4B-shaped model (random weights) on the GPU machine:
# train.py (4-bit QLoRA, a few dozen steps) -> adapter -> merge -> generate.
#   source bench/device_setup.sh && bash bench/gpu_pipeline.sh .cache/gemma3-4b .cache/bench-data
set -euo pipefail
model=$1 data=$2 out=${3:-.cache/run4b}
python3 train.py --config recipes/gemma3-4b-qlora.yaml --model_name_or_path "$model" --processor_name_or_path "$model" \
  --dataset_name "$data" --output_dir "$out" --max_steps 24 --logging_steps 4 --save_strategy steps --save_steps 24 --report_to none --overwrite_output_dir true
python3 - "$out" <<'PY'
import json, sys, glob
state = json.load(open(sorted(glob.glob(sys.argv[1] + "/checkpoint-*/trainer_state.json"))[-1]))
print(json.dumps({"log_history_tail": state["log_history"][-2:]}))
PY
python3 -c "from PIL import Image; import numpy as np; Image.fromarray((np.random.default_rng(0).random((28,28))*255).astype('uint8')).resize((896,896)).save('/tmp/probe.png')"
time python3 -m radiology.generate --model "$out/merged" --image /tmp/probe.png --max_new_tokens 24
ls -la "$out" "$out/merged"
