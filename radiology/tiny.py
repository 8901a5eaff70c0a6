"""A tiny random Gemma 3 (model + processor) built offline in seconds.

    python -m radiology.tiny OUT_DIR
    python -m radiology.tiny OUT_DIR --variant medgemma     # MedGemma's published ids and vocabulary size
    python -m radiology.tiny OUT_DIR --variant text-only    # Gemma3ForCausalLM: no vision tower

Tests, checks and the demo's fallback use it: it has the real architecture, chat template,
special tokens and image processing of Gemma 3 at toy sizes, so every code path runs without
a hub download. Its output is meaningless word salad drawn from a small radiology vocabulary.

The variants stand in for the other checkpoints the project meets: MedGemma's multimodal models
(google/medgemma-4b-pt/-it, -27b-it) publish Gemma 3's configuration field for field, so the
MedGemma variant differs from the default only in carrying the published token ids and the
262,208-row vocabulary; the text-only variant is shaped like google/medgemma-27b-text-it
(model_type gemma3_text, no vision tower), which the project must refuse.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    GenerationConfig,
)

__all__ = [
    "MEDGEMMA_VOCAB_SIZE",
    "TINY_IMAGE_SIZE",
    "TINY_VARIANTS",
    "build_tiny_model",
    "build_tiny_processor",
    "build_tiny_text_model",
    "write_tiny_medgemma",
    "write_tiny_model",
    "write_tiny_text_model",
]

TINY_IMAGE_SIZE = 64
TINY_TOKENS_PER_IMAGE = 4  # k*k with k dividing image/patch = 64/16 = 4
# The vocabulary size of MedGemma's (and Gemma 3's) published multimodal configs: the text ids plus
# the image token 262144 and its padding rows.
MEDGEMMA_VOCAB_SIZE = 262_208

_SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]
# Words the untrained model samples from, so that the demo shows text rather than byte soup.
_WORDS = """
the a of and in with no is are there right left bilateral upper lower lobe lung chest heart
normal abnormal opacity consolidation effusion pleural nodule mass lesion fracture bone joint
soft tissue contrast enhancement axial coronal sagittal view image shows demonstrates arrow
arrows ct mri x-ray radiograph ultrasound scan t1 t2 weighted signal hyperintense hypointense
liver kidney spleen brain skull spine vertebra rib pelvis femur knee shoulder abdomen
small large mild moderate severe acute chronic cyst calcification edema fluid air free
""".split()


def _tiny_vocab() -> dict[str, int]:
    pieces = list(_SPECIAL_TOKENS) + ["\n", "▁"]
    pieces += [c for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += ["▁" + w for w in _WORDS]
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    return vocab


def _gemma3_chat_template() -> str:
    # TRL ships Gemma 3's chat template; the real -it checkpoints carry the same one.
    from trl.chat_template_utils import gemma3_chat_template

    return gemma3_chat_template


def _published_vocab(vocab_size: int) -> dict[str, int]:
    """A vocabulary with Gemma 3's published special-token ids and size: the text is still
    character-level, but every id, the image block and the 262k-row head have the real shapes."""
    fixed = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<start_of_turn>": 105,
             "<end_of_turn>": 106, "\n": 107, "<start_of_image>": 255999, "<end_of_image>": 256000,
             "<image_soft_token>": 262144}
    characters = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    fixed.update({c: 300 + i for i, c in enumerate(characters)})
    fixed.update({"▁" + w: 1000 + i for i, w in enumerate(_WORDS)})
    taken = set(fixed.values())
    vocab = dict(fixed)
    vocab.update({f"<unused{i}>": i for i in range(vocab_size) if i not in taken})
    return vocab


def build_tiny_processor(
    image_size: int = TINY_IMAGE_SIZE,
    tokens_per_image: int = TINY_TOKENS_PER_IMAGE,
    vocab_size: int | None = None,
) -> Gemma3Processor:
    """A Gemma 3 processor whose tokenizer needs no download (character-level BPE, real special
    tokens). With ``vocab_size`` the special tokens sit at Gemma 3's published ids."""
    tokenizer = GemmaTokenizer(
        vocab=_published_vocab(vocab_size) if vocab_size else _tiny_vocab(),
        merges=[],
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    # Registered as special so that they stay single tokens instead of splitting into characters.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_gemma3_chat_template(),
        image_seq_length=tokens_per_image,
    )


def _tiny_text_config(processor: Gemma3Processor) -> dict:
    """The tiny language model's settings, shared by the multimodal and the text-only model."""
    tok = processor.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    # Every linear layer's input width is a multiple of 64, bitsandbytes' 4-bit block size: on CPUs with
    # AVX512-BF16, its 4-bit inference path repacks weights per block and fails on narrower layers.
    return dict(
        model_type="gemma3_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        layer_types=["sliding_attention", "full_attention"], sliding_window=512,
        query_pre_attn_scalar=32, max_position_embeddings=8192,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, end_of_turn],
    )


def _tiny_config(processor: Gemma3Processor) -> Gemma3Config:
    tok = processor.tokenizer
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    return Gemma3Config(
        text_config=_tiny_text_config(processor),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=16, vision_use_head=False,
        ),
        mm_tokens_per_image=TINY_TOKENS_PER_IMAGE,
        boi_token_index=tok.convert_tokens_to_ids(tok.boi_token),
        eoi_token_index=tok.convert_tokens_to_ids(tok.eoi_token),
        image_token_index=tok.convert_tokens_to_ids(tok.image_token),
        eos_token_id=[tok.eos_token_id, end_of_turn],
    )


def build_tiny_model(processor: Gemma3Processor, seed: int = 0) -> Gemma3ForConditionalGeneration:
    """A randomly initialised Gemma 3 whose special ids match ``processor``'s tokenizer."""
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(_tiny_config(processor))
    # transformers initialises the image projection to zeros (real checkpoints overwrite it); left
    # at zero, the image would never reach the text model and the vision tower would get no gradient.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    model = model.to(torch.bfloat16)
    model.generation_config = _tiny_generation_config(processor)
    return model.eval()


def _tiny_generation_config(processor: Gemma3Processor) -> GenerationConfig:
    tok = processor.tokenizer
    return GenerationConfig(
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
        do_sample=False,
    )


def build_tiny_text_model(processor: Gemma3Processor, seed: int = 0) -> Gemma3ForCausalLM:
    """A randomly initialised text-only Gemma 3 (``Gemma3ForCausalLM``, model_type gemma3_text), the
    shape of google/medgemma-27b-text-it at toy size: the same language model as the tiny multimodal
    one, and no vision tower."""
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**_tiny_text_config(processor))).to(torch.bfloat16)
    model.generation_config = _tiny_generation_config(processor)
    return model.eval()


def write_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny model and processor and save both to ``out_dir``; returns the folder."""
    out = Path(out_dir)
    processor = build_tiny_processor()
    model = build_tiny_model(processor, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_tiny_medgemma(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny MedGemma-shaped model and processor in ``out_dir``: the tiny architecture with the
    published special-token ids (image 262144, boi 255999, eoi 256000, <end_of_turn> 106) and
    vocabulary size 262,208 of google/medgemma-4b-it and -27b-it (about 17M parameters, most of
    them the embedding)."""
    out = Path(out_dir)
    processor = build_tiny_processor(vocab_size=MEDGEMMA_VOCAB_SIZE)
    model = build_tiny_model(processor, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_tiny_text_model(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny text-only Gemma 3 in ``out_dir`` as such checkpoints ship: weights and a tokenizer with
    the chat template, no image processor."""
    out = Path(out_dir)
    processor = build_tiny_processor()
    model = build_tiny_text_model(processor, seed=seed)
    tokenizer = processor.tokenizer
    tokenizer.chat_template = processor.chat_template
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


TINY_VARIANTS = {"gemma3": write_tiny_model, "medgemma": write_tiny_medgemma, "text-only": write_tiny_text_model}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the tiny model and processor into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=sorted(TINY_VARIANTS), default="gemma3",
                        help="gemma3 (default), medgemma (published ids and vocabulary), text-only (no vision tower)")
    args = parser.parse_args(argv)
    print(TINY_VARIANTS[args.variant](args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
