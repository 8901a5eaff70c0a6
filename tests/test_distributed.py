"""Several processes: the accelerate configs, DDP through `accelerate launch` on two CPU processes (gloo),
FSDP2's sharding of the 4-bit model (CPU, gloo), and the checks made before loading.

accelerate runs FSDP only on accelerators; here FSDP is checked through the same preparation functions
accelerate applies (tests/fsdp2_worker.py) and through the environment its launcher sets.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import CPUOffloadPolicy
from transformers import AutoModelForImageTextToText
from trl import SFTConfig

import train
from radiology.config import parse_args
from radiology.distributed import (
    LaunchError,
    check_fsdp_checkpointing,
    check_fsdp_model,
    check_single_process_gpus,
    fsdp_activation_checkpointing,
    fsdp_enabled,
)
from radiology.modeling import device_map_for_process
from radiology.training import check_saved_adapter, save_adapter
from tests.conftest import ROOT, free_port, run_cli
from tests.fixtures import seed_rows, write_seed_parquet

CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
DDP = "recipes/accelerate/ddp.yaml"
FSDP = "recipes/accelerate/fsdp-qlora.yaml"
CPU = ["--use_cpu", "true"]


def launch_env(config_file: str | Path) -> dict[str, str]:
    """The ACCELERATE_*/FSDP_* variables `accelerate launch --config_file ...` gives each process."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config_file), "--main_process_port", "0", "train.py"])
    args, _defaults, _mixed_precision = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def accelerate_launch(*args: str, check: bool = True):
    """`accelerate launch --config_file recipes/accelerate/ddp.yaml ... train.py ARGS`: two processes. The
    tiny recipe's use_cpu makes them train on the CPU over gloo (`accelerate launch --cpu` would start one)."""
    return run_cli("-m", "accelerate.commands.launch", "--config_file", DDP, "--num_processes", "2",
                   "--main_process_port", str(free_port()), "train.py", *args, check=check)


def tiny_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(model), "--dataset_name", str(data),
            "--output_dir", str(out), *extra]


def _listing(folder: Path) -> list[str]:
    """Every file and folder under folder, but the random-number states (one per process in checkpoints)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.name.startswith("rng_state"))


def _adapter_config(folder: Path) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])  # a set, written in any order
    return config


def _state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


# --------------------------------------------------------------------------- the config files


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_parses_with_the_keys_accelerate_knows(config_file):
    config = load_config_from_file(str(config_file))  # unknown top-level keys raise here
    known = {action.dest for action in launch_command_parser()._actions}
    assert not set(config.fsdp_config) - known, "fsdp_config keys that accelerate launch would ignore"
    assert config.mixed_precision == "bf16" and config.num_processes == 2 and not config.use_cpu
    env = launch_env(config_file)  # the launcher's own validation and environment
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert (env.get("ACCELERATE_USE_FSDP") == "true") == (config.distributed_type == "FSDP")


def test_ddp_config_launches_one_process_per_gpu():
    config = load_config_from_file(DDP)
    assert config.distributed_type == "MULTI_GPU" and config.num_machines == 1 and config.gpu_ids == "all"


def test_fsdp_config_shards_both_towers_layer_by_layer(tiny_model_dir, monkeypatch):
    for key, value in launch_env(FSDP).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # read from the environment, as in each launched process
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing  # the trainer's does it
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, model)  # raises on a class name the model lacks
    units = [type(m).__name__ for m in model.modules() if wrap(m)]
    layers = model.config.text_config.num_hidden_layers + model.config.vision_config.num_hidden_layers
    assert sorted(set(units)) == ["Gemma3DecoderLayer", "SiglipEncoderLayer"] and len(units) == layers
    assert fsdp_enabled() and not fsdp_activation_checkpointing()
    check_fsdp_checkpointing()  # the config as shipped passes


# --------------------------------------------------------------------------- DDP on two CPU processes


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir, seed_data_dir):
    """The tiny recipe trained by two processes under accelerate launch (DDP), merged."""
    out = tmp_path_factory.mktemp("ddp") / "out"
    result = accelerate_launch(*tiny_args(tiny_model_dir, seed_data_dir, out))
    return SimpleNamespace(out=out, result=result)


def test_ddp_run_writes_what_a_single_process_writes(ddp_run, trained_run):
    out, single = ddp_run.out, trained_run
    assert _listing(out) == _listing(single), "same files, checkpoints and merged model as one process"
    for checkpoint in ("checkpoint-2", "checkpoint-4"):  # each process's random state, to resume from
        assert sorted(p.name for p in (out / checkpoint).glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    ddp_state, single_state = _state(out / "checkpoint-4"), _state(single / "checkpoint-4")
    # Two processes of 2 rows per step: each step covers twice the data of the single-process run.
    assert ddp_state["global_step"] == single_state["global_step"] == 4
    assert ddp_state["epoch"] == pytest.approx(2 * single_state["epoch"])
    assert _adapter_config(out) == _adapter_config(single)
    weights = load_file(out / "adapter_model.safetensors")
    reference = load_file(single / "adapter_model.safetensors")
    assert {n: (w.shape, w.dtype) for n, w in weights.items()} == {n: (w.shape, w.dtype) for n, w in reference.items()}
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(w.abs().sum() > 0 for n, w in weights.items() if "lora_B" in n), "training moved every LoRA B"
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged", dtype=torch.bfloat16)
    expected = AutoModelForImageTextToText.from_pretrained(single / "merged", dtype=torch.bfloat16)
    assert {n: p.shape for n, p in merged.state_dict().items()} == {n: p.shape for n, p in expected.state_dict().items()}
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()


def test_ddp_run_saves_merges_and_logs_once(ddp_run):
    stdout, stderr = ddp_run.result.stdout, ddp_run.result.stderr
    assert stdout.count("adapter: ") == 1 and stdout.count("merged model: ") == 1, stdout
    assert stderr.count("Training on 2 processes (MULTI_CPU)") == 1, stderr
    assert stderr.count("Merging ") == 1 and stderr.count("radiology.data: Dataset:") == 1, stderr
    assert "Traceback" not in stderr and "find_unused_parameters=True" not in stderr
    assert not list(ddp_run.out.parent.glob("*.partial")), "no half-written merge left behind"


def test_ddp_resume_continues_from_the_checkpoint(ddp_run, tiny_model_dir, seed_data_dir, tmp_path):
    out = tmp_path / "interrupted"
    out.mkdir()
    shutil.copytree(ddp_run.out / "checkpoint-2", out / "checkpoint-2")
    accelerate_launch(*tiny_args(tiny_model_dir, seed_data_dir, out, "--merge", "false",
                                 "--resume_from_checkpoint", "last"))
    steps = [h["step"] for h in _state(out / "checkpoint-4")["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4]  # 1-2 carried over from the checkpoint, 3-4 trained on resume
    resumed = load_file(out / "adapter_model.safetensors")
    original = load_file(ddp_run.out / "adapter_model.safetensors")
    for name in original:  # same data order and seed: the resumed run lands where the full run did
        assert torch.allclose(resumed[name].float(), original[name].float(), atol=1e-2), name


# --------------------------------------------------------------------------- FSDP2 on two CPU processes


def test_fsdp2_shards_the_4bit_recipe_model_without_changing_its_gradients(tiny_model_dir, tmp_path):
    out = tmp_path / "fsdp2.json"
    run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "tests/fsdp2_worker.py", str(tiny_model_dir), str(out), env=launch_env(FSDP))
    found = json.loads(out.read_text())
    assert found["world_size"] == 2 and found["packed_weight_dtypes"] == ["torch.bfloat16"]
    assert found["sharded_layers"] == ["FSDPGemma3DecoderLayer"] * 2 + ["FSDPSiglipEncoderLayer"]
    assert found["checkpointed_layers"] == 3, "the trainer's activation checkpointing covers every sharded layer"
    # LoRA on every linear layer of both towers plus the tied head/embedding, trained in full.
    assert found["trained_weights"] == 41 and found["max_relative_grad_difference"] < 1e-3
    assert found["loss"] == pytest.approx(found["reference_loss"], abs=0.02)  # bf16 rounding of the loss
    assert found["adapter_tensors_saved"] == found["adapter_tensors_expected"] > 0
    assert found["max_relative_saved_difference"] is not None, "the saved adapter's names differ from PEFT's own"
    assert found["max_relative_saved_difference"] < 1e-6


# Two steps with the held-out loss logged at the start and after step 2, one row per evaluation batch.
EVAL_LOSS = ["--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2", "--eval_on_start", "true",
             "--per_device_eval_batch_size", "1", "--eval_max_samples", "5", "--merge", "false"]


def _eval_losses(out: Path) -> list[float]:
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    return [entry["eval_loss"] for entry in history if "eval_loss" in entry]


def test_held_out_loss_is_gathered_across_processes(tmp_path, tiny_model_dir, seed_data_dir):
    run_cli("train.py", *tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "one", *EVAL_LOSS))
    accelerate_launch(*tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "two", *EVAL_LOSS))
    one, two = _eval_losses(tmp_path / "one"), _eval_losses(tmp_path / "two")
    assert len(one) == len(two) == 2  # at the start and after step 2
    # Before any step both runs hold the same weights. Two processes score 3 and 2 rows (plus one repeated
    # to even the shares, dropped again when gathered): their loss must be the single process's over all 5.
    agreement = abs(two[0] - one[0])
    assert agreement <= 1e-5 * one[0]
    # And the figure depends on which rows are scored (3 of them give another), so a process reporting
    # only its own share would not match. (A random model scores every row near ln(vocab), so the rows
    # differ little: the difference is compared with the agreement above, not with a fixed margin.)
    run_cli("train.py", *tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "three", *EVAL_LOSS,
                                   "--eval_max_samples", "3"))
    assert abs(_eval_losses(tmp_path / "three")[0] - one[0]) > max(10 * agreement, 1e-4)


def test_held_out_loss_on_a_missing_split_names_the_splits_found(tmp_path, capsys, tiny_model_dir, seed_data_dir):
    args = tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "out", "--eval_strategy", "steps",
                     "--eval_split", "validation")
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "split 'validation' not found" in err and "test, train" in err and "--eval_split" in err
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_held_out_loss_on_a_split_without_a_usable_row_is_refused_before_loading(tmp_path, capsys, monkeypatch,
                                                                                   tiny_model_dir):
    from datasets import Dataset, Image as ImageFeature

    data = write_seed_parquet(tmp_path / "data", {"train": 4})
    bad = seed_rows(0, bad_rows=True)  # an unreadable image and an empty caption
    Dataset.from_list(bad).cast_column("image", ImageFeature()).to_parquet(str(data / "test.parquet"))
    monkeypatch.setattr("radiology.training.build_trainer", lambda *a, **k: pytest.fail("the model was loaded"))
    assert train.main(tiny_args(tiny_model_dir, data, tmp_path / "out", "--eval_strategy", "steps")) == 2
    err = capsys.readouterr().err
    assert "no usable rows left (0 rows kept; dropped 2: 1 empty caption, 1 unreadable image)" in err


@pytest.fixture
def refuse_loading(monkeypatch):
    """Make loading the data or the model a test failure: for checks that must stop train.py before either."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("the data or the model was loaded before the check that should have stopped it")

    monkeypatch.setattr("radiology.training.load_training_data", must_not_load)
    monkeypatch.setattr("radiology.training.build_trainer", must_not_load)


# --------------------------------------------------------------------------- checks before loading


def test_several_gpus_in_one_process_are_refused_before_loading(monkeypatch, tmp_path, capsys, refuse_loading,
                                                                 tiny_model_dir, seed_data_dir):
    monkeypatch.setattr(SFTConfig, "n_gpu", property(lambda self: 2))  # what 2 visible GPUs give one process
    assert train.main(tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "2 GPUs are visible to this single process" in err
    assert f"accelerate launch --config_file {DDP} --num_processes 2 train.py" in err
    assert "CUDA_VISIBLE_DEVICES=0 python train.py" in err
    check_single_process_gpus(1)
    check_single_process_gpus(0)


def test_device_map_per_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device_map_for_process() == {"": 1}  # DDP: the whole model on this process's GPU
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert device_map_for_process() is None  # FSDP places and shards the weights itself


@pytest.mark.parametrize("flags, message", [
    (["--load_in_8bit", "true", "--load_in_4bit", "false"], "FSDP cannot shard 8-bit"),
    (["--dtype", "float32"], "got --dtype float32 and --bnb_4bit_quant_storage bfloat16"),
    (["--bnb_4bit_quant_storage", "float32"], "got --dtype bfloat16 and --bnb_4bit_quant_storage float32"),
])
def test_fsdp_refuses_weights_it_cannot_shard(monkeypatch, tmp_path, flags, message):
    recipe = ["--config", "recipes/gemma3-27b-qlora.yaml", "--output_dir", str(tmp_path), *CPU]
    _, _, model_args = parse_args([*recipe, *flags])
    check_fsdp_model(model_args)  # without FSDP: nothing to refuse
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LaunchError, match=message):
        check_fsdp_model(model_args)
    check_fsdp_model(parse_args(recipe)[2])  # the recipe as shipped shards


def test_fsdp_own_checkpointing_is_refused_before_loading(monkeypatch, tmp_path, capsys, refuse_loading,
                                                          tiny_model_dir, seed_data_dir):
    for key, value in launch_env(FSDP).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")  # what fsdp_activation_checkpointing: true gives
    assert train.main(tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "fsdp_activation_checkpointing: false" in err and "loses its LoRA weights" in err


def test_save_adapter_gathers_the_full_state_dict_under_fsdp():
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    saved = []
    trainer = SimpleNamespace(
        is_fsdp_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
        save_model=lambda output_dir: saved.append((output_dir, plugin.state_dict_type.name)),
        args=SimpleNamespace(should_save=False),  # a process other than the main one: it gathers, writes nothing
    )
    save_adapter(trainer, "runs/r1")
    # With a sharded type Trainer.save_model writes no weights; the adapter must be gathered whole.
    assert saved == [("runs/r1", "FULL_STATE_DICT")]


def test_an_adapter_saved_without_its_lora_weights_is_an_error(tmp_path):
    head = {"base_model.model.lm_head.weight": torch.zeros(4, 2)}
    lora = {"base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 2)}
    save_file(head, tmp_path / "adapter_model.safetensors")  # what PEFT wrote when it missed the LoRA layers
    with pytest.raises(RuntimeError, match="holds no LoRA weights"):
        check_saved_adapter(tmp_path)
    save_file({**head, **lora}, tmp_path / "adapter_model.safetensors")
    check_saved_adapter(tmp_path)
