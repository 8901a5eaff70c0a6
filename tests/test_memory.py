"""GPU memory: log fields with the loss (trainer_state.json and TensorBoard), the early warning, and
the status the app shows. On the CPU every one of them must say there is no GPU, never show zeros."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from radiology.memory import (
    NO_CUDA,
    GpuMemory,
    GpuMemoryCallback,
    format_bytes,
    memory_status,
    read_gpu_memory,
)

GIB = 1024**3


def reading(used_gib: float, total_gib: float = 80.0) -> GpuMemory:
    """A made-up card reading for the callback's logic (the real reader needs a GPU)."""
    used = int(used_gib * GIB)
    return GpuMemory(name="Test GPU", index=0, allocated=used // 2, reserved=used - GIB, peak_allocated=used - GIB,
                     peak_reserved=used - GIB, used=used, total=int(total_gib * GIB))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_status_without_cuda_says_there_is_no_gpu_and_measures_the_model(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    assert read_gpu_memory() is None
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    status = memory_status(model)
    assert status.gpu is None
    expected = sum(t.nelement() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert status.model_footprint == expected
    gpu_line, model_line = status.describe().splitlines()
    assert NO_CUDA in gpu_line and not any(ch.isdigit() for ch in gpu_line)
    assert model_line == f"Model footprint: {format_bytes(expected)}"
    assert memory_status().describe() == gpu_line  # no model: no footprint line


@pytest.mark.gpu
def test_status_on_a_gpu_reports_real_readings():
    status = memory_status()
    assert status.gpu is not None and status.gpu.total > 0
    assert status.gpu.name in status.describe()


def test_describe_with_a_gpu_reading():
    status = type(memory_status())(gpu=reading(20.0), model_footprint=3 * GIB)
    assert status.describe() == "GPU: Test GPU, 20.0 GiB of 80.0 GiB in use (25%)\nModel footprint: 3.0 GiB"


def test_log_fields_are_numbers_with_a_gpu_and_one_note_without():
    with_gpu = GpuMemoryCallback(read=lambda: reading(20.0))
    fields = with_gpu.log_fields()
    assert fields == {"gpu_mem_allocated_gib": 10.0, "gpu_mem_reserved_gib": 19.0, "gpu_mem_peak_gib": 19.0,
                      "gpu_mem_total_gib": 80.0}
    assert with_gpu.log_fields() == fields  # every record carries them
    without = GpuMemoryCallback(read=lambda: None)
    assert without.log_fields() == {"gpu_memory": NO_CUDA}
    assert without.log_fields() == {}  # said once, not on every record


def test_warns_once_as_soon_as_a_step_nears_the_limit(caplog):
    levels = iter([50.0, 70.0, 74.0, 79.0, 79.5])
    callback = GpuMemoryCallback(warn_fraction=0.9, read=lambda: reading(next(levels)))
    state = type("State", (), {"global_step": 0})()
    with caplog.at_level(logging.WARNING, logger="radiology.memory"):
        for step in range(1, 6):
            state.global_step = step
            callback.on_step_end(None, state, None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "step 3" in warnings[0] and "74.0 GiB of 80.0 GiB" in warnings[0]
    assert "--per_device_train_batch_size" in warnings[0]
    with pytest.raises(ValueError, match="warn_fraction"):
        GpuMemoryCallback(warn_fraction=1.5)


def test_build_trainer_logs_memory_to_the_history_and_tensorboard(tmp_path, monkeypatch, tiny_model_dir,
                                                                  seed_data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from radiology.config import parse_args
    from radiology.training import build_trainer, load_training_data

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    script_args, training_args, model_args = parse_args([
        "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
        "--dataset_name", str(seed_data_dir), "--output_dir", str(tmp_path / "out"), "--report_to", "tensorboard",
    ])
    trainer = build_trainer(script_args, training_args, model_args, load_training_data(script_args, training_args))
    callback = trainer.callback_handler.callbacks[0]
    assert isinstance(callback, GpuMemoryCallback)
    callback.read = lambda: reading(20.0)  # stands in for a GPU, so the numbers' path is exercised on CPU
    trainer.log({"loss": 1.25})
    record = trainer.state.log_history[-1]
    assert record["loss"] == 1.25 and record["gpu_mem_reserved_gib"] == 19.0 and record["gpu_mem_peak_gib"] == 19.0
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.value for e in events.Scalars("train/gpu_mem_reserved_gib")] == [19.0]
    assert [e.value for e in events.Scalars("train/loss")] == [1.25]


def test_training_run_logs_memory_with_the_loss(trained_run):
    history = json.loads((trained_run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    losses = [record for record in history if "loss" in record]
    assert len(losses) == 4
    if torch.cuda.is_available():
        assert all(record["gpu_mem_peak_gib"] > 0 for record in losses)
    else:
        # Said once, in the first record, and no number anywhere pretends to be a reading.
        assert losses[0]["gpu_memory"] == NO_CUDA
        assert not any(key.startswith("gpu_mem_") for record in history for key in record)
        assert sum("gpu_memory" in record for record in history) == 1
