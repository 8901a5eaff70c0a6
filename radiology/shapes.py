"""Gemma 3 at its published shapes with random weights, for speed and memory work without a hub.

    python -m radiology.shapes 4b /tmp/gemma3-4b      # ~8.6 GB of bf16 weights plus a processor
    python -m radiology.shapes medgemma-4b /tmp/mg4b  # the same shape: MedGemma publishes Gemma 3's configs

Speed and memory measured on these models are real; the words they produce are not. The processor
has Gemma 3's special-token ids, image size and 256 soft tokens per image, with a character-level
text vocabulary (no sentencepiece file is needed).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GenerationConfig

from radiology.tiny import build_tiny_processor

__all__ = ["PUBLISHED_TEXT", "SIZE_ALIASES", "gemma3_config", "write_random_gemma3"]

# From the published config.json files of google/gemma-3-{4b,12b,27b}-pt.
PUBLISHED_TEXT: dict[str, dict] = {
    "4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "27b": dict(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168),
}
# MedGemma's multimodal checkpoints (google/medgemma-4b-pt, -4b-it, -27b-it) are Gemma 3 at these
# sizes: the published copies of their configs agree with Gemma 3's in every field set here (layer
# shapes, sliding window 1024, linear RoPE scaling x8, SigLIP at 896 px with 256 tokens per image,
# the special-token ids and eos [1, 106]), so the same builder serves both. The image encoder's
# weights differ (MedGemma's SigLIP is trained on medical images), not its shape.
# google/medgemma-27b-text-it has no vision tower: not a shape this project trains.
SIZE_ALIASES: dict[str, str] = {"medgemma-4b": "4b", "medgemma-27b": "27b"}
VOCAB_SIZE = 262_208
IMAGE_SIZE, TOKENS_PER_IMAGE = 896, 256


def gemma3_config(size: str) -> Gemma3Config:
    """The published Gemma 3 configuration for ``size`` (4b, 12b or 27b; medgemma-4b and
    medgemma-27b are the same shapes)."""
    size = SIZE_ALIASES.get(size, size)
    if size not in PUBLISHED_TEXT:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join([*PUBLISHED_TEXT, *SIZE_ALIASES])}")
    return Gemma3Config(
        text_config=dict(model_type="gemma3_text", vocab_size=VOCAB_SIZE, sliding_window=1024,
                         rope_scaling={"factor": 8.0, "rope_type": "linear"}, eos_token_id=[1, 106],
                         **PUBLISHED_TEXT[size]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, image_size=IMAGE_SIZE,
                           intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
                           patch_size=14, vision_use_head=False),
        mm_tokens_per_image=TOKENS_PER_IMAGE, boi_token_index=255_999, eoi_token_index=256_000,
        image_token_index=262_144, eos_token_id=[1, 106],
    )


def write_random_gemma3(size: str, out_dir: str | Path, device: str = "cuda") -> Path:
    """Build a random-weight Gemma 3 of a published size on ``device``, save it with a processor."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(gemma3_config(size), dtype=torch.bfloat16)
        # Zero-initialised by transformers; a real checkpoint's projection carries the image through.
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    model.generation_config = GenerationConfig(bos_token_id=2, pad_token_id=0, eos_token_id=[1, 106])
    model.save_pretrained(out, max_shard_size="5GB")
    build_tiny_processor(IMAGE_SIZE, TOKENS_PER_IMAGE, vocab_size=VOCAB_SIZE).save_pretrained(out)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight Gemma 3 of a published size.")
    parser.add_argument("size", choices=sorted([*PUBLISHED_TEXT, *SIZE_ALIASES]))
    parser.add_argument("out_dir")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(write_random_gemma3(args.size, args.out_dir, args.device))


if __name__ == "__main__":
    main()
