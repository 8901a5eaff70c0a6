"""The embedded tiny model: builds offline through its command line and behaves like Gemma 3."""

from __future__ import annotations

from transformers import AutoModelForImageTextToText, AutoProcessor

from tests.conftest import run_cli


def test_tiny_cli_writes_a_loadable_gemma3(tmp_path):
    out = tmp_path / "tiny"
    run_cli("-m", "radiology.tiny", str(out))
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert processor.chat_template and processor.image_seq_length == model.config.mm_tokens_per_image
    tok = processor.tokenizer
    for token in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, f"{token} must stay one token"
    assert model.config.image_token_id == tok.image_token_id
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0, "images must reach the text"


def test_every_linear_layer_fits_bitsandbytes_4bit_blocks(tmp_path):
    # bitsandbytes' CPU 4-bit inference (on AVX512-BF16 machines) packs weights in blocks of 64 inputs:
    # a narrower layer fails there with "shape '[32, 0]' is invalid" while training still works.
    import torch

    from radiology.tiny import build_tiny_model, build_tiny_processor

    model = build_tiny_model(build_tiny_processor())
    widths = {name: m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert widths and all(w % 64 == 0 for name, w in widths.items() if name != "lm_head"), widths
