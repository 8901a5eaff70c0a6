"""Which checkpoints the project accepts: MedGemma's multimodal models (Gemma 3 underneath) train and
generate; text-only ones (google/medgemma-27b-text-it, any Gemma3ForCausalLM) are refused from their
config before a weight is read; a config that cannot be read says why and what to do."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from radiology.data import DEFAULT_INSTRUCTION, build_messages
from radiology.modeling import (
    ModelConfigError,
    TextOnlyModelError,
    check_vision_language_model,
    load_processor,
    load_training_model,
    processor_id_for,
)
from radiology.tiny import (
    MEDGEMMA_VOCAB_SIZE,
    build_tiny_model,
    build_tiny_processor,
    build_tiny_text_model,
    write_tiny_medgemma,
    write_tiny_text_model,
)
from tests.conftest import ROOT, run_cli
from tests.fixtures import real_images

RECIPES = ROOT / "recipes"
NO_VISION = "no vision tower"


@pytest.fixture(scope="session")
def text_only_dir(tmp_path_factory) -> Path:
    return write_tiny_text_model(tmp_path_factory.mktemp("text-only") / "model")


@pytest.fixture(scope="session")
def text_only_without_weights(tmp_path_factory, text_only_dir) -> Path:
    """The text-only checkpoint with its weights file replaced by garbage: any attempt to read a
    weight fails loudly, so a clean refusal proves that none was read."""
    folder = tmp_path_factory.mktemp("text-only-broken") / "model"
    shutil.copytree(text_only_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture(scope="session")
def medgemma_dir(tmp_path_factory) -> Path:
    return write_tiny_medgemma(tmp_path_factory.mktemp("medgemma") / "model")


def _model_args(model: Path | str):
    from trl import ModelConfig

    return ModelConfig(model_name_or_path=str(model), dtype="bfloat16", load_in_4bit=False)


# --------------------------------------------------------------------------- text-only refusal


def test_text_only_checkpoint_is_refused_from_its_config(text_only_without_weights):
    with pytest.raises(TextOnlyModelError) as refused:
        check_vision_language_model(str(text_only_without_weights))
    message = str(refused.value)
    assert NO_VISION in message and "gemma3_text" in message and "Gemma3ForCausalLM" in message
    assert "google/medgemma-4b-it" in message and "google/medgemma-27b-it" in message
    assert isinstance(refused.value, ValueError)  # train.py and the generate CLI turn these into exit 2


def test_vision_language_checkpoints_pass_the_check(tiny_model_dir, medgemma_dir):
    for folder in (tiny_model_dir, medgemma_dir):
        assert check_vision_language_model(str(folder)).vision_config is not None


def test_training_model_refuses_text_only_before_loading_weights(text_only_without_weights):
    with pytest.raises(TextOnlyModelError, match=NO_VISION):
        load_training_model(_model_args(text_only_without_weights))


def test_processor_of_a_text_only_checkpoint_is_refused(text_only_dir):
    with pytest.raises(TextOnlyModelError, match=NO_VISION):
        load_processor(str(text_only_dir))


def test_multimodal_folder_without_processor_files_says_which_processor_to_pass(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelConfigError, match="no usable processor.*--processor_name_or_path"):
        load_processor(str(folder))


def test_train_cli_refuses_text_only_with_exit_2(tmp_path, text_only_without_weights, seed_data_dir):
    out = tmp_path / "run"
    result = run_cli("train.py", "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path",
                     str(text_only_without_weights), "--dataset_name", str(seed_data_dir), "--output_dir", str(out),
                     check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert NO_VISION in result.stderr and "google/medgemma-4b-it" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "adapter_config.json").exists()


def test_generation_refuses_text_only_before_loading_weights(text_only_without_weights):
    from radiology.generate import load_for_generation

    with pytest.raises(TextOnlyModelError, match=NO_VISION):
        load_for_generation(str(text_only_without_weights), device="cpu", fast=False)


# --------------------------------------------------------------------------- unreadable configs


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelConfigError, match="no such folder") as refused:
        check_vision_language_model(str(missing))
    assert str(missing) in str(refused.value)


def test_folder_without_config_says_what_a_model_folder_holds(tmp_path):
    with pytest.raises(ModelConfigError, match="no config.json"):
        check_vision_language_model(str(tmp_path))


def test_adapter_folder_is_not_a_model(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelConfigError, match="LoRA adapter"):
        check_vision_language_model(str(tmp_path))


def test_offline_hub_id_says_download_or_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelConfigError) as refused:
        check_vision_language_model("google/medgemma-4b-it")
    message = str(refused.value)
    assert "offline" in message and "hf download google/medgemma-4b-it" in message and "local folder" in message


def _hub_raises(monkeypatch, error: Exception) -> None:
    """The hub download behind transformers raises ``error``, as it does online; transformers wraps
    it in its own OSError, as it would for real."""
    import transformers.utils.hub as hub

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(hub, "hf_hub_download", refuse)


def _response() -> SimpleNamespace:
    return SimpleNamespace(headers={}, request=None)


def test_gated_model_without_access_names_licence_and_token(monkeypatch):
    _hub_raises(monkeypatch, GatedRepoError("403 Client Error: gated", response=_response()))
    with pytest.raises(ModelConfigError) as refused:
        check_vision_language_model("google/medgemma-27b-it")
    message = str(refused.value)
    assert "gated" in message and "HF_TOKEN" in message and "Health AI Developer Foundations" in message
    assert "https://huggingface.co/google/medgemma-27b-it" in message and "local folder" in message


def test_unknown_hub_model_says_check_name_or_token(monkeypatch):
    _hub_raises(monkeypatch, RepositoryNotFoundError("404 Client Error", response=_response()))
    with pytest.raises(ModelConfigError, match="not a model on the hub.*HF_TOKEN"):
        check_vision_language_model("google/medgemma-4b-typo")


def test_unknown_revision_names_the_flag(monkeypatch):
    _hub_raises(monkeypatch, RevisionNotFoundError("404 Client Error", response=_response()))
    with pytest.raises(ModelConfigError, match="--model_revision"):
        check_vision_language_model("google/medgemma-4b-it", revision="nope")


def test_processor_of_a_gated_model_names_licence_and_token(monkeypatch):
    _hub_raises(monkeypatch, GatedRepoError("403 Client Error: gated", response=_response()))
    with pytest.raises(ModelConfigError, match="HF_TOKEN"):
        load_processor("google/medgemma-4b-pt")


# --------------------------------------------------------------------------- MedGemma recipes and processor


def test_medgemma_pt_takes_the_processor_of_its_it_sibling():
    assert processor_id_for("google/medgemma-4b-pt") == "google/medgemma-4b-it"
    for it in ("google/medgemma-4b-it", "google/medgemma-1.5-4b-it", "google/medgemma-27b-it"):
        assert processor_id_for(it) == it


@pytest.mark.parametrize("size, model, processor", [
    ("4b", "google/medgemma-4b-pt", "google/medgemma-4b-it"),
    ("27b", "google/medgemma-27b-it", "google/medgemma-27b-it"),
])
def test_medgemma_recipes_are_the_gemma3_recipes_on_medgemma(size, model, processor):
    medgemma = yaml.safe_load((RECIPES / f"medgemma-{size}-qlora.yaml").read_text())
    gemma3 = yaml.safe_load((RECIPES / f"gemma3-{size}-qlora.yaml").read_text())
    assert medgemma.pop("model_name_or_path") == model
    assert medgemma.pop("processor_name_or_path") == processor == processor_id_for(model, processor)
    for key in ("model_name_or_path", "processor_name_or_path"):
        gemma3.pop(key)
    assert medgemma == gemma3
    header = (RECIPES / f"medgemma-{size}-qlora.yaml").read_text().split("\nmodel_name_or_path")[0]
    assert "Health AI Developer Foundations" in header and "HF_TOKEN" in header


# --------------------------------------------------------------------------- tiny stand-ins


def test_tiny_text_only_model_is_gemma3_causal_lm_without_vision():
    model = build_tiny_text_model(build_tiny_processor())
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert getattr(model.config, "vision_config", None) is None
    widths = {name: m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert widths and all(w % 64 == 0 for w in widths.values()), widths


def test_tiny_medgemma_has_published_ids_on_the_tiny_architecture(medgemma_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(medgemma_dir)
    assert (config.image_token_id, config.boi_token_index, config.eoi_token_index) == (262144, 255999, 256000)
    assert config.text_config.vocab_size == MEDGEMMA_VOCAB_SIZE and list(config.eos_token_id) == [1, 106]
    tiny = build_tiny_model(build_tiny_processor()).config
    ids = {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"}
    assert {k: v for k, v in config.text_config.to_dict().items() if k not in ids} == {
        k: v for k, v in tiny.text_config.to_dict().items() if k not in ids}
    assert config.vision_config.to_dict() == tiny.vision_config.to_dict()


def test_medgemma_prompt_renders_the_user_turn_build_messages_makes(medgemma_dir):
    processor = load_processor(str(medgemma_dir))
    prompt = processor.apply_chat_template(build_messages(DEFAULT_INSTRUCTION), add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == (f"<bos><start_of_turn>user\n<start_of_image>{DEFAULT_INSTRUCTION}<end_of_turn>\n"
                      "<start_of_turn>model\n")
    image = real_images()["mr_gray"].convert("RGB")
    ids = processor(text=[prompt], images=[[image]], return_tensors="pt")["input_ids"][0].tolist()
    start = ids.index(255999)
    assert ids[start: start + 6] == [255999, 262144, 262144, 262144, 262144, 256000]
    # <bos> <start_of_turn> at Gemma 3's ids, one <end_of_turn> (106) closing the user turn, the model's turn open.
    assert ids[:2] == [2, 105] and ids.count(106) == 1 and ids.count(105) == 2


def test_tiny_medgemma_trains_through_train_py_and_generates(tmp_path, medgemma_dir, seed_data_dir):
    from radiology.generate import GenerationSettings, generate_text, load_for_generation

    out = tmp_path / "run"
    # One sample a step: the 262k-row head of the published vocabulary makes each step ~10x the tiny model's.
    run_cli("train.py", "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(medgemma_dir),
            "--dataset_name", str(seed_data_dir), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "2",
            "--per_device_train_batch_size", "1")
    assert (out / "adapter_config.json").exists() and (out / "merged" / "config.json").exists()
    assert check_vision_language_model(str(out / "merged")).image_token_id == 262144
    loaded = load_for_generation(str(out / "merged"), device="cpu", fast=False)
    assert loaded.stop_token_ids == [1, 106]
    text = generate_text(loaded, real_images()["mr_gray"], settings=GenerationSettings(max_new_tokens=6))
    assert text.strip()


def test_medgemma_published_shapes_are_gemma3s():
    from radiology.shapes import gemma3_config

    for medgemma, gemma3 in (("medgemma-4b", "4b"), ("medgemma-27b", "27b")):
        assert gemma3_config(medgemma).to_dict() == gemma3_config(gemma3).to_dict()
    with pytest.raises(ValueError, match="medgemma-4b"):
        gemma3_config("medgemma-12b")
