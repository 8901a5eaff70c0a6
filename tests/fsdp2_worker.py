"""One process of the FSDP2 check in tests/test_distributed.py, on CPUs (gloo), started by torchrun with the
environment that `accelerate launch --config_file recipes/accelerate/fsdp-qlora.yaml` gives its processes:

    torchrun --nproc_per_node 2 tests/fsdp2_worker.py TINY_MODEL_DIR OUT.json

accelerate runs FSDP only on accelerators, so its Trainer path cannot run here; this process takes the
trainer's steps for FSDP2 (its non-reentrant activation checkpointing, accelerate's fsdp2_prepare_model with
the plugin that the config's environment describes, then the gathered state dict handed to the PEFT model's
save_pretrained) on the tiny Gemma 3 loaded as train.py loads it (4-bit NF4 stored in bf16, LoRA on every
linear layer, the tied lm_head/embed_tokens trained in full). An unsharded copy with the same trained
weights takes the same forward and backward. Rank 0 writes both losses and the largest relative
differences between their gradients and between the saved adapter's weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import yaml
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from trl import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radiology.collate import CaptionCollator  # noqa: E402
from radiology.config import recipe_defaults  # noqa: E402
from radiology.distributed import check_fsdp_model  # noqa: E402
from radiology.modeling import load_processor, load_training_model, lora_config  # noqa: E402
from radiology.training import check_saved_adapter  # noqa: E402
from tests.fixtures import real_images  # noqa: E402


def _recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "recipes" / name).read_text())


def _model_args(model_dir: str) -> ModelConfig:
    recipe = {**recipe_defaults(), **_recipe("tiny-cpu.yaml")}
    fields = {k: v for k, v in recipe.items() if k in ModelConfig.__dataclass_fields__}
    return ModelConfig(**{**fields, "model_name_or_path": model_dir})


def _peft_model(args: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)  # as SFTTrainer seeds before PEFT: every process starts from the same adapter
    model = get_peft_model(load_training_model(args), lora_config(args))
    for param in model.parameters():  # as SFTTrainer does for a 4-bit base: adapter weights in bf16
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    model.train()
    return model


def _accelerator() -> SimpleNamespace:
    """What fsdp2_apply_ac and fsdp2_prepare_model read from an Accelerator, the plugin built from the env."""
    plugin = FullyShardedDataParallelPlugin()  # FSDP_* variables, as accelerate launch set them
    plugin.set_mixed_precision(os.environ["ACCELERATE_MIXED_PRECISION"])
    return SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, device=torch.device("cpu"),
        mixed_precision=os.environ["ACCELERATE_MIXED_PRECISION"], is_main_process=dist.get_rank() == 0,
    )


def _prepare(model: torch.nn.Module) -> torch.nn.Module:
    accelerator = _accelerator()
    assert not accelerator.state.fsdp_plugin.activation_checkpointing, "the config leaves checkpointing to the trainer"
    # What the Trainer does before accelerate wraps the model, with the recipes' activation_checkpointing_kwargs.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return fsdp2_prepare_model(accelerator, model)


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    got = got.full_tensor() if isinstance(got, DTensor) else got
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    processor = load_processor(model_dir)
    images = list(real_images().values())[:2]
    batch = CaptionCollator(processor, "Describe this image.")(
        [{"image": image, "caption": caption} for image, caption in zip(images, ["Axial CT: a mass.", "Clear lungs."])]
    )
    args = _model_args(model_dir)
    check_fsdp_model(args)

    reference = _peft_model(args)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would leave A without a gradient to compare
                param.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
    trained = {name for name, param in reference.named_parameters() if param.requires_grad}
    sharded = _peft_model(args)
    sharded.load_state_dict({k: v for k, v in reference.state_dict().items() if k in trained}, strict=False)
    packed = sorted({str(p.dtype) for p in sharded.parameters() if type(p).__name__ == "Params4bit"})
    sharded = _prepare(sharded)

    loss = sharded(**batch).loss
    loss.backward()
    reference_loss = reference(**batch).loss
    reference_loss.backward()

    expected = dict(reference.named_parameters())
    grads = {}
    for name, param in sharded.named_parameters():
        if name in trained:
            grads[name] = _relative(param.grad, expected[name].grad)
    # The adapter as save_model gathers it (accelerate's get_state_dict for FSDP2), 4-bit weights included;
    # a collective call, whose result only rank 0 receives and writes through the sharded PEFT model, as the
    # Trainer's _save does (names and all: a renamed layer would lose its LoRA weights here).
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    if dist.get_rank() == 0:
        saved_dir = Path(out).with_suffix(".adapter")
        sharded.save_pretrained(saved_dir, state_dict=full)
        check_saved_adapter(saved_dir)
        adapter = load_file(saved_dir / "adapter_model.safetensors")
        wanted = get_peft_model_state_dict(reference)
        saved = max(_relative(adapter[k], wanted[k]) for k in wanted) if adapter.keys() == wanted.keys() else None
        Path(out).write_text(json.dumps({
            "world_size": dist.get_world_size(),
            "loss": loss.item(),
            "reference_loss": reference_loss.item(),
            "trained_weights": len(grads),
            "max_relative_grad_difference": max(grads.values()),
            "adapter_tensors_saved": len(adapter),
            "adapter_tensors_expected": len(wanted),
            "max_relative_saved_difference": saved,
            "packed_weight_dtypes": packed,
            "checkpointed_layers": sum(1 for m in sharded.modules() if getattr(m, "gradient_checkpointing", False)
                                       and type(m).__name__.endswith("Layer")),
            "sharded_layers": sorted(type(m).__name__ for m in sharded.modules() if "Layer" in type(m).__name__
                                     and type(m).__name__.startswith("FSDP")),
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
