"""Fine-tune Gemma 3 on radiology images with captions (QLoRA), save the adapter, merge it into bf16.

    python train.py --config recipes/gemma3-4b-qlora.yaml --output_dir runs/r1
    python train.py --config recipes/tiny-cpu.yaml --model_name_or_path /tmp/tiny --dataset_name data/ --output_dir /tmp/run
    accelerate launch --config_file recipes/accelerate/ddp.yaml train.py --config recipes/gemma3-4b-qlora.yaml --output_dir runs/r1

The adapter lands in OUTPUT_DIR, the merged model in OUTPUT_DIR/merged (or --merged_output_dir), and
with --evaluate, the merged model's scores against the base in OUTPUT_DIR/eval (or --eval_output_dir).
Every recipe value can be overridden by a flag; `python train.py --help` lists them all.
Under `accelerate launch` (several GPUs, see recipes/accelerate/) only the main process logs and prints.
"""

import logging
import sys

import torch

from radiology.config import parse_args
from radiology.distributed import is_main_process, quiet_other_processes
from radiology.training import run_training


OUT_OF_MEMORY = (
    "the GPU ran out of memory ({detail}). Lower --per_device_train_batch_size (raise "
    "--gradient_accumulation_steps to keep the samples per step), lower --max_length, or keep "
    "--activation_checkpointing on. Checkpoints already saved in --output_dir are kept: continue with "
    "--resume_from_checkpoint last."
)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (tests swap it for a capture)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    # force: an imported library (absl, through rouge-score) may already have claimed the root logger.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True,
                        handlers=[_StderrHandler()])
    quiet_other_processes()
    try:
        script_args, training_args, model_args = parse_args(argv)
        outcome = run_training(script_args, training_args, model_args)
    except torch.OutOfMemoryError as err:
        print(f"error: {OUT_OF_MEMORY.format(detail=str(err).splitlines()[0])}", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as err:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not is_main_process():
        return 0
    print(f"adapter: {outcome.adapter_dir}")
    if outcome.merged_dir is not None:
        print(f"merged model: {outcome.merged_dir}")
    if outcome.eval_dir is not None:
        print(f"evaluation: {outcome.eval_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
