"""Training stage in-process: what trains and what stays frozen, attention over images, refusals."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

import train
from radiology.config import parse_args
from radiology.generate import build_inputs
from radiology.modeling import HardwareError, check_bf16_support
from radiology.training import (
    OutputFolderError,
    build_trainer,
    check_output_dir,
    checkpoint_problem,
    load_training_data,
)
from tests.fixtures import real_images


def tiny_args(tiny_model_dir, seed_data_dir, out, *extra):
    return ["--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
            "--dataset_name", str(seed_data_dir), "--output_dir", str(out), *extra]


def test_lora_and_tied_embedding_train_while_the_base_stays_frozen(tiny_model_dir, seed_data_dir, tmp_path):
    script, training, model_args = parse_args(tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "o",
                                                         "--max_steps", "2", "--save_strategy", "no"))
    trainer = build_trainer(script, training, model_args, load_training_data(script, training))
    model = trainer.model
    def raw(p: torch.Tensor) -> torch.Tensor:
        # Packed NF4 weights stored as bf16 can hold NaN bit patterns: compare the bytes.
        return p.detach().contiguous().view(torch.uint8).clone()

    before = {n: raw(p) for n, p in model.named_parameters()}
    packed = {n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    trainer.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("vision_tower" in n and "lora_" in n for n in trainable)
    assert any("embed_tokens" in n for n in trainable)
    changed = {n for n, p in model.named_parameters() if not torch.equal(raw(p), before[n])}
    assert changed and changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:3]}"
    assert any("lora_B" in n and "vision_tower" in n for n in changed), "the vision tower's LoRA must learn"
    assert any("embed_tokens" in n for n in changed)
    assert packed and not packed & changed, "the 4-bit base is frozen"
    # One trained copy of the tied matrix: the head reads the same storage as the embedding.
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.data_ptr() == embed.weight.data_ptr()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_image_tokens_attend_to_each_other_both_ways(tiny_model_dir, attn):
    """Gemma 3 attends bidirectionally inside an image block and causally elsewhere."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                        attn_implementation=attn).eval()
    inputs = build_inputs(processor, real_images()["rgb"], "Describe.")
    image_positions = (inputs["input_ids"][0] == processor.tokenizer.image_token_id).nonzero().flatten()
    first, last = int(image_positions[0]), int(image_positions[-1])

    def hidden(perturb_last_image_token: bool) -> torch.Tensor:
        def bump(module, args, output):
            if perturb_last_image_token:
                output = output.clone()
                output[:, -1] += 1.0  # the last soft token of the image
            return output

        handle = model.model.multi_modal_projector.register_forward_hook(bump)
        try:
            with torch.no_grad():
                return model(**inputs, output_hidden_states=True).hidden_states[-1][0]
        finally:
            handle.remove()

    change = (hidden(False) - hidden(True)).abs().sum(-1)
    assert change[first] > 1e-3, "the first image token must see the last one (bidirectional)"
    assert change[first - 1] == 0, "text before the image must not see it (causal)"
    assert change[last + 2:].min() > 0, "text after the image sees it"


def test_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    with pytest.raises(HardwareError, match="Tesla T4 does not support bfloat16.*Ampere or newer"):
        check_bf16_support()


def test_existing_run_is_never_overwritten_by_accident(tmp_path):
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(OutputFolderError, match="checkpoint-10.*--resume_from_checkpoint last.*--overwrite_output_dir"):
        check_output_dir(str(tmp_path), resume=None, overwrite=False)
    check_output_dir(str(tmp_path), resume=str(tmp_path / "checkpoint-10"), overwrite=False)
    check_output_dir(str(tmp_path), resume=None, overwrite=True)


def test_existing_merged_model_is_refused_before_training(tiny_model_dir, seed_data_dir, tmp_path, capsys):
    merged = tmp_path / "out" / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    assert train.main(tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "out")) == 2
    assert "already holds a merged model" in capsys.readouterr().err
    assert (merged / "config.json").read_text() == "{}"


@pytest.mark.parametrize("extra, message", [
    (["--caption_column", "findings"], "column 'findings' not found; columns found: image, image_id, caption, cui"),
    (["--dataset_train_split", "validation"], "splits found: test, train"),
    (["--resume_from_checkpoint", "last"], "no checkpoint-* folder"),
])
def test_bad_input_exits_with_a_clear_error(tiny_model_dir, seed_data_dir, tmp_path, capsys, extra, message):
    assert train.main(tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_wrong_dataset_path_exits_with_a_clear_error(tiny_model_dir, tmp_path, capsys):
    assert train.main(tiny_args(tiny_model_dir, tmp_path / "missing", tmp_path / "out")) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("scope", ["all", "vision", "text"])
def test_checkpointing_scope_picks_the_recomputed_layers(tiny_model_dir, seed_data_dir, tmp_path, scope):
    from transformers.modeling_layers import GradientCheckpointingLayer

    script, training, model_args = parse_args(tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "o", "--max_steps",
                                                        "1", "--save_strategy", "no", "--checkpointing_scope", scope,
                                                        "--merge", "false"))
    trainer = build_trainer(script, training, model_args, load_training_data(script, training))
    trainer.train()
    layers = {name: m.gradient_checkpointing for name, m in trainer.model.named_modules()
              if isinstance(m, GradientCheckpointingLayer)}
    vision = {v for n, v in layers.items() if "vision_tower" in n}
    text = {v for n, v in layers.items() if "language_model" in n}
    assert vision == {scope in ("all", "vision")} and text == {scope in ("all", "text")}


def test_out_of_memory_is_a_clear_error_naming_the_fix(tiny_model_dir, seed_data_dir, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "run_training", out_of_memory)
    assert train.main(tiny_args(tiny_model_dir, seed_data_dir, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in err
    assert "--per_device_train_batch_size" in err and "--resume_from_checkpoint last" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- output folders and resuming


def _sha256s(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_model_folder_is_refused_as_output_and_left_untouched(trained_run, tiny_model_dir, seed_data_dir, tmp_path,
                                                                capsys, refuse_loading):
    merged = shutil.copytree(trained_run / "merged", tmp_path / "merged")
    before = _sha256s(merged)
    # Also with --resume_from_checkpoint: a run continues in its own folder, never in a merged model's.
    for extra in ([], ["--resume_from_checkpoint", str(trained_run / "checkpoint-2")]):
        assert train.main(tiny_args(tiny_model_dir, seed_data_dir, merged, *extra)) == 2
        err = capsys.readouterr().err
        assert f"{merged} already holds a model (config.json, " in err
        assert "--output_dir" in err and "--overwrite_output_dir" in err and "Traceback" not in err
    assert _sha256s(merged) == before


def test_an_adapter_folder_is_refused_as_output(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(OutputFolderError, match="already holds a model .*--overwrite_output_dir"):
        check_output_dir(str(tmp_path), resume=None, overwrite=False)
    check_output_dir(str(tmp_path), resume=None, overwrite=True)


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """The tiny run as an interrupted run leaves it (checkpoint-2 and checkpoint-4, no adapter or merged/ yet),
    to damage."""
    run = tmp_path / "run"
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(trained_run / checkpoint, run / checkpoint)
    return run


def _cut_short(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage, problem", [
    (lambda c: _cut_short(c / "adapter_model.safetensors"), "adapter_model.safetensors is cut short or damaged"),
    (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda c: _cut_short(c / "optimizer.pt"), "optimizer.pt is cut short or damaged"),
])
def test_a_damaged_last_checkpoint_names_the_problem_and_the_older_one(run_copy, tiny_model_dir, seed_data_dir, capsys,
                                                                       refuse_loading, damage, problem):
    damage(run_copy / "checkpoint-4")
    assert train.main(tiny_args(tiny_model_dir, seed_data_dir, run_copy, "--resume_from_checkpoint", "last")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"cannot resume from {run_copy / 'checkpoint-4'}: {problem}" in err
    assert f"continue from it with --resume_from_checkpoint {run_copy / 'checkpoint-2'}" in err


def test_no_usable_checkpoint_says_how_to_start_again(run_copy, tiny_model_dir, seed_data_dir, capsys, refuse_loading):
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        (run_copy / checkpoint / "trainer_state.json").unlink()
    assert train.main(tiny_args(tiny_model_dir, seed_data_dir, run_copy, "--resume_from_checkpoint",
                                str(run_copy / "checkpoint-4"))) == 2
    err = capsys.readouterr().err
    assert "No older usable checkpoint" in err and "--overwrite_output_dir" in err


def test_resuming_from_the_older_checkpoint_works_and_says_where_it_continued(run_copy, tiny_model_dir, seed_data_dir,
                                                                              capsys):
    _cut_short(run_copy / "checkpoint-4" / "adapter_model.safetensors")
    older = run_copy / "checkpoint-2"
    assert train.main(tiny_args(tiny_model_dir, seed_data_dir, run_copy, "--resume_from_checkpoint", str(older))) == 0
    assert f"Resuming from {older} (saved at step 2)" in capsys.readouterr().err
    assert checkpoint_problem(run_copy / "checkpoint-4") is None  # saved again, whole


def test_max_length_too_short_for_the_largest_study_stops_before_the_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    from tests.fixtures import write_study_dataset

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --max_length was checked")

    monkeypatch.setattr("radiology.training.load_training_model", must_not_load)
    data = write_study_dataset(tmp_path / "studies")
    code = train.main(tiny_args(tiny_model_dir, data, tmp_path / "out", "--images_column", "images",
                                "--prior_image_column", "prior", "--id_column", "study", "--max_length", "120"))
    err = capsys.readouterr().err
    assert code == 2, err
    # The largest row is the MR series' 7 slices (165 prompt tokens on the tiny model).
    assert "error: 7 images need 165+ tokens" in err
    assert "--max_length 120 is too short: raise it to at least" in err and "or lower --max_images (now 8)" in err
