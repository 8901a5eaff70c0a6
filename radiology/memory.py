"""GPU memory: readings for the training logs and for the app's model panel.

    python -m radiology.memory                  # the GPU and its memory in use, or that there is none
    python -m radiology.memory --model runs/r1/merged   # and that model's footprint once loaded

Training logs this process's allocated, reserved and peak GPU memory with the loss at each logging
step (``GpuMemoryCallback``, wired in ``radiology.training.build_trainer``), so TensorBoard plots them
too, and warns once, as soon as a step takes the card near its limit. Without CUDA nothing is
measured: the first log record carries ``gpu_memory: "no CUDA device"`` and no numbers.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = [
    "NO_CUDA",
    "GpuMemory",
    "GpuMemoryCallback",
    "MemoryStatus",
    "format_bytes",
    "memory_status",
    "model_footprint",
    "read_gpu_memory",
]

logger = logging.getLogger(__name__)

NO_CUDA = "no CUDA device"
GIB = 1024**3


@dataclass(frozen=True)
class GpuMemory:
    """One reading of a CUDA device's memory, in bytes."""

    name: str
    index: int
    allocated: int  # held by this process's live tensors
    reserved: int  # held by this process's caching allocator (what it has taken from the card)
    peak_allocated: int  # highest ``allocated`` since the process started
    peak_reserved: int
    used: int  # in use on the whole card, by every process (the driver's count)
    total: int

    @property
    def fraction_used(self) -> float:
        """The card's fill level as far as this process can tell: its peak reservation or the driver's count."""
        return max(self.peak_reserved, self.used) / self.total


def read_gpu_memory(device: int | None = None) -> GpuMemory | None:
    """The memory of CUDA ``device`` (default: this process's current one), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device is None else device
    free, total = torch.cuda.mem_get_info(index)
    return GpuMemory(
        name=torch.cuda.get_device_name(index),
        index=index,
        allocated=torch.cuda.memory_allocated(index),
        reserved=torch.cuda.memory_reserved(index),
        peak_allocated=torch.cuda.max_memory_allocated(index),
        peak_reserved=torch.cuda.max_memory_reserved(index),
        used=total - free,
        total=total,
    )


def format_bytes(count: int) -> str:
    """``1536`` -> ``"1.5 KiB"``; binary units, as nvidia-smi and PyTorch count."""
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def model_footprint(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (``get_memory_footprint`` where the model has it)."""
    if hasattr(model, "get_memory_footprint"):  # PeftModel forwards it to the wrapped model
        return int(model.get_memory_footprint())
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.nelement() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class MemoryStatus:
    """What the app's model panel shows: the GPU and its memory in use, and the model's footprint."""

    gpu: GpuMemory | None  # None: no CUDA device, so there is nothing to read
    model_footprint: int | None  # bytes; None when no model was given

    def describe(self) -> str:
        """Two short lines for a person: the GPU's memory in use (or that there is none), the model's size."""
        if self.gpu is None:
            gpu = f"GPU: none ({NO_CUDA}; running on the CPU)"
        else:
            gpu = (
                f"GPU: {self.gpu.name}, {format_bytes(self.gpu.used)} of {format_bytes(self.gpu.total)} in use "
                f"({self.gpu.used / self.gpu.total:.0%})"
            )
        if self.model_footprint is None:
            return gpu
        return f"{gpu}\nModel footprint: {format_bytes(self.model_footprint)}"


def memory_status(model: torch.nn.Module | None = None, device: int | None = None) -> MemoryStatus:
    """The GPU (if any) with its memory in use, and ``model``'s footprint (if given)."""
    return MemoryStatus(
        gpu=read_gpu_memory(device),
        model_footprint=None if model is None else model_footprint(model),
    )


def _gib(count: int) -> float:
    return round(count / GIB, 3)


class GpuMemoryCallback(TrainerCallback):
    """Adds GPU memory to every log record and warns once when a step takes the card near its limit.

    Put it first in the trainer's callback list: ``Trainer.log`` hands one logs dict to the callbacks
    in order, so the reporting ones after it (TensorBoard, console) see the added fields.
    """

    def __init__(self, warn_fraction: float = 0.9, read: Callable[[], GpuMemory | None] = read_gpu_memory):
        if not 0 < warn_fraction <= 1:
            raise ValueError("warn_fraction must be in (0, 1], e.g. 0.9 to warn at 90% of the card's memory")
        self.warn_fraction = warn_fraction
        self.read = read
        self.warned = False
        self._noted_no_cuda = False

    def log_fields(self) -> dict[str, Any]:
        """The fields for one log record: numbers in GiB, or once a note that there is no GPU to measure."""
        reading = self.read()
        if reading is None:
            if self._noted_no_cuda:
                return {}
            self._noted_no_cuda = True
            return {"gpu_memory": NO_CUDA}
        return {
            "gpu_mem_allocated_gib": _gib(reading.allocated),
            "gpu_mem_reserved_gib": _gib(reading.reserved),
            "gpu_mem_peak_gib": _gib(reading.peak_allocated),
            "gpu_mem_total_gib": _gib(reading.total),
        }

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        reading = self.read()
        if reading is None:
            logger.info("GPU memory: %s, so no memory readings are logged", NO_CUDA)
        else:
            logger.info("GPU memory: %s, %s of %s in use at the start of training",
                        reading.name, format_bytes(reading.used), format_bytes(reading.total))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        # Every step, not only logging steps: the point is to warn before the run dies, not after.
        if self.warned:
            return
        reading = self.read()
        if reading is None or reading.fraction_used < self.warn_fraction:
            return
        self.warned = True
        logger.warning(
            "GPU memory near the limit at step %d: %s of %s (%.0f%%) on %s. To keep clear of running out, lower "
            "--per_device_train_batch_size (raise --gradient_accumulation_steps to keep the effective batch), "
            "lower --max_length, or keep --activation_checkpointing on.",
            state.global_step, format_bytes(max(reading.peak_reserved, reading.used)), format_bytes(reading.total),
            100 * reading.fraction_used, reading.name,
        )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        fields = self.log_fields()
        if logs is None or not fields:
            return
        logs.update(fields)
        # Trainer.log appended a copy of this record to log_history before calling the callbacks;
        # update that copy too, so the fields reach trainer_state.json.
        if state.log_history:
            state.log_history[-1].update(fields)


def main(argv: list[str] | None = None) -> None:
    """Print the GPU, its memory in use and (with --model) the model's footprint."""
    parser = argparse.ArgumentParser(description="Show the GPU and its memory in use (and a model's footprint).")
    parser.add_argument("--model", default=None, help="a model folder or hub id to load and measure (bf16)")
    args = parser.parse_args(argv)
    model = None
    if args.model is not None:
        from transformers import AutoModelForImageTextToText

        device_map = {"": "cuda"} if torch.cuda.is_available() else None
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16, device_map=device_map)
    print(memory_status(model).describe())


if __name__ == "__main__":
    main()
