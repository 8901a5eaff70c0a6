"""Merge stage: adapter + base reloaded in bf16 -> one folder that ``from_pretrained`` loads.

    python -m radiology.merge --base google/gemma-3-4b-pt --adapter runs/r1 --output_dir runs/r1/merged

The base is reloaded in bf16, never merged into the 4-bit training weights: merging into NF4
would round the LoRA update away. The folder gets safetensors shards, the processor with its chat
template, and a generation config that stops on ``<end_of_turn>`` as well as ``<eos>``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, GenerationConfig, PreTrainedModel, ProcessorMixin

from radiology.tokens import stop_ids

__all__ = ["merge_adapter", "merged_generation_config"]

logger = logging.getLogger(__name__)


def merged_generation_config(model: PreTrainedModel, processor: ProcessorMixin) -> GenerationConfig:
    config = model.generation_config or GenerationConfig()
    tok = processor.tokenizer
    config.eos_token_id = stop_ids(processor)
    config.pad_token_id = tok.pad_token_id
    config.bos_token_id = tok.bos_token_id
    return config


def _bf16_size_bytes(model_name_or_path: str) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        return sum(p.numel() for p in model.parameters()) * 2
    except Exception:  # sizing is a hint only
        return None


def _merge_device(device: str, base_model: str) -> str:
    if device != "auto":
        return device
    if not torch.cuda.is_available():
        return "cpu"
    free, _total = torch.cuda.mem_get_info()
    size = _bf16_size_bytes(base_model)
    return "cuda" if size is not None and size * 1.2 < free else "cpu"


def merge_adapter(
    base_model: str,
    adapter_dir: str | Path,
    output_dir: str | Path,
    processor: ProcessorMixin,
    overwrite: bool = False,
    device: str = "auto",
    revision: str = "main",
) -> Path:
    """Reload ``base_model`` in bf16, apply the adapter, merge, save; returns the output folder."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite_output_dir or choose another folder")
    target = _merge_device(device, base_model)
    logger.info("Merging %s into %s (bf16, on %s)", adapter_dir, base_model, target)
    base = AutoModelForImageTextToText.from_pretrained(
        base_model, revision=revision, dtype=torch.bfloat16, device_map={"": 0} if target == "cuda" else None
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.generation_config = merged_generation_config(merged, processor)
    # Written to a temporary sibling first, so that a crash never leaves a half-written model behind.
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    merged.save_pretrained(partial, max_shard_size="5GB")
    processor.save_pretrained(partial)
    if out.exists():  # only reached with overwrite=True, and only once the new model is complete
        shutil.rmtree(out)
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    from radiology.modeling import load_processor

    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into bf16 base weights.")
    parser.add_argument("--base", required=True, help="base model id or folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="adapter folder (train.py's --output_dir)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--processor_name_or_path", default=None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--overwrite_output_dir", action="store_true")
    args = parser.parse_args(argv)
    adapter_has_processor = (Path(args.adapter) / "processor_config.json").exists()
    processor = load_processor(args.adapter if adapter_has_processor else args.base, args.processor_name_or_path)
    print(merge_adapter(args.base, args.adapter, args.output_dir, processor, args.overwrite_output_dir, args.device))


if __name__ == "__main__":
    main()
