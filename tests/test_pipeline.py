"""The whole path through the real command lines: train (4-bit QLoRA) -> adapter -> merge ->
reload -> same logits -> generate and stream."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import train
from radiology.generate import GenerationSettings, build_inputs, generate_text, load_for_generation, stream_text
from tests.conftest import run_cli
from tests.fixtures import real_images


def _trainer_state(folder):
    return json.loads((folder / "trainer_state.json").read_text())


def test_training_saves_a_learning_adapter(trained_run, tiny_model_dir):
    config = json.loads((trained_run / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["ensure_weight_tying"] is True
    assert "embed_tokens" in config["modules_to_save"]  # PEFT folds the tied lm_head into it
    weights = load_file(trained_run / "adapter_model.safetensors")
    head = [w for n, w in weights.items() if n.endswith("lm_head.weight")]
    embed = [w for n, w in weights.items() if n.endswith("embed_tokens.weight")]
    assert len(head) == len(embed) == 1 and torch.equal(head[0], embed[0]), "one trained, tied matrix"
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(torch.isfinite(w).all() for w in weights.values())
    assert all(w.abs().sum() > 0 for w in lora_b), "LoRA B starts at zero: training must have moved it"
    vision = [n for n in weights if "vision_tower" in n and "lora_A" in n]
    assert vision, "LoRA must reach the vision tower too (all-linear)"
    history = _trainer_state(trained_run / "checkpoint-4")["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 4 and all(l == l and l < 1e4 for l in losses)  # finite
    assert (trained_run / "chat_template.jinja").exists(), "the adapter folder carries the processor"


def test_merged_model_matches_the_adapter_model(trained_run, tiny_model_dir):
    merged_dir = trained_run / "merged"
    processor = AutoProcessor.from_pretrained(merged_dir)
    assert processor.chat_template
    generation = json.loads((merged_dir / "generation_config.json").read_text())
    tok = processor.tokenizer
    assert generation["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    assert list(merged_dir.glob("*.safetensors"))

    inputs = build_inputs(processor, real_images()["ct_16bit"], "Describe.")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    adapted = PeftModel.from_pretrained(base, trained_run).eval()
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.bfloat16).eval()
    pristine = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = adapted(**inputs).logits.float()
        got = merged(**inputs).logits.float()
        before = pristine(**inputs).logits.float()
    error = (got - expected).norm() / expected.norm()
    change = (before - expected).norm() / expected.norm()
    assert error < 2e-2, f"merged logits differ from the adapter model's by {error:.3g}"
    assert change > 10 * error, "training changed nothing measurable"
    # The trained embedding and the head stay one tied matrix.
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    assert not torch.equal(merged.get_input_embeddings().weight, pristine.get_input_embeddings().weight)


def test_generate_cli_prints_and_streams_the_same_text(trained_run, tmp_path):
    image = tmp_path / "ct.png"
    real_images()["ct_16bit"].save(image)
    args = ["-m", "radiology.generate", "--model", str(trained_run / "merged"), "--image", str(image),
            "--max_new_tokens", "8"]
    whole = run_cli(*args).stdout.strip()
    streamed = run_cli(*args, "--stream").stdout.strip()
    assert whole and streamed == whole, "streaming must print the same greedy text"


@pytest.mark.parametrize("how", ["adapter", "4bit"])
def test_generation_from_base_plus_adapter_and_in_4bit(trained_run, tiny_model_dir, how):
    image = real_images()["ct_16bit"]
    settings = GenerationSettings(max_new_tokens=8)
    merged = generate_text(load_for_generation(str(trained_run / "merged")), image, settings=settings)
    if how == "adapter":
        loaded = load_for_generation(str(tiny_model_dir), adapter=str(trained_run))
        assert loaded.processor.chat_template and "+" in loaded.name
        assert generate_text(loaded, image, settings=settings) == merged
    else:
        loaded = load_for_generation(str(trained_run / "merged"), load_in_4bit=True)
        assert loaded.precision == "4-bit NF4"
        assert generate_text(loaded, image, settings=settings).strip()  # NF4 rounding may change tokens


def test_generate_cli_names_a_bad_image(trained_run, tmp_path):
    fake = tmp_path / "scan.png"
    fake.write_text("not an image")
    result = run_cli("-m", "radiology.generate", "--model", str(trained_run / "merged"), "--image", str(fake),
                     check=False)
    assert result.returncode == 2 and "scan.png is not a readable image" in result.stderr
    assert "Traceback" not in result.stderr


def test_stream_yields_growing_text_equal_to_the_whole(trained_run):
    loaded = load_for_generation(str(trained_run / "merged"))
    settings = GenerationSettings(max_new_tokens=12)
    image = real_images()["rgb"]
    pieces = list(stream_text(loaded, image, settings=settings))
    assert pieces and all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))
    assert pieces[-1] == generate_text(loaded, image, settings=settings)


def test_sampling_with_a_seed_repeats(trained_run):
    loaded = load_for_generation(str(trained_run / "merged"))
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, seed=7)
    image = real_images()["rgb"]
    assert generate_text(loaded, image, settings=settings) == generate_text(loaded, image, settings=settings)


def test_resume_continues_from_the_checkpoint(trained_run, tiny_model_dir, seed_data_dir, tmp_path, capsys):
    # An interrupted run: only its first checkpoint survived.
    out = tmp_path / "interrupted"
    out.mkdir()
    shutil.copytree(trained_run / "checkpoint-2", out / "checkpoint-2")
    args = ["--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
            "--dataset_name", str(seed_data_dir), "--output_dir", str(out), "--merge", "false"]
    assert train.main(args) == 2
    assert "--resume_from_checkpoint last" in capsys.readouterr().err
    assert train.main([*args, "--resume_from_checkpoint", "last"]) == 0
    history = _trainer_state(out / "checkpoint-4")["log_history"]
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == [1, 2, 3, 4]  # 1-2 carried over from the checkpoint, 3-4 trained on resume
    resumed = load_file(out / "adapter_model.safetensors")
    original = load_file(trained_run / "adapter_model.safetensors")
    for name in original:  # same data order, same seed: the resumed run lands where the full run did
        assert torch.allclose(resumed[name].float(), original[name].float(), atol=1e-2), name
