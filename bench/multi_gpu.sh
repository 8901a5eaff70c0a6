#!/usr/bin/env bash
# Several GPUs, measured through the real command lines (train.py under accelerate launch) on random-weight
# Gemma 3 models of the published shapes. Plan and what to record: bench/multi_gpu.md (not run yet).
#   source bench/device_setup.sh && bash bench/multi_gpu.sh [CACHE] [RESULTS]     # on a machine with 2 GPUs
#   ONLY="27b-fsdp" bash bench/multi_gpu.sh            # some steps only (one device call each, under 10 min)
# Steps: 4b-1gpu, 4b-ddp (4B on 1 GPU, then DDP on 2), 27b-fsdp (FSDP-QLoRA on 2), 27b-resume (sharded
# checkpoint, resume, merge), 27b-ddp (a whole 4-bit 27B per card: fits 80 GB or fails; both are results).
set -euo pipefail
cache=${1:-.cache} results=${2:-${OUT:-bench-results}/multi_gpu}
steps_4b=${STEPS_4B:-40} steps_27b=${STEPS_27B:-12}
mkdir -p "$cache" "$results"
# NVLink multicast stays off (shared hosts), also for the processes accelerate starts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
gpus=$(nvidia-smi --list-gpus | wc -l)
[ "$gpus" -ge 2 ] || { echo "needs 2 GPUs, found $gpus" >&2; exit 1; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$results/gpus.txt"

selected() { [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]; }

# Random-weight checkpoints (speed and memory are real, words are not; kept in CACHE between calls) and
# 256 synthetic rows in the seed dataset's schema.
if selected 4b-1gpu || selected 4b-ddp; then python3 -m radiology.shapes 4b "$cache/gemma3-4b"; fi
if selected 27b-fsdp || selected 27b-resume || selected 27b-ddp; then
  python3 -m radiology.shapes 27b "$cache/gemma3-27b"   # ~54 GB of bf16 weights on disk
fi
python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; \
from train_throughput import synthetic_dataset; synthetic_dataset(Path('$cache/bench-data'), rows=256)"

# accelerate's launcher as a module: the wheels carried to the GPU machine bring no console scripts.
launch="python3 -m accelerate.commands.launch"

# Samples every 0.5 s while "$@" runs: per-card peak of the driver's count (all processes, CUDA context included).
measure() {
  local name=$1; shift
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$results/$name.smi.csv" &
  local smi=$!
  local start=$SECONDS status=0
  "$@" > "$results/$name.log" 2>&1 || status=$?
  kill "$smi" 2>/dev/null || true
  python3 - "$results/$name" "$status" "$((SECONDS - start))" <<'PY'
import ast, csv, json, sys
base, status, wall = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
peaks = {}
for row in csv.reader(open(base + ".smi.csv")):
    if len(row) == 2 and row[1].strip().isdigit():
        peaks[int(row[0])] = max(peaks.get(int(row[0]), 0), int(row[1]))
final, memory = {}, {}
for line in open(base + ".log", errors="replace"):
    start = line.find("{'")
    if start < 0:
        continue
    try:
        record = ast.literal_eval(line[start:line.rindex("}") + 1])
    except (ValueError, SyntaxError):
        continue
    if "train_samples_per_second" in record:
        final = record
    if "gpu_mem_peak_gib" in record:
        memory = record
summary = {"run": base.rsplit("/", 1)[-1], "exit_status": status, "wall_s": wall,
           "peak_used_mib_per_card": peaks, "train": final,
           "rank0_torch_peak_gib": memory.get("gpu_mem_peak_gib"), "rank0_reserved_gib": memory.get("gpu_mem_reserved_gib")}
print(json.dumps(summary))
open(base + ".json", "w").write(json.dumps(summary, indent=1))
PY
}

# The same train.py flags for every run: N optimizer steps, no checkpoint, no merge (later flags override).
common() { echo --model_name_or_path "$1" --processor_name_or_path "$1" --dataset_name "$cache/bench-data" \
  --max_train_samples 256 --max_steps "$2" --logging_steps 2 --save_strategy no --report_to none --merge false \
  --overwrite_output_dir true; }
fsdp="$launch --config_file recipes/accelerate/fsdp-qlora.yaml --num_processes 2 train.py --config recipes/gemma3-27b-qlora.yaml"

if selected 4b-1gpu; then  # the single-GPU baseline: 4 samples per step
  measure 4b-1gpu env CUDA_VISIBLE_DEVICES=0 python3 train.py --config recipes/gemma3-4b-qlora.yaml \
    $(common "$cache/gemma3-4b" "$steps_4b") --output_dir "$cache/run-4b-1gpu"
fi
if selected 4b-ddp; then  # 4 samples per step on each GPU: 8 per step in all, as many steps
  measure 4b-ddp $launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 train.py \
    --config recipes/gemma3-4b-qlora.yaml $(common "$cache/gemma3-4b" "$steps_4b") --output_dir "$cache/run-4b-ddp"
fi
if selected 27b-fsdp; then  # the 27B recipe sharded; the final adapter is gathered and saved whole
  measure 27b-fsdp $fsdp $(common "$cache/gemma3-27b" "$steps_27b") --output_dir "$cache/run-27b-fsdp" ${FLAGS_27B:-}
  python3 -c "from safetensors.torch import load_file; w = load_file('$cache/run-27b-fsdp/adapter_model.safetensors'); \
print(len(w), 'adapter tensors,', sum('lora_' in k for k in w), 'of them LoRA,', sum(t.numel() for t in w.values()), 'values')" \
    | tee -a "$results/27b-fsdp.log"
fi
if selected 27b-resume; then  # a sharded checkpoint at step 3, resumed to step 6, then one merge (on CPU)
  rm -rf "$cache/run-27b-resume"
  measure 27b-fsdp-save $fsdp $(common "$cache/gemma3-27b" 3) --save_strategy steps --save_steps 3 \
    --output_dir "$cache/run-27b-resume"
  measure 27b-fsdp-resume $fsdp $(common "$cache/gemma3-27b" 6) --save_strategy steps --save_steps 3 \
    --output_dir "$cache/run-27b-resume" --resume_from_checkpoint last --merge "${MERGE_27B:-true}" --merge_device cpu
  ls -la "$cache/run-27b-resume" "$cache/run-27b-resume"/checkpoint-* | tee -a "$results/27b-fsdp-resume.log"
fi
if selected 27b-ddp; then  # a whole 4-bit 27B per card, for comparison with FSDP
  measure 27b-ddp $launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 train.py \
    --config recipes/gemma3-27b-qlora.yaml $(common "$cache/gemma3-27b" "$steps_27b") --output_dir "$cache/run-27b-ddp"
fi
cat "$results"/*.json
