"""Command-line and recipe configuration: TRL's SFTConfig and ModelConfig plus one dataclass of ours.

Precedence: the recipe defaults below < a YAML file given with ``--config`` < command-line flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, SFTConfig, TrlParser

from radiology.data import DEFAULT_INSTRUCTION
from radiology.quality import DEFAULT_NEAR_DUPLICATE_DISTANCE, QualityThresholds

__all__ = ["DEFAULT_MODEL", "RECIPE_DEFAULTS", "RadiologyArguments", "make_parser", "parse_args"]

DEFAULT_MODEL = "google/gemma-3-4b-pt"

# The well-known QLoRA recipe for Gemma 3 on radiology captions; every value can be overridden.
RECIPE_DEFAULTS: dict[str, Any] = {
    # model (ModelConfig)
    "model_name_or_path": DEFAULT_MODEL,
    "dtype": "bfloat16",
    "attn_implementation": "sdpa",  # keeps Gemma 3's bidirectional attention over image tokens
    "use_peft": True,
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "use_bnb_nested_quant": True,  # double quantisation (QLoRA paper): ~0.4 bit/param saved
    "bnb_4bit_quant_storage": "bfloat16",
    "lora_r": 16,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": ["all-linear"],
    "lora_modules_to_save": ["lm_head", "embed_tokens"],
    # training (SFTConfig)
    "output_dir": "gemma-3-radiology",
    "num_train_epochs": 1.0,
    # 4 samples per optimizer step as in the seed recipe, as one micro-batch (same effective batch).
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "train_sampling_strategy": "group_by_length",
    "dataloader_num_workers": 4,
    "dataloader_persistent_workers": True,
    "activation_checkpointing": True,
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "optim": "adamw_torch_fused",
    # Under DDP (accelerate launch): every trainable weight takes part in each step, so DDP need not
    # search the graph for unused ones after every backward (its default for a PEFT model).
    "ddp_find_unused_parameters": False,
    "learning_rate": 2e-4,  # QLoRA paper
    "max_grad_norm": 0.3,  # QLoRA paper
    "warmup_steps": 0.03,  # a float below 1 is a ratio of the total steps
    "lr_scheduler_type": "constant_with_warmup",  # plain "constant" would silently skip the warmup
    "bf16": True,
    "logging_steps": 5,
    "save_strategy": "epoch",
    "report_to": ["tensorboard"],
    "push_to_hub": False,
    "max_length": 1024,
    "remove_unused_columns": False,  # the collator needs the image and caption columns
    "dataset_kwargs": {"skip_prepare_dataset": True},
}


@dataclass
class RadiologyArguments:
    """Data, prompt and output options that TRL's configs do not cover."""

    dataset_name: str = field(
        default="unsloth/Radiology_mini",
        metadata={"help": "Hub dataset id, a local parquet/JSONL/CSV file, or a local folder (files or images)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_train_samples: int | None = field(
        default=800, metadata={"help": "Train on the first N rows of the split (the seed recipe uses 800)."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding images or image paths."})
    caption_column: str = field(default="caption", metadata={"help": "Column holding the reference caption."})
    id_column: str = field(default="image_id", metadata={"help": "Column holding an image identifier, if any."})
    context_column: str | None = field(
        default=None,
        metadata={
            "help": "Column holding optional clinical context (history or question, e.g. '58-year-old smoker, "
            "cough for 3 weeks'); it goes into the prompt after the instruction. Rows without it keep the plain prompt."
        },
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

    def __post_init__(self) -> None:
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError("--max_train_samples must be at least 1 (or omitted for the whole split)")
        if self.checkpointing_scope not in ("all", "vision", "text"):
            raise ValueError("--checkpointing_scope must be all, vision or text")
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


def make_parser() -> TrlParser:
    parser = TrlParser((RadiologyArguments, SFTConfig, ModelConfig))
    parser.set_defaults_with_config(**RECIPE_DEFAULTS)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[RadiologyArguments, SFTConfig, ModelConfig]:
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    if training_args.fp16:
        raise ValueError("fp16 is not supported for Gemma 3 (its activations overflow): use --bf16")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/gemma-3-4b-radiology)")
    return script_args, training_args, model_args
