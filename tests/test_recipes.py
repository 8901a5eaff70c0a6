"""Every shipped recipe parses, and the defaults are the well-known recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from radiology.config import parse_args
from radiology.data import DEFAULT_INSTRUCTION
from radiology.modeling import bnb_config, lora_config, processor_id_for

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
# The GPU recipes ask for bf16, which transformers only accepts on this CPU machine with use_cpu.
CPU = ["--use_cpu", "true"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe, tmp_path):
    script, training, model = parse_args(["--config", str(recipe), "--output_dir", str(tmp_path), *CPU])
    assert model.load_in_4bit and model.use_peft
    assert training.bf16 and not training.fp16
    assert training.remove_unused_columns is False
    assert "lm_head" in model.lora_modules_to_save and "embed_tokens" in model.lora_modules_to_save


def test_defaults_without_a_recipe_are_the_seed_recipe(tmp_path):
    script, training, model = parse_args(["--output_dir", str(tmp_path), *CPU])
    assert model.model_name_or_path == "google/gemma-3-4b-pt"
    assert processor_id_for(model.model_name_or_path) == "google/gemma-3-4b-it"
    assert script.dataset_name == "unsloth/Radiology_mini" and script.max_train_samples == 800
    assert script.instruction == DEFAULT_INSTRUCTION
    quant = bnb_config(model)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert str(quant.bnb_4bit_compute_dtype) == "torch.bfloat16" and str(quant.bnb_4bit_quant_storage) == "torch.bfloat16"
    lora = lora_config(model)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 16, 0.05)
    assert lora.target_modules == "all-linear" and lora.ensure_weight_tying
    assert training.num_train_epochs == 1
    # The seed's 4 samples per optimizer step, taken as one micro-batch of 4.
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 4
    assert training.activation_checkpointing and training.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert training.optim == "adamw_torch_fused" and training.learning_rate == 2e-4 and training.max_grad_norm == 0.3
    assert training.warmup_steps == 0.03 and training.lr_scheduler_type == "constant_with_warmup"
    assert training.logging_steps == 5 and training.save_strategy == "epoch"
    assert training.report_to == ["tensorboard"] and not training.push_to_hub
    assert training.ddp_find_unused_parameters is False  # under DDP every trained weight takes part


def test_flags_override_the_recipe(tmp_path):
    recipe = RECIPES[0]
    _, training, model = parse_args(["--config", str(recipe), "--output_dir", str(tmp_path), *CPU,
                                     "--learning_rate", "1e-5", "--lora_r", "64"])
    assert training.learning_rate == 1e-5 and model.lora_r == 64


@pytest.mark.parametrize("flags, message", [
    (["--fp16", "true", "--bf16", "false"], "fp16 is not supported"),
    (["--push_to_hub", "true"], "--push_to_hub needs --hub_model_id"),
    (["--max_train_samples", "0"], "at least 1"),
])
def test_impossible_combinations_fail_early(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        parse_args(["--output_dir", str(tmp_path), *CPU, *flags])


def test_processor_of_a_local_folder_is_its_own(tmp_path):
    assert processor_id_for(str(tmp_path)) == str(tmp_path)
    assert processor_id_for("google/gemma-3-27b-it") == "google/gemma-3-27b-it"
    assert processor_id_for("google/gemma-3-12b-pt", "my/processor") == "my/processor"


def test_the_defaults_are_the_default_recipe_value_by_value(tmp_path):
    from radiology.config import DEFAULT_RECIPE

    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    parsed = parse_args(["--output_dir", str(tmp_path), *CPU])
    for key, value in recipe.items():
        holder = next(args for args in parsed if hasattr(args, key))
        if key == "processor_name_or_path":  # follows --model_name_or_path when no recipe is given
            assert holder.processor_name_or_path is None
            continue
        parsed_value = getattr(holder, key)
        if value == ["all-linear"]:  # ModelConfig keeps PEFT's keyword as a string
            value = "all-linear"
        assert getattr(parsed_value, "value", parsed_value) == value, key


def test_the_default_recipe_file_is_the_one_source_of_the_defaults(tmp_path, monkeypatch):
    import radiology.config as config

    changed = {**yaml.safe_load(config.DEFAULT_RECIPE.read_text()), "lora_r": 48, "learning_rate": 3.0e-5}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(changed))
    monkeypatch.setattr(config, "DEFAULT_RECIPE", recipe)
    _, training, model = parse_args(["--output_dir", str(tmp_path), *CPU])
    assert model.lora_r == 48 and training.learning_rate == 3e-5


def test_help_lists_config_and_the_project_options_before_trl(capsys):
    import train

    with pytest.raises(SystemExit) as exited:
        train.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    ours = text.index("radiology-gemma:")
    model_group, training_group = text.index("(TRL ModelConfig)"), text.index("(TRL SFTConfig")
    assert ours < model_group < training_group
    own = text[ours:model_group]
    assert own.splitlines()[1].strip().startswith("--config YAML")
    for flag in ("--dataset_name", "--context_column", "--instruction", "--evaluate", "--overwrite_output_dir"):
        assert f"  {flag} " in own, flag
    assert "--learning_rate" not in own and "--learning_rate" in text[training_group:]
    assert "--lora_r" in text[model_group:training_group]
