"""Command-line and recipe configuration: one way to parse options for every command.

train.py parses RadiologyArguments (ours) with TRL's ModelConfig and SFTConfig; radiology.evaluate and
radiology.audit parse their own dataclasses. All three share DatasetArguments (radiology.data), parse
through ProjectParser and accept a YAML file with ``--config``.

Precedence: the defaults < a YAML file given with ``--config`` < command-line flags. train.py's defaults
are the recipe ``recipes/gemma3-4b-qlora.yaml`` (the one place its values are written) plus the few
settings the pipeline needs whatever the recipe (PIPELINE_DEFAULTS).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from trl import ModelConfig, SFTConfig, TrlParser

from radiology.data import DEFAULT_INSTRUCTION, DatasetArguments, refuse_control_tokens
from radiology.quality import DEFAULT_NEAR_DUPLICATE_DISTANCE, QualityThresholds
from radiology.speed import check_precision, check_speed_options

__all__ = [
    "DEFAULT_RECIPE",
    "PIPELINE_DEFAULTS",
    "ProjectParser",
    "RadiologyArguments",
    "make_parser",
    "parse_args",
    "read_recipe",
    "recipe_defaults",
]

# The well-known QLoRA recipe for Gemma 3 4B on radiology captions: train.py's defaults, every value overridable.
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "gemma3-4b-qlora.yaml"

# Not taken from the default recipe: it belongs to the recipe's model, and a run without --config may name
# another one; the processor then follows --model_name_or_path (the -it sibling of a -pt checkpoint).
_RECIPE_MODEL_SPECIFIC = ("processor_name_or_path",)

# What the pipeline needs whatever the recipe: not choices a recipe makes.
PIPELINE_DEFAULTS: dict[str, Any] = {
    "output_dir": "gemma-3-radiology",
    "push_to_hub": False,
    "remove_unused_columns": False,  # the collator needs the image and caption columns
    "dataset_kwargs": {"skip_prepare_dataset": True},  # the collator builds the batches
    # Under DDP (accelerate launch): every trainable weight takes part in each step, so DDP need not
    # search the graph for unused ones after every backward (its default for a PEFT model).
    "ddp_find_unused_parameters": False,
}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe as the mapping of option names to values that --config gives."""
    with open(path, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must hold a YAML mapping of option names to values (like recipes/*.yaml)")
    return recipe


def recipe_defaults() -> dict[str, Any]:
    """train.py's defaults: the default recipe (less its model-specific processor) and PIPELINE_DEFAULTS."""
    recipe = read_recipe(DEFAULT_RECIPE)
    recipe = {name: value for name, value in recipe.items() if name not in _RECIPE_MODEL_SPECIFIC}
    return {**recipe, **PIPELINE_DEFAULTS}


class ProjectParser(TrlParser):
    """TrlParser (dataclasses, ``--config recipe.yaml``) whose --help lists ``--config`` and the first
    dataclass's options first, then each other dataclass under its own title: train.py's own options
    come before TRL's ~190."""

    def __init__(self, groups: Sequence[tuple[str, type]], description: str | None = None):
        self._titles = {dtype: title for title, dtype in groups}
        self._config_listed = False
        # The usage line would otherwise list every flag (some 230 for train.py) before the groups.
        super().__init__(
            [dtype for _, dtype in groups], description=description, usage="%(prog)s [--config YAML] [options]"
        )

    def _add_dataclass_arguments(self, dtype: type) -> None:
        # HfArgumentParser gives a dataclass a titled group only through an _argument_group_name attribute, which
        # TRL's configs lack: their flags would share argparse's first group with ours.
        group = self.add_argument_group(self._titles[dtype])
        if not self._config_listed:
            # TrlParser reads --config itself, before argparse sees the flags: this entry is for --help.
            group.add_argument(
                "--config", metavar="YAML", default=argparse.SUPPRESS,
                help="YAML file of option values (option names as keys, like recipes/*.yaml for train.py); "
                "flags given here override it",
            )
            self._config_listed = True
        hints = get_type_hints(dtype)
        for spec in dataclasses.fields(dtype):
            if spec.init:
                spec.type = hints[spec.name]
                self._parse_dataclass_field(group, spec)


@dataclass
class RadiologyArguments(DatasetArguments):
    """train.py's own options, those TRL's configs do not cover: the dataset (DatasetArguments' fields
    first), the prompt, data filters, merging and evaluation."""

    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N rows of the split (none: all; the seed recipe: 800)."}
    )
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction shown with each image."})
    processor_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Processor (with chat template); default: the model's, or the -it sibling of a -pt model."},
    )
    min_image_side: int | None = field(
        default=None, metadata={"help": "Drop training images whose shorter side is below N pixels."}
    )
    min_sharpness: float | None = field(
        default=None,
        metadata={
            "help": "Drop blurry training images: variance of the Laplacian below this value "
            "(python -m radiology.audit shows the distribution and the blurriest images)."
        },
    )
    min_caption_words: int | None = field(
        default=None, metadata={"help": "Drop training rows whose caption has fewer than N words."}
    )
    drop_duplicates: bool = field(
        default=False,
        metadata={
            "help": "Keep only the first row of each group of identical or near-identical training images. The "
            "other filters run first: with --min_sharpness a blurred copy goes as blurry and its original stays."
        },
    )
    drop_images_in_split: list[str] | None = field(
        default=None,
        metadata={
            "help": "Drop training rows whose image is (nearly) the same as one in these splits of the dataset "
            "(e.g. test), so that evaluation stays on unseen images."
        },
    )
    near_duplicate_distance: int = field(
        default=DEFAULT_NEAR_DUPLICATE_DISTANCE,
        metadata={"help": "Bits (of a 64-bit perceptual hash) within which two images count as the same picture."},
    )
    merge: bool = field(default=True, metadata={"help": "Merge the adapter into bf16 weights after training."})
    merged_output_dir: str | None = field(
        default=None, metadata={"help": "Where to save the merged model (default: OUTPUT_DIR/merged)."}
    )
    merge_device: str = field(
        default="auto",
        metadata={"help": "Device for the bf16 merge: auto (GPU if it fits, else CPU), cpu or cuda."},
    )
    checkpointing_scope: str = field(
        default="all",
        metadata={"help": "With activation checkpointing on: which layers recompute their activations: all, "
                          "vision (the SigLIP tower, ~3/4 of the activations; the text model keeps its own) or text."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output folder that already holds a run."}
    )
    evaluate: bool = field(
        default=False,
        metadata={
            "help": "After training (and merging), score the model against its base on --eval_split and write "
            "metrics.json, predictions.jsonl and report.html (see python -m radiology.evaluate)."
        },
    )
    eval_split: str = field(
        default="test",
        metadata={"help": "Held-out split for --evaluate and for the loss that --eval_strategy steps|epoch logs."},
    )
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N rows of --eval_split (default: all)."}
    )
    eval_output_dir: str | None = field(
        default=None, metadata={"help": "Where to write the evaluation (default: OUTPUT_DIR/eval)."}
    )
    eval_baseline: str | None = field(
        default=None, metadata={"help": "Model to compare against (default: --model_name_or_path, the base)."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Images per generate call during evaluation."})
    eval_max_new_tokens: int = field(
        default=128, metadata={"help": "Longest generated caption, in tokens, during evaluation (greedy decoding)."}
    )
    # Training speed (radiology.speed): each off by default until measured (bench/train_throughput.notes.md).
    checkpointing_layers: str = field(
        default="all",
        metadata={"help": "With activation checkpointing on: all (every layer --checkpointing_scope names), "
                          "vision=N,text=M (only the first N vision and M text layers recompute; the others keep their "
                          "activations), or auto (as many layers keep their activations as --checkpointing_budget_gib "
                          "leaves room for, measured on the first step; text layers first, auto:vision: vision first)."},
    )
    checkpointing_budget_gib: float | None = field(
        default=None,
        metadata={"help": "Peak GPU memory (GiB, as torch counts it) that --checkpointing_layers auto plans for "
                          "(default: 90%% of the card)."},
    )
    pure_bf16: bool = field(
        default=False,
        metadata={"help": "Train the bf16 model without autocast: activations stay bf16 through every LoRA and 4-bit "
                          "layer (no fp32 copies); norms and the loss still accumulate in fp32. Needs --dtype bfloat16."},
    )
    compile_blocks: str = field(
        default="none",
        metadata={"help": "torch.compile each layer's forward: none, vision (the SigLIP encoder layers), text (the "
                          "decoder layers) or all. The first steps take longer while it compiles."},
    )
    compile_blocks_backend: str = field(
        default="inductor",
        metadata={"help": "torch.compile backend for --compile_blocks (aot_eager: checks tracing without generating "
                          "kernels)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_control_tokens(self.instruction, "--instruction")
        self.note_unused_instruction(self.instruction)
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError("--max_train_samples must be at least 1 (or omitted for the whole split)")
        if self.checkpointing_scope not in ("all", "vision", "text"):
            raise ValueError("--checkpointing_scope must be all, vision or text")
        check_speed_options(self)
        if self.merge_device not in ("auto", "cpu", "cuda"):
            raise ValueError("--merge_device must be auto, cpu or cuda")
        if self.eval_max_samples is not None and self.eval_max_samples < 1:
            raise ValueError("--eval_max_samples must be at least 1 (or omitted for the whole split)")
        if self.eval_batch_size < 1:
            raise ValueError("--eval_batch_size must be at least 1")
        if self.eval_max_new_tokens < 1:
            raise ValueError("--eval_max_new_tokens must be at least 1")
        self.quality_thresholds()  # fails here, before any loading, on an impossible limit
        if self.dataset_train_split in (self.drop_images_in_split or []):
            raise ValueError(
                f"--drop_images_in_split names the training split {self.dataset_train_split!r} itself; "
                "name the held-out split(s), e.g. test"
            )

    def quality_thresholds(self) -> QualityThresholds:
        """The data quality limits given on the command line (all off by default)."""
        return QualityThresholds(
            min_image_side=self.min_image_side,
            min_sharpness=self.min_sharpness,
            min_caption_words=self.min_caption_words,
            near_duplicate_distance=self.near_duplicate_distance,
        )


def make_parser() -> ProjectParser:
    """train.py's parser: our options first, then TRL's model and training configs; the default recipe's values."""
    parser = ProjectParser(
        [
            ("radiology-gemma: dataset, prompt, data filters, merge, evaluation", RadiologyArguments),
            ("model, quantisation and LoRA (TRL ModelConfig)", ModelConfig),
            ("training (TRL SFTConfig, transformers TrainingArguments)", SFTConfig),
        ],
        description="Fine-tune Gemma 3 on radiology images with captions (QLoRA), save the adapter, merge it. "
        f"Defaults: {DEFAULT_RECIPE.relative_to(DEFAULT_RECIPE.parent.parent)}; a YAML file given with --config "
        "overrides them, and flags override both.",
    )
    unknown = parser.set_defaults_with_config(**recipe_defaults())
    if unknown:
        raise ValueError(f"{DEFAULT_RECIPE} names options train.py does not have: {' '.join(unknown[::2])}")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[RadiologyArguments, SFTConfig, ModelConfig]:
    script_args, model_args, training_args = make_parser().parse_args_and_config(args=argv)
    if training_args.fp16:
        raise ValueError("fp16 is not supported for Gemma 3 (its activations overflow): use --bf16")
    check_precision(script_args, model_args)
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/gemma-3-4b-radiology)")
    return script_args, training_args, model_args
