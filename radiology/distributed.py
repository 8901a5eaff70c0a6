"""Several GPUs: what `accelerate launch` set up for this process, and the checks made before loading.

    accelerate launch --config_file recipes/accelerate/ddp.yaml train.py --config recipes/gemma3-4b-qlora.yaml --output_dir runs/r1
    accelerate launch --config_file recipes/accelerate/fsdp-qlora.yaml train.py --config recipes/gemma3-27b-qlora.yaml --output_dir runs/r27

DDP keeps a whole 4-bit model on every GPU and averages the gradients: for models that fit one card.
FSDP shards the model (the packed 4-bit weights included, which the bf16 quant storage makes possible)
across the GPUs: for models that do not. The launcher tells each process its place through environment
variables (RANK, LOCAL_RANK, WORLD_SIZE, and ACCELERATE_USE_FSDP/FSDP_* from the config file), which are
read here without starting any communication, so that they can steer logging and loading.
"""

from __future__ import annotations

import logging
import os

from trl import ModelConfig

__all__ = [
    "LaunchError",
    "check_fsdp_checkpointing",
    "check_fsdp_model",
    "check_single_process_gpus",
    "fsdp_activation_checkpointing",
    "fsdp_enabled",
    "is_main_process",
    "local_rank",
    "quiet_other_processes",
    "world_size",
]

logger = logging.getLogger(__name__)

DDP_CONFIG = "recipes/accelerate/ddp.yaml"
FSDP_CONFIG = "recipes/accelerate/fsdp-qlora.yaml"


class LaunchError(RuntimeError):
    """Training launched in a way that cannot work; the message says how to launch it instead."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def local_rank() -> int:
    """This process's index among the processes of its machine (its GPU under DDP); 0 without a launcher."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """How many processes train together, over all machines; 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """The process of global rank 0: the one that logs, merges and evaluates."""
    return int(os.environ.get("RANK", "0")) == 0


def fsdp_enabled() -> bool:
    """Launched with an FSDP accelerate config (accelerate launch sets ACCELERATE_USE_FSDP)."""
    return _flag("ACCELERATE_USE_FSDP")


def fsdp_activation_checkpointing() -> bool:
    """The FSDP config asks FSDP itself to recompute activations (fsdp_activation_checkpointing)."""
    return fsdp_enabled() and _flag("FSDP_ACTIVATION_CHECKPOINTING")


def quiet_other_processes() -> None:
    """Leave the log to the main process: the others report warnings and errors only, without progress bars."""
    if is_main_process():
        return
    logging.getLogger().setLevel(logging.WARNING)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_warning()
    datasets.utils.logging.disable_progress_bar()


def check_single_process_gpus(n_gpu: int) -> None:
    """Several GPUs seen by one plain process: the trainer would need nn.DataParallel, which it refuses."""
    if n_gpu <= 1:
        return
    raise LaunchError(
        f"{n_gpu} GPUs are visible to this single process, and training does not run on several GPUs from one "
        "process (the trainer refuses nn.DataParallel). Train on all of them, one process per GPU: "
        f"accelerate launch --config_file {DDP_CONFIG} --num_processes {n_gpu} train.py ... "
        f"(or --config_file {FSDP_CONFIG} for a model that does not fit one card); or train on one of them: "
        "CUDA_VISIBLE_DEVICES=0 python train.py ..."
    )


def check_fsdp_model(model_args: ModelConfig) -> None:
    """Under FSDP, refuse model settings it cannot shard, before minutes of loading."""
    if not fsdp_enabled():
        return
    if model_args.load_in_8bit:
        raise LaunchError(
            "FSDP cannot shard 8-bit bitsandbytes weights. Use --load_in_4bit true with --bnb_4bit_quant_storage "
            f"bfloat16 (the recipes do), or launch with --config_file {DDP_CONFIG} if the 8-bit model fits one GPU."
        )
    if not model_args.load_in_4bit:
        return
    storage = model_args.bnb_4bit_quant_storage or "bfloat16"  # radiology.modeling.bnb_config's default
    if model_args.dtype != storage:
        raise LaunchError(
            f"FSDP with 4-bit weights needs the packed weights stored in the model's dtype, so that every "
            f"shard holds one dtype: got --dtype {model_args.dtype} and --bnb_4bit_quant_storage {storage}. "
            "Pass --dtype bfloat16 --bnb_4bit_quant_storage bfloat16 (the recipes' values)."
        )


def check_fsdp_checkpointing() -> None:
    """Refuse FSDP's own activation checkpointing (fsdp_activation_checkpointing: true), before loading.

    It wraps every layer in torch's checkpoint wrapper, which renames the modules
    (`layers.0._checkpoint_wrapped_module.mlp`); PEFT finds the LoRA weights by module name and then saves an
    adapter holding only the head/embedding, silently (seen on 2 GPUs with the 27B recipe). The trainer's
    activation checkpointing, on in every recipe, recomputes the same layers without renaming them."""
    if fsdp_activation_checkpointing():
        raise LaunchError(
            "The accelerate config sets fsdp_activation_checkpointing: true, with which the saved adapter loses "
            "its LoRA weights (FSDP's checkpoint wrapper renames the layers PEFT looks for). Set "
            f"fsdp_activation_checkpointing: false (as {FSDP_CONFIG} does): the recipe's activation_checkpointing "
            "recomputes the same layers."
        )
