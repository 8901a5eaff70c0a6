"""Training speed options (radiology.speed) on the tiny model, through train.py's path: each trains, starts from
the default's loss, and does what it says (which layers recompute, no autocast, compiled layers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from radiology.config import parse_args
from radiology.speed import (
    CheckpointSelection,
    LoraShape,
    layer_bytes_per_token,
    layer_towers,
    parse_checkpointing_layers,
    plan_checkpointing,
)
from radiology.training import build_trainer, load_training_data

# Half a bf16 rounding step: the options change kernels and dtypes, not the arithmetic.
BF16_TOLERANCE = 4e-3


def tiny_args(model_dir, data_dir, out, *extra):
    return ["--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(model_dir), "--dataset_name",
            str(data_dir), "--output_dir", str(out), "--save_strategy", "no", "--merge", "false",
            "--activation_checkpointing", "true", "--max_steps", "2", *extra]


def train_two_steps(model_dir, data_dir, out, *extra, before_train=None):
    script, training, model_args = parse_args(tiny_args(model_dir, data_dir, out, *extra))
    trainer = build_trainer(script, training, model_args, load_training_data(script, training))
    if before_train is not None:
        before_train(trainer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, losses


@pytest.fixture(scope="module")
def default_losses(tiny_model_dir, seed_data_dir, tmp_path_factory):
    return train_two_steps(tiny_model_dir, seed_data_dir, tmp_path_factory.mktemp("default"))[1]


@pytest.fixture(scope="module")
def deep_tiny_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with 4 decoder and 3 vision layers (the extra ones randomly initialised, then saved)."""
    from transformers import AutoModelForImageTextToText

    folder = tmp_path_factory.mktemp("deep") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 4
    config["text_config"]["layer_types"] = ["sliding_attention", "full_attention"] * 2
    config["vision_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- options


def test_checkpointing_layers_spec_is_parsed_and_bad_specs_name_the_fix(tiny_model_dir, seed_data_dir, tmp_path):
    assert parse_checkpointing_layers("all") == CheckpointSelection()
    assert parse_checkpointing_layers("auto") == CheckpointSelection(auto=True, order=("text", "vision"))
    assert parse_checkpointing_layers("auto:vision") == CheckpointSelection(auto=True, order=("vision", "text"))
    assert parse_checkpointing_layers("vision=3, text=0") == CheckpointSelection(vision=3, text=0)
    assert parse_checkpointing_layers("text=all") == CheckpointSelection(text=None)
    for bad in ("vision=-1", "text=2,text=3", "half", "vision:3", "auto:both"):
        with pytest.raises(ValueError, match="vision=N,text=M"):
            parse_checkpointing_layers(bad)
    with pytest.raises(ValueError, match="--checkpointing_layers auto"):
        parse_args(tiny_args(tiny_model_dir, seed_data_dir, tmp_path, "--checkpointing_budget_gib", "20"))
    with pytest.raises(ValueError, match="--compile_blocks must be one of none, vision, text, all"):
        parse_args(tiny_args(tiny_model_dir, seed_data_dir, tmp_path, "--compile_blocks", "decoder"))


@pytest.mark.parametrize("option", [
    ["--pure_bf16", "true"],
    ["--checkpointing_layers", "vision=0,text=1"],
    ["--checkpointing_layers", "auto", "--checkpointing_budget_gib", "1"],
])
def test_each_option_trains_from_the_default_first_step_loss(tiny_model_dir, seed_data_dir, tmp_path,
                                                             default_losses, option):
    _, losses = train_two_steps(tiny_model_dir, seed_data_dir, tmp_path, *option)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(default_losses[0], rel=BF16_TOLERANCE)
    # The second step reads the same rows after one identical update: the same loss again.
    assert losses[1] == pytest.approx(default_losses[1], rel=BF16_TOLERANCE)


def test_pure_bf16_trains_without_autocast_and_keeps_the_adapter_bf16(tiny_model_dir, seed_data_dir, tmp_path):
    seen = []

    def watch(trainer):
        def record(module, args):
            seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype if args else None))

        layer = layer_towers(trainer.model)["text"][0]
        layer.self_attn.q_proj.register_forward_pre_hook(record)

    trainer, _ = train_two_steps(tiny_model_dir, seed_data_dir, tmp_path, "--pure_bf16", "true", before_train=watch)
    assert trainer.accelerator.mixed_precision == "no"
    assert seen and all(not autocast and dtype == torch.bfloat16 for autocast, dtype in seen)
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_pure_bf16_refuses_a_model_loaded_in_another_dtype_before_loading(tiny_model_dir, seed_data_dir, tmp_path,
                                                                          capsys, refuse_loading):
    import train

    assert train.main(tiny_args(tiny_model_dir, seed_data_dir, tmp_path, "--pure_bf16", "true",
                                "--dtype", "float32")) == 2
    err = capsys.readouterr().err
    assert "--pure_bf16 trains the bf16 weights as they are and needs --dtype bfloat16" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- which layers recompute


def _forward_calls_per_layer(trainer) -> dict[str, list[int]]:
    """Counts each layer's MLP runs during training: twice per step for a checkpointed layer (the recompute)."""
    calls = {}
    for tower, layers in layer_towers(trainer.model).items():
        calls[tower] = [0] * len(layers)
        for index, layer in enumerate(layers):
            def count(module, args, tower=tower, index=index):
                calls[tower][index] += 1

            layer.mlp.register_forward_pre_hook(count)
    return calls


def test_checkpointing_layers_recomputes_exactly_the_first_n_layers(deep_tiny_model_dir, seed_data_dir, tmp_path):
    holder = {}
    trainer, _ = train_two_steps(deep_tiny_model_dir, seed_data_dir, tmp_path, "--checkpointing_layers",
                                 "vision=2,text=1", "--max_steps", "1",
                                 before_train=lambda t: holder.update(calls=_forward_calls_per_layer(t)))
    towers = layer_towers(trainer.model)
    assert [layer.gradient_checkpointing for layer in towers["vision"]] == [True, True, False]
    assert [layer.gradient_checkpointing for layer in towers["text"]] == [True, False, False, False]
    assert holder["calls"] == {"vision": [2, 2, 1], "text": [2, 1, 1, 1]}


def test_checkpointing_scope_still_limits_the_towers(deep_tiny_model_dir, seed_data_dir, tmp_path):
    trainer, _ = train_two_steps(deep_tiny_model_dir, seed_data_dir, tmp_path, "--checkpointing_scope", "vision",
                                 "--checkpointing_layers", "vision=1", "--max_steps", "1")
    towers = layer_towers(trainer.model)
    assert [layer.gradient_checkpointing for layer in towers["vision"]] == [True, False, False]
    assert not any(layer.gradient_checkpointing for layer in towers["text"])


def test_auto_keeps_the_activations_the_budget_has_room_for(deep_tiny_model_dir, seed_data_dir, tmp_path,
                                                              monkeypatch):
    """The first step measures its peak (here: a fixed reading, there is no GPU); the next steps keep as many
    layers' activations as the budget leaves room for, text layers first."""
    import radiology.speed as speed

    monkeypatch.setattr(speed, "_cuda_peak", lambda: 0)
    holder = {}
    args = ["--checkpointing_layers", "auto", "--max_steps", "2"]
    # A budget of a few KiB holds no layer's activations; one of 1 GiB holds all of the tiny model's.
    trainer, _ = train_two_steps(deep_tiny_model_dir, seed_data_dir, tmp_path / "small", *args,
                                 "--checkpointing_budget_gib", "0.000001")
    assert all(layer.gradient_checkpointing for layers in layer_towers(trainer.model).values() for layer in layers)
    trainer, _ = train_two_steps(deep_tiny_model_dir, seed_data_dir, tmp_path / "large", *args,
                                 "--checkpointing_budget_gib", "1",
                                 before_train=lambda t: holder.update(calls=_forward_calls_per_layer(t)))
    assert not any(layer.gradient_checkpointing for layers in layer_towers(trainer.model).values() for layer in layers)
    # Step 1 recomputed every layer (measured), step 2 none.
    assert holder["calls"] == {"vision": [3, 3, 3], "text": [3, 3, 3, 3]}


def test_plan_gives_up_text_layers_first_and_only_what_fits():
    layers = {"vision": 27, "text": 34}
    per_layer = {"vision": 800, "text": 300}
    assert plan_checkpointing(0, per_layer, layers) == layers
    assert plan_checkpointing(10**9, per_layer, layers) == {"vision": 0, "text": 0}
    assert plan_checkpointing(34 * 300 + 5 * 800 + 799, per_layer, layers) == {"vision": 22, "text": 0}
    assert plan_checkpointing(10 * 300 + 299, per_layer, layers) == {"vision": 27, "text": 24}
    assert plan_checkpointing(10**9, per_layer, {"vision": 3, "text": 0}) == {"vision": 0, "text": 0}
    assert plan_checkpointing(3 * 800 + 300, per_layer, layers, ("vision", "text")) == {"vision": 24, "text": 33}


def test_memory_model_matches_the_activations_measured_on_the_4b_shape():
    """Measured on an H100 (BENCHMARKS.md, run A vs run B, autocast): ~61 KB per vision token and ~215 KB per text
    token kept per layer. The model from shapes must land within 15%."""
    from radiology.shapes import gemma3_config

    config = gemma3_config("4b")
    lora = LoraShape(r=16, dropout=0.05, towers=frozenset({"vision", "text"}))
    assert layer_bytes_per_token(config, "vision", lora, autocast=True) == pytest.approx(61_000, rel=0.15)
    assert layer_bytes_per_token(config, "text", lora, autocast=True) == pytest.approx(215_000, rel=0.15)
    frozen_vision = LoraShape(r=16, dropout=0.05, towers=frozenset({"text"}))
    assert layer_bytes_per_token(config, "vision", frozen_vision) == 0  # no gradient flows through it


# --------------------------------------------------------------------------- compiled blocks


def test_compiled_blocks_give_the_uncompiled_losses(tiny_model_dir, seed_data_dir, tmp_path, default_losses,
                                                     monkeypatch):
    """Inductor on the CPU, the vision layers only (one compile, fixed shapes): same losses, no graph break,
    activation checkpointing still wrapped around the compiled code."""
    import transformers.modeling_utils
    from torch._dynamo.utils import counters

    checkpointed = []
    original = transformers.modeling_utils.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        checkpointed.append(getattr(function, "args", (None,))[0])  # partial(compiled forward, layer)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    counters.clear()
    trainer, losses = train_two_steps(tiny_model_dir, seed_data_dir, tmp_path, "--compile_blocks", "vision")
    assert losses == pytest.approx(default_losses, rel=BF16_TOLERANCE)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    vision = layer_towers(trainer.model)["vision"]
    assert all("forward" in vars(layer) for layer in vision)  # the compiled forward, set on each layer
    assert sum(layer is vision[0] for layer in checkpointed) == 2  # checkpointed around it at each step
