"""Modeling stage: quantisation and LoRA configs, model and processor loading.

The recipe's choices, with their reasons:
- 4-bit NF4 with double quantisation and bf16 compute (QLoRA paper); bf16 *storage* of the packed
  weights so that FSDP can shard them alongside the bf16 LoRA weights.
- LoRA on every linear layer, the vision tower's included; ``lm_head`` and ``embed_tokens`` trained
  in full with their tie kept (``ensure_weight_tying``), so there is one trained copy of the
  262k x hidden matrix, not two that drift apart and get dropped at merge.
- Only vision-language checkpoints: a text-only one (google/medgemma-27b-text-it, any
  ``Gemma3ForCausalLM``) is refused from its config, before a single weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import LoraConfig
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from trl import ModelConfig

from radiology.distributed import fsdp_enabled, local_rank

__all__ = [
    "HardwareError",
    "ModelCheckError",
    "ModelConfigError",
    "TextOnlyModelError",
    "bnb_config",
    "check_bf16_support",
    "check_vision_language_model",
    "device_map_for_process",
    "lora_config",
    "load_processor",
    "load_training_model",
    "processor_id_for",
    "torch_dtype",
]

logger = logging.getLogger(__name__)


class HardwareError(RuntimeError):
    """The machine cannot run what was asked; the message says what to use instead."""


class ModelCheckError(ValueError):
    """The model asked for cannot be used; the message says why and what to pass instead."""


class TextOnlyModelError(ModelCheckError):
    """A checkpoint without a vision tower (e.g. google/medgemma-27b-text-it): it cannot read images."""


class ModelConfigError(ModelCheckError):
    """A model whose configuration cannot be read: wrong name or folder, gated without access, offline."""


MULTIMODAL_CHECKPOINTS = "google/medgemma-4b-it or google/medgemma-27b-it (or google/gemma-3-4b-it)"


def torch_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


def check_bf16_support() -> None:
    """Refuse GPUs without bfloat16: fp16 overflows in Gemma 3 (loss 0 or NaN). CPU is allowed."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(0)
        raise HardwareError(
            f"{name} does not support bfloat16, which Gemma 3 needs (fp16 gives NaN/zero loss). "
            "Use an Ampere or newer GPU (A10G, L4, A100, H100) or a bf16-capable Space hardware tier."
        )


def processor_id_for(model_name_or_path: str, processor_name_or_path: str | None = None) -> str:
    """Where to load the processor from: explicit choice, else the model itself, except that a
    ``-pt`` hub checkpoint (no chat template) takes the processor of its ``-it`` sibling."""
    if processor_name_or_path:
        return processor_name_or_path
    if not Path(model_name_or_path).exists() and model_name_or_path.endswith("-pt"):
        return model_name_or_path[: -len("-pt")] + "-it"
    return model_name_or_path


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the errors it was raised from (transformers wraps the hub's typed errors in OSError)."""
    current: BaseException | None = err
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _unreadable(what: str, name: str, revision: str | None, err: Exception) -> ModelConfigError:
    """Why ``name`` could not be read, and the fix, from the hub or filesystem error behind ``err``."""
    causes = list(_causes(err))
    folder = Path(name).expanduser()
    if folder.is_dir():
        if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
            reason = ("the folder holds a LoRA adapter, not a model: pass the base model (or the merged folder "
                      "that training writes) instead, and the adapter where an adapter is asked for")
        elif what == "processor":
            reason = (f"the folder has no usable processor ({str(err).splitlines()[0][:160]}). Save the processor "
                      "there (processor_config.json, preprocessor_config.json, tokenizer files), or pass "
                      "--processor_name_or_path with the processor of the instruction-tuned model, e.g. "
                      "google/medgemma-4b-it")
        elif not (folder / "config.json").exists():
            reason = "the folder has no config.json: give the folder of a saved model (config.json and its weights)"
        else:
            reason = f"{str(err).splitlines()[0]}: re-save or re-download the model into that folder"
    elif any(isinstance(c, HFValidationError) for c in causes):
        reason = "there is no such folder, and it is not a hub model id (owner/name) either: check the path or the name"
    elif any(isinstance(c, GatedRepoError) for c in causes):
        reason = (f"it is gated and this account has no access to it. Accept its licence on "
                  f"https://huggingface.co/{name} (for MedGemma: the Health AI Developer Foundations terms) while "
                  "logged in, then set HF_TOKEN to a token of that account (or run `hf auth login`); or pass a "
                  "local folder that holds the model")
    elif any(isinstance(c, RevisionNotFoundError) for c in causes):
        reason = f"it has no revision {revision!r}: check --model_revision (a branch, tag or commit)"
    elif any(isinstance(c, RepositoryNotFoundError) for c in causes):
        reason = ("it is not a model on the hub, or it is private or gated and no token with access was given: "
                  f"check the name; for a gated model (MedGemma, Gemma) accept its licence on "
                  f"https://huggingface.co/{name} and set HF_TOKEN; or pass a local folder")
    elif any(isinstance(c, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)) for c in causes):
        reason = ("it is not in the local Hugging Face cache and the hub cannot be reached (offline, or "
                  f"HF_HUB_OFFLINE=1): download it once with network access (`hf download {name}`, with HF_TOKEN "
                  "set for a gated model), or pass a local folder that holds the model")
    else:
        reason = (f"{str(err).splitlines()[0]}. Check the name or folder; for a gated model accept its licence "
                  "on the hub and set HF_TOKEN; offline, pass a local folder")
    return ModelConfigError(f"cannot read the {what} of {name}: {reason}")


def _describe(config: PretrainedConfig) -> str:
    architectures = ", ".join(getattr(config, "architectures", None) or [])
    return f"model_type {config.model_type}" + (f", {architectures}" if architectures else "")


def _text_only(name: str, detail: str) -> TextOnlyModelError:
    return TextOnlyModelError(
        f"{name} is a text-only model ({detail}): it has no vision tower, so it cannot read images. "
        f"Use a multimodal checkpoint such as {MULTIMODAL_CHECKPOINTS}"
    )


def check_vision_language_model(model_name_or_path: str, revision: str | None = None) -> PretrainedConfig:
    """The model's configuration, read without loading any weights, if it is a vision-language model.

    Raises TextOnlyModelError for a checkpoint without a vision tower (google/medgemma-27b-text-it,
    any ``Gemma3ForCausalLM`` / model_type ``gemma3_text``), and ModelConfigError, naming the cause
    and the fix, when the configuration cannot be read (wrong name or folder, gated without an
    accepted licence or HF_TOKEN, offline without a cached copy). Both are ValueErrors.
    """
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, revision=revision)
    except (OSError, ValueError) as err:
        raise _unreadable("configuration", model_name_or_path, revision, err) from err
    # A vision-language config carries its vision tower's settings; a text-only one has none.
    if getattr(config, "vision_config", None) is None:
        raise _text_only(model_name_or_path, _describe(config))
    return config


def _processor_without_images(source: str, processor: object) -> TextOnlyModelError:
    """AutoProcessor falls back to the bare tokenizer for a text-only checkpoint (a multimodal one
    without its processor files fails to load instead)."""
    try:
        detail = _describe(AutoConfig.from_pretrained(source))
    except (OSError, ValueError):
        detail = f"its processor is a bare {type(processor).__name__}"
    return _text_only(source, detail)


def load_processor(model_name_or_path: str, processor_name_or_path: str | None = None) -> ProcessorMixin:
    source = processor_id_for(model_name_or_path, processor_name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise _unreadable("processor", source, None, err) from err
    if getattr(processor, "image_processor", None) is None:
        raise _processor_without_images(source, processor)
    if processor.chat_template is None:
        raise ValueError(
            f"the processor from {source} has no chat template; pass --processor_name_or_path with the "
            "instruction-tuned model (e.g. google/gemma-3-4b-it)"
        )
    return processor


def bnb_config(model_args: ModelConfig) -> BitsAndBytesConfig | None:
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not model_args.load_in_4bit:
        return None
    storage = model_args.bnb_4bit_quant_storage or "bfloat16"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=getattr(torch, storage),
    )


def lora_config(model_args: ModelConfig) -> LoraConfig:
    modules_to_save = model_args.lora_modules_to_save
    tied = bool(modules_to_save) and {"lm_head", "embed_tokens"} <= set(modules_to_save)
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        modules_to_save=list(modules_to_save) if modules_to_save else None,  # PEFT edits the list it gets
        task_type=model_args.lora_task_type,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        bias="none",
        # Gemma ties lm_head to embed_tokens: train one shared copy, which merge keeps.
        ensure_weight_tying=tied,
    )


def device_map_for_process() -> dict[str, int | str] | None:
    """Where this process loads the model: the whole of it on its own GPU, the one of its local rank (one
    process, or DDP); None on the CPU, and under FSDP, which places and shards the weights itself (the
    PEFT and accelerate FSDP + QLoRA guides load without a device map)."""
    if not torch.cuda.is_available() or fsdp_enabled():
        return None
    return {"": local_rank()}


def load_training_model(model_args: ModelConfig) -> PreTrainedModel:
    check_vision_language_model(model_args.model_name_or_path, model_args.model_revision)
    quantization = bnb_config(model_args)
    if quantization is not None and not torch.cuda.is_available():
        logger.info("Loading %s in 4-bit on the CPU (slow; for tests and checks)", model_args.model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=torch_dtype(model_args.dtype),
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization,
        device_map=device_map_for_process(),
    )
    # No KV cache in training: it is useless there, and FSDP's activation checkpointing (unlike the
    # trainer's) does not turn it off, so a recomputed layer would append to it a second time. The
    # language model reads its own config (text_config), not the top-level one.
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False
    _keep_cpu_4bit_weights_trainable(model)
    return model


def _keep_cpu_4bit_weights_trainable(model: PreTrainedModel) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time it runs in
    eval mode (the held-out loss of --eval_strategy) and training then fails on the repacked weight
    ("a view of a leaf Variable ... in-place operation"). A training model keeps the plain layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
