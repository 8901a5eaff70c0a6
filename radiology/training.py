"""Training stage: SFTTrainer set-up, output-folder safety, resume, adapter save, merge, evaluation.

    python train.py --config recipes/gemma3-4b-qlora.yaml --output_dir runs/r1
    python train.py --config recipes/gemma3-4b-qlora.yaml --output_dir runs/r1 --evaluate
    accelerate launch --config_file recipes/accelerate/ddp.yaml train.py --config recipes/gemma3-4b-qlora.yaml --output_dir runs/r1

Under ``accelerate launch`` every process trains and takes part in saving the adapter (a collective
step under FSDP); then the main process alone merges and evaluates, while the others finish.
"""

from __future__ import annotations

import gc
import json
import logging
import re
import shlex
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from safetensors import SafetensorError, safe_open
from transformers.trainer import TRAINER_STATE_NAME
from trl import ModelConfig, SFTConfig, SFTTrainer

from radiology.collate import CaptionCollator
from radiology.config import RadiologyArguments
from radiology.data import DatasetArguments, DatasetError, PreparedDataset, is_single_file
from radiology.distributed import (
    check_fsdp_checkpointing,
    check_fsdp_model,
    check_single_process_gpus,
    world_size,
)
from radiology.evaluate import EvalArguments, EvalConfig, EvaluationError, check_eval_output_dir, run_evaluation
from radiology.generate import GenerationSettings
from radiology.memory import GpuMemoryCallback
from radiology.merge import merge_adapter
from radiology.modeling import (
    check_bf16_support,
    check_vision_language_model,
    load_processor,
    load_training_model,
    lora_config,
)
from radiology.quality import MeasuredImages, filter_training_rows, measure_images
from radiology.speed import LayerCheckpointing, apply_speed_options, configure_precision

__all__ = [
    "CheckpointError",
    "OutputFolderError",
    "TrainingOutcome",
    "build_trainer",
    "check_evaluation_setup",
    "check_output_dir",
    "checkpoint_problem",
    "check_saved_adapter",
    "evaluation_config",
    "load_eval_data",
    "resolve_resume",
    "run_training",
    "save_adapter",
]

logger = logging.getLogger(__name__)

_RESUME_LAST = {"true", "last", "latest", "yes", "1"}
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")  # the Trainer's checkpoint folder names


class OutputFolderError(FileExistsError):
    """An output folder that already holds work the command would overwrite."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names an older one that can."""


@dataclass
class TrainingOutcome:
    adapter_dir: Path
    merged_dir: Path | None
    train_loss: float | None
    global_step: int
    rows: int
    eval_dir: Path | None = None


def _model_files(folder: Path) -> list[str]:
    """The files that make a folder a model (merged or full weights, or an adapter)."""
    return sorted(
        p.name for p in folder.iterdir()
        if p.name in ("config.json", "adapter_config.json") or p.name.endswith(".safetensors")
    )


def _checkpoint_folders(folder: Path) -> list[Path]:
    """The checkpoint-N folders in a run folder, newest (highest step) first."""
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_CHECKPOINT.fullmatch(p.name).group(1)), reverse=True)


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """Never clobber earlier work by accident. A folder that holds a run's checkpoints, or a model (config.json,
    *.safetensors, an adapter: a merged model, say), needs --overwrite_output_dir. --resume_from_checkpoint
    continues a run in its own folder, the one holding its checkpoint-* folders, never in a model's folder."""
    folder = Path(output_dir)
    if overwrite or not folder.is_dir():
        return
    checkpoints = [p.name for p in _checkpoint_folders(folder)]
    if checkpoints and resume:
        return  # continuing the run that lives here
    if checkpoints:
        raise OutputFolderError(
            f"{folder} already holds a training run ({', '.join(checkpoints[:3])}). Continue it with "
            "--resume_from_checkpoint last, pick another --output_dir, or pass --overwrite_output_dir."
        )
    models = _model_files(folder)
    if models:
        raise OutputFolderError(
            f"{folder} already holds a model ({', '.join(models[:4])}), a merged model or an adapter: training there "
            "would write a new adapter, checkpoints and merged/ into it, and loading the folder would then apply the "
            "new adapter. Pick another --output_dir (a new folder such as runs/r2), or pass --overwrite_output_dir to "
            "replace what is there."
            + (" --resume_from_checkpoint continues a run only in its own folder, the one holding its checkpoint-* "
               "folders." if resume else "")
        )


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What makes a checkpoint folder unusable for resuming (a file missing, cut short or damaged), or None.
    Reads headers and file ends only: cheap even for checkpoints of several GB."""
    state = checkpoint / TRAINER_STATE_NAME
    if not state.is_file():
        return f"{TRAINER_STATE_NAME} is missing (the save was probably interrupted)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE_NAME} is not readable JSON ({err})"
    weights = sorted(checkpoint.glob("*.safetensors"))
    # FSDP's sharded checkpoints keep the weights in pytorch_model_fsdp_N/ folders of .distcp files.
    sharded = [p for p in checkpoint.glob("pytorch_model_fsdp*") if p.is_dir()]
    if not weights and not sharded:
        return "it holds no weights (no adapter_model.safetensors or model.safetensors)"
    for path in weights:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{path.name} is cut short or damaged ({err})"
    # torch.save writes zip archives; a file cut short has lost the directory at its end.
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth"), *checkpoint.glob("*.bin")]):
        if not zipfile.is_zipfile(path):
            return f"{path.name} is cut short or damaged (not a complete torch.save file)"
    return None


def _check_checkpoint(checkpoint: Path, flag_value: str) -> None:
    """Stop, before any model loads, on a checkpoint that cannot be resumed from; name an older one that can."""
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        return
    message = f"--resume_from_checkpoint {flag_value}: cannot resume from {checkpoint}: {problem}."
    match = _CHECKPOINT.fullmatch(checkpoint.name)
    older = [
        p for p in _checkpoint_folders(checkpoint.parent)
        if match and int(_CHECKPOINT.fullmatch(p.name).group(1)) < int(match.group(1))
    ]
    usable = next((p for p in older if checkpoint_problem(p) is None), None)
    if usable is not None:
        message += (
            f" The newest usable checkpoint before it is {usable}: continue from it with "
            f"--resume_from_checkpoint {usable} (the steps after it are trained again)."
        )
    else:
        message += (
            f" No older usable checkpoint is in {checkpoint.parent}: start again in a new --output_dir, or in this one "
            "with --overwrite_output_dir."
        )
    raise CheckpointError(message)


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """``last``/``true`` -> the newest checkpoint in output_dir; a path -> that path. Either is checked
    (files present, none cut short) before any model loads."""
    if resume is None or str(resume).lower() in ("", "false", "none", "no", "0"):
        return None
    if str(resume).lower() in _RESUME_LAST:
        newest = _checkpoint_folders(Path(output_dir))
        if not newest:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume}: no checkpoint-* folder in {output_dir} to resume from"
            )
        checkpoint = newest[0]
    else:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    _check_checkpoint(checkpoint, str(resume))
    return str(checkpoint)


def resumed_step(checkpoint: str) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json's global_step)."""
    state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    return int(state.get("global_step", 0))


def _prepare_split(
    script_args: RadiologyArguments, training_args: SFTConfig, split: str, max_samples: int | None
) -> PreparedDataset:
    """One split of --dataset_name under the canonical columns, bad rows dropped. Call it inside
    main_process_first: one process validates and caches, the others reuse the cache."""
    return script_args.prepare(script_args.load(split), max_samples, training_args.dataset_num_proc)


def load_training_data(script_args: RadiologyArguments, training_args: SFTConfig) -> PreparedDataset:
    with PartialState().main_process_first():
        prepared = _prepare_split(
            script_args, training_args, script_args.dataset_train_split, script_args.max_train_samples
        )
        thresholds = script_args.quality_thresholds()
        if thresholds.filters_rows or script_args.drop_duplicates or script_args.drop_images_in_split:
            prepared = filter_training_rows(
                prepared,
                thresholds,
                drop_duplicates=script_args.drop_duplicates,
                held_out=_held_out_images(script_args, training_args.dataset_num_proc),
                num_proc=training_args.dataset_num_proc,
            )
    return prepared


def _eval_strategy(training_args: SFTConfig) -> str:
    """--eval_strategy as given (no, steps, epoch): TrainingArguments turns it into an enum."""
    return str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))


def load_eval_data(script_args: RadiologyArguments, training_args: SFTConfig) -> Dataset | None:
    """The held-out rows (--eval_split, first --eval_max_samples) whose loss the trainer logs as eval_loss.

    Under several processes each one scores its share and the trainer gathers the losses, dropping the
    rows repeated to even out the shares, so the figure is the one a single process would report."""
    if _eval_strategy(training_args) == "no":
        return None
    _require_several_splits(script_args, f"--eval_strategy {_eval_strategy(training_args)}")
    with PartialState().main_process_first():
        prepared = _prepare_split(script_args, training_args, script_args.eval_split, script_args.eval_max_samples)
    # Only the loss is wanted: without this the trainer would keep every batch's logits (262k per token).
    training_args.prediction_loss_only = True
    return prepared.dataset


def _require_several_splits(script_args: RadiologyArguments, flag: str) -> None:
    """A held-out split must not be the training rows themselves, which a single file would give."""
    if is_single_file(script_args.dataset_name):
        raise DatasetError(
            f"{flag} needs a dataset with several splits; {script_args.dataset_name} is a single file: it holds "
            "one split, the training rows. Give a folder with one file per split (train.parquet, test.parquet) or a "
            "hub id."
        )


def _held_out_images(script_args: RadiologyArguments, num_proc: int | None) -> dict[str, MeasuredImages]:
    """Measured images of the splits named by --drop_images_in_split (every row of each)."""
    if not script_args.drop_images_in_split:
        return {}
    _require_several_splits(script_args, "--drop_images_in_split")
    splits = script_args.load_splits(script_args.drop_images_in_split)
    options = script_args.image_options()
    return {name: measure_images(script_args.canonical(split), options, num_proc) for name, split in splits.items()}


def build_trainer(
    script_args: RadiologyArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    prepared: PreparedDataset,
    eval_dataset: Dataset | None = None,
) -> SFTTrainer:
    processor = load_processor(model_args.model_name_or_path, script_args.processor_name_or_path)
    collator = CaptionCollator(
        processor, script_args.instruction, max_length=training_args.max_length, images=prepared.options
    )
    # Before the model loads: the largest row's image blocks must leave room for its caption.
    collator.check_max_length(prepared.dataset, *([eval_dataset] if eval_dataset is not None else []))
    model = load_training_model(model_args)
    configure_precision(script_args, training_args, model_args)  # --pure_bf16: before the accelerator is made
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=prepared.dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        peft_config=lora_config(model_args) if model_args.use_peft else None,
        callbacks=[LayerCheckpointing.from_args(script_args)],
    )
    apply_speed_options(trainer, script_args)  # --pure_bf16, --compile_blocks (radiology.speed)
    # First in line: the reporting callbacks (TensorBoard, console) read the same logs dict after it.
    trainer.callback_handler.callbacks.insert(0, GpuMemoryCallback())
    return trainer


def _eval_output_dir(script_args: RadiologyArguments, training_args: SFTConfig) -> Path:
    return Path(script_args.eval_output_dir or Path(training_args.output_dir) / "eval")


def check_evaluation_setup(script_args: RadiologyArguments, training_args: SFTConfig) -> None:
    """With --evaluate, fail before training (not hours later) on a missing or empty split or a used folder."""
    _require_several_splits(script_args, "--evaluate")
    split = script_args.load(script_args.eval_split)
    if len(split) == 0:
        raise DatasetError(
            f"--eval_split {script_args.eval_split!r} of {script_args.dataset_name} is empty: there is nothing "
            "to evaluate; choose another split or drop --evaluate"
        )
    check_eval_output_dir(_eval_output_dir(script_args, training_args), script_args.overwrite_output_dir)


def evaluation_config(
    script_args: RadiologyArguments, training_args: SFTConfig, model_args: ModelConfig, outcome: TrainingOutcome
) -> EvalConfig:
    """The evaluation of a finished run: the merged model (else base + adapter) against the base, in bf16."""
    model, adapter = str(outcome.adapter_dir), None
    if outcome.merged_dir is not None:
        model = str(outcome.merged_dir)
    elif model_args.use_peft:
        model, adapter = model_args.model_name_or_path, str(outcome.adapter_dir)
    return EvalConfig(
        args=EvalArguments(
            model=model,
            adapter=adapter,
            baseline=script_args.eval_baseline or model_args.model_name_or_path,
            output_dir=str(_eval_output_dir(script_args, training_args)),
            processor_name_or_path=script_args.processor_name_or_path,
            split=script_args.eval_split,
            max_samples=script_args.eval_max_samples,
            batch_size=script_args.eval_batch_size,
            overwrite_output_dir=script_args.overwrite_output_dir,
        ),
        data=DatasetArguments.of(script_args),  # the columns the model was trained with, context included
        settings=GenerationSettings(max_new_tokens=script_args.eval_max_new_tokens, seed=training_args.seed),
        instruction=script_args.instruction,
    )


def _rerun_command(config: EvalConfig) -> str:
    args = config.args
    parts = ["python -m radiology.evaluate", "--model", args.model]
    if args.adapter:
        parts += ["--adapter", args.adapter]
    if args.baseline:
        parts += ["--baseline", args.baseline]
    if args.processor_name_or_path:
        parts += ["--processor_name_or_path", args.processor_name_or_path]
    parts += [*config.data.flags(), "--split", config.split, "--output_dir", args.output_dir]
    return " ".join(shlex.quote(p) if i else p for i, p in enumerate(parts))


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_adapter(trainer: SFTTrainer, output_dir: str) -> None:
    """Save the adapter and processor in output_dir. Every process must call it: under FSDP the weights
    are gathered from all of them (the main process alone writes)."""
    if trainer.is_fsdp_enabled:
        # Checkpoints stay sharded (one file per process, fast to resume); the adapter that from_pretrained
        # loads needs the full state dict. With a sharded type, save_model would write no weights at all.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(output_dir)
    if trainer.args.should_save:
        check_saved_adapter(Path(output_dir))


def check_saved_adapter(output_dir: Path) -> None:
    """A saved adapter without LoRA weights loads without complaint and changes nothing: stop at once."""
    adapter = output_dir / "adapter_model.safetensors"
    if not adapter.exists():
        return  # no PEFT (--use_peft false): the full model was saved
    with safe_open(str(adapter), framework="pt") as saved:
        if not any("lora_" in key for key in saved.keys()):
            raise RuntimeError(
                f"{adapter} holds no LoRA weights (only {', '.join(sorted(saved.keys())[:4])}); the trained "
                "adapter was lost while saving. Any checkpoint-* folder in the output folder still holds the training "
                "state (--resume_from_checkpoint last); please report this with your launch command."
            )


def run_training(
    script_args: RadiologyArguments, training_args: SFTConfig, model_args: ModelConfig
) -> TrainingOutcome:
    """Fine-tune, save the adapter (and processor) in output_dir, then merge into bf16 weights."""
    check_single_process_gpus(training_args.n_gpu)  # several GPUs need accelerate launch, not one process
    check_fsdp_model(model_args)
    check_fsdp_checkpointing()
    check_bf16_support()
    # A text-only checkpoint (no vision tower) is refused from its config, before any data or weights load.
    check_vision_language_model(model_args.model_name_or_path, model_args.model_revision)
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    check_output_dir(training_args.output_dir, resume, script_args.overwrite_output_dir)
    merged_dir = Path(script_args.merged_output_dir or Path(training_args.output_dir) / "merged")
    if script_args.merge and merged_dir.exists() and any(merged_dir.iterdir()) and not script_args.overwrite_output_dir:
        raise OutputFolderError(
            f"{merged_dir} already holds a merged model; pick another --merged_output_dir or pass --overwrite_output_dir"
        )

    if script_args.evaluate:
        check_evaluation_setup(script_args, training_args)

    prepared = load_training_data(script_args, training_args)
    eval_dataset = load_eval_data(script_args, training_args)
    if world_size() > 1:
        logger.info("Training on %d processes (%s)", world_size(), PartialState().distributed_type.value)
    trainer = build_trainer(script_args, training_args, model_args, prepared, eval_dataset)
    if resume is not None:
        logger.info("Resuming from %s (saved at step %d)", resume, resumed_step(resume))
    result = trainer.train(resume_from_checkpoint=resume)
    save_adapter(trainer, training_args.output_dir)  # adapter + processor (with chat template)
    state = PartialState()
    outcome = TrainingOutcome(
        adapter_dir=Path(training_args.output_dir),
        merged_dir=None,
        train_loss=result.training_loss,
        global_step=result.global_step,
        rows=len(prepared.dataset),
    )
    if training_args.push_to_hub:
        trainer.push_to_hub()  # every process: it saves (collective under FSDP); the main one uploads
    processor = trainer.processing_class
    del trainer  # free the training model before the merge loads the bf16 one
    _release_memory()
    state.wait_for_everyone()
    # The last collective step. From here on the main process works alone: a long merge or evaluation
    # cannot run into the communication timeout of a barrier, and the other processes finish.
    if not state.is_main_process:
        return outcome
    if script_args.merge and model_args.use_peft:
        outcome.merged_dir = merge_adapter(
            base_model=model_args.model_name_or_path,
            adapter_dir=training_args.output_dir,
            output_dir=merged_dir,
            processor=processor,
            overwrite=script_args.overwrite_output_dir,
            device=script_args.merge_device,
            revision=model_args.model_revision,
        )
    if script_args.evaluate:
        config = evaluation_config(script_args, training_args, model_args, outcome)
        try:
            outcome.eval_dir = run_evaluation(config).output_dir
        except (ValueError, OSError, EvaluationError) as err:
            raise EvaluationError(
                f"training finished (adapter in {outcome.adapter_dir}"
                + (f", merged model in {outcome.merged_dir}" if outcome.merged_dir else "")
                + f") but the evaluation failed: {err}. Rerun it with: {_rerun_command(config)}"
            ) from err
    return outcome
