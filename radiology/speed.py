"""Training speed options of train.py, each off by default until measured on the GPU (bench/train_throughput.py).

    python train.py --config recipes/gemma3-4b-qlora.yaml --pure_bf16 true \
        --checkpointing_layers auto --checkpointing_budget_gib 29.5 --compile_blocks all

What each one changes, and why it is expected to pay (predictions and outcomes: bench/train_throughput.notes.md):

- ``--checkpointing_layers``: which layers recompute their activations in the backward pass. ``all`` (the
  default) checkpoints every layer that ``--checkpointing_scope`` names; ``vision=N,text=M`` checkpoints only
  the first N layers of the vision tower and the first M of the language model (the others keep their
  activations); ``auto`` measures the first step with every layer checkpointed, then keeps as many layers'
  activations as ``--checkpointing_budget_gib`` leaves room for, by the memory model below: the text layers'
  first (``auto:vision``: the vision layers' first). Every layer kept
  saves its recompute (a whole extra forward of that layer) at the price of its activations.
- ``--pure_bf16``: no autocast. The model is loaded in bf16 and TRL keeps the LoRA adapters of a 4-bit model in
  bf16, yet autocast runs layer norms (SigLIP's, twice per layer) in fp32, so the vision tower's residual stream
  and every LoRA and 4-bit layer around it go through fp32 copies (``aten::copy_`` was 26% of GPU time). Without
  autocast everything stays bf16; norms and the loss still accumulate in fp32 inside their kernels (Gemma's
  RMSNorm upcasts explicitly, TRL's fused LM head accumulates in fp32). Optimizer precision is unchanged: the
  adapters were already bf16 parameters (TRL casts them for a quantized model).
- ``--compile_blocks``: ``torch.compile`` of each decoder and/or vision encoder layer's forward, one compiled
  function per layer class (identical layers share the code), inside activation checkpointing (the checkpoint
  stays outside, so changing which layers are checkpointed never recompiles). It fuses the elementwise work
  around LoRA (dropout, scaling, the clone PEFT makes after a 4-bit layer, the add) and the norms: fewer,
  larger kernels. Sequence lengths vary from batch to batch: decoder layers compile with symbolic shapes from
  the start (on the tiny model: 2 graphs over 8 steps of varying length, against 3 with automatic dynamic
  shapes); the vision layers' shapes are fixed (4096 patches per image) and compile static.

The linear cross-entropy needs no option: TRL 1.16's SFTTrainer already projects only the positions that carry
a loss through the LM head, in vocabulary tiles (Triton kernels on the GPU), so the 262k-wide logits are never
materialised in training.

The memory model behind ``auto`` (bytes one layer keeps for its backward, per token; bf16 = 2 bytes):
  a LoRA-wrapped linear with input width n keeps its dropout output and mask (3n; 2n once per shared input
  without dropout) and the rank-r intermediate (2r); a 4-bit base layer keeps nothing of its input (its weight
  is frozen); attention keeps q, k, v, its output and the log-sum-exp; a LayerNorm keeps its input (2d) and two
  fp32 statistics; Gemma's RMSNorm keeps an fp32 copy of its input (4d); GELU keeps its input and the gated
  product both factors. At the 4B shape, r=16, dropout 0.05, that is ~53 KB per vision token (4096 per image:
  ~0.20 GiB per layer per image) and ~203 KB per text token (~0.08 GiB per layer per 430-token sample). Under
  autocast the vision tower keeps fp32 copies: about 2f + 4d bytes more per vision token.
"""

from __future__ import annotations

import functools
import logging
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer

__all__ = [
    "COMPILE_SCOPES",
    "TOWERS",
    "CheckpointSelection",
    "LayerCheckpointing",
    "LoraShape",
    "apply_checkpointing",
    "apply_speed_options",
    "check_precision",
    "check_speed_options",
    "compile_blocks",
    "configure_precision",
    "layer_bytes_per_token",
    "layer_towers",
    "parse_checkpointing_layers",
    "plan_checkpointing",
]

logger = logging.getLogger(__name__)

TOWERS = ("vision", "text")
COMPILE_SCOPES = ("none", "vision", "text", "all")
GIB = 1024**3
# Left free under --checkpointing_budget_gib by auto: allocator fragmentation, longer batches than the measured one.
AUTO_MARGIN = 0.08
# Kept layers are chosen text first: a text layer's recompute is short matmuls and many small kernels (Gemma's
# four norms, q/k norms, rotary), so it costs more time per byte it frees than a vision layer's large matmuls.
AUTO_ORDER = ("text", "vision")


# ----------------------------------------------------------------------------- option parsing


@dataclass(frozen=True)
class CheckpointSelection:
    """How many layers of each tower are checkpointed, counted from the first; None: all of them."""

    vision: int | None = None
    text: int | None = None
    auto: bool = False
    order: tuple[str, ...] = AUTO_ORDER  # auto: the tower that gives up its checkpointing first, then the other


_SPEC_HELP = ("all, auto (auto:text, auto:vision: which tower keeps its activations first), or vision=N,text=M "
              "(N, M: how many layers, from the first, recompute; or all)")


def parse_checkpointing_layers(spec: str) -> CheckpointSelection:
    """``all`` | ``auto`` | ``auto:text`` | ``auto:vision`` | ``vision=N,text=M`` (either part may be left out:
    that tower checkpoints all its layers)."""
    text = spec.strip().lower()
    if text in ("all", ""):
        return CheckpointSelection()
    if text in ("auto", "auto:text", "auto:vision"):
        first = text.partition(":")[2] or AUTO_ORDER[0]
        return CheckpointSelection(auto=True, order=(first, *[t for t in TOWERS if t != first]))
    counts: dict[str, int | None] = {}
    for part in text.split(","):
        match = re.fullmatch(r"\s*(vision|text)\s*=\s*(\d+|all)\s*", part)
        if match is None or match.group(1) in counts:
            raise ValueError(f"--checkpointing_layers {spec!r}: expected {_SPEC_HELP}, e.g. vision=27,text=0")
        counts[match.group(1)] = None if match.group(2) == "all" else int(match.group(2))
    return CheckpointSelection(**counts)


def check_speed_options(args: Any) -> None:
    """Fail at parse time, before any loading, on a malformed speed option (RadiologyArguments calls this)."""
    selection = parse_checkpointing_layers(args.checkpointing_layers)
    if args.compile_blocks not in COMPILE_SCOPES:
        raise ValueError(f"--compile_blocks must be one of {', '.join(COMPILE_SCOPES)} (got {args.compile_blocks!r})")
    if args.checkpointing_budget_gib is not None:
        if args.checkpointing_budget_gib <= 0:
            raise ValueError("--checkpointing_budget_gib must be a positive number of GiB, e.g. 29.5")
        if not selection.auto:
            raise ValueError("--checkpointing_budget_gib is read by --checkpointing_layers auto only: add it, or drop "
                             "the budget")


# ----------------------------------------------------------------------------- which layers


def layer_towers(model: torch.nn.Module) -> dict[str, list[GradientCheckpointingLayer]]:
    """The checkpointable layers of each tower, in forward order: the vision encoder's and the language model's."""
    towers: dict[str, list[GradientCheckpointingLayer]] = {tower: [] for tower in TOWERS}
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer):
            towers["vision" if "vision_tower" in name else "text"].append(module)
    return towers


def apply_checkpointing(model: torch.nn.Module, counts: dict[str, int | None],
                        towers: dict[str, list[GradientCheckpointingLayer]] | None = None) -> dict[str, int]:
    """Checkpoint the first ``counts[tower]`` layers of each tower (None: all), the rest keep their activations.
    Only layers the trainer enabled checkpointing on are touched. Returns how many are checkpointed per tower."""
    done: dict[str, int] = {}
    for tower, layers in (towers or layer_towers(model)).items():
        enabled = [layer for layer in layers if getattr(layer, "_gradient_checkpointing_func", None) is not None]
        keep = len(enabled) if counts.get(tower) is None else min(counts[tower], len(enabled))
        for index, layer in enumerate(enabled):
            layer.gradient_checkpointing = index < keep
        done[tower] = sum(layer.gradient_checkpointing for layer in enabled)
    return done


# ----------------------------------------------------------------------------- memory model


@dataclass(frozen=True)
class LoraShape:
    """What the memory model needs of the adapter: its rank, its dropout and which towers carry it."""

    r: int
    dropout: float
    towers: frozenset[str]

    @classmethod
    def of(cls, model: torch.nn.Module) -> LoraShape:
        config = next(iter(getattr(model, "peft_config", {}).values()), None)
        trained = set()
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" in name:
                trained.add("vision" if "vision_tower" in name else "text")
        return cls(r=getattr(config, "r", 0), dropout=float(getattr(config, "lora_dropout", 0.0)),
                   towers=frozenset(trained))


def _lora_bytes(width: int, sharing: int, lora: LoraShape) -> int:
    """Bytes per token kept by ``sharing`` LoRA-wrapped linears that read the same input of ``width``."""
    if lora.dropout > 0:  # each adapter draws its own dropout: output (bf16) and mask (bool)
        return sharing * (3 * width + 2 * lora.r)
    return 2 * width + sharing * 2 * lora.r


def layer_bytes_per_token(config: Any, tower: str, lora: LoraShape, autocast: bool = False) -> int:
    """Activation bytes one layer of ``tower`` keeps for its backward, per token (see the module docstring).
    A tower without LoRA keeps nothing: no gradient flows through it (the vision tower of the fast recipe);
    the language model always does (the trained embedding feeds it)."""
    if tower == "vision":
        if "vision" not in lora.towers:
            return 0
        v = config.vision_config
        d, f, heads = v.hidden_size, v.intermediate_size, v.num_attention_heads
        layer_norms = 2 * (2 * d + 8)
        attention = 3 * 2 * d + 2 * d + 4 * heads
        total = layer_norms + attention + 2 * f  # + GELU's input
        total += _lora_bytes(d, 3, lora) + _lora_bytes(d, 1, lora) + _lora_bytes(d, 1, lora) + _lora_bytes(f, 1, lora)
        if autocast:  # fp32 LayerNorm outputs: the residual stream and fc1's output stay fp32
            total += 2 * f + 4 * d
        return total
    t = config.get_text_config()
    d, f = t.hidden_size, t.intermediate_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    rms_norms = 4 * (4 * d + 4)  # input, post-attention, pre- and post-feedforward: fp32 copies of their input
    qk_norms = 4 * (q + kv) + 4 * (t.num_attention_heads + t.num_key_value_heads)
    attention = 2 * (q + 2 * kv) + 2 * q + 4 * t.num_attention_heads
    mlp = 3 * 2 * f  # GELU's input, its output and the up projection (both factors of the product)
    total = rms_norms + qk_norms + attention + mlp
    if "text" in lora.towers:
        total += _lora_bytes(d, 3, lora) + _lora_bytes(q, 1, lora) + _lora_bytes(d, 2, lora) + _lora_bytes(f, 1, lora)
    return total  # frozen 4-bit linears pass the gradient on and keep nothing of their input


def batch_tokens(config: Any, batch: dict[str, Any]) -> dict[str, int]:
    """Tokens each tower processes for one micro-batch (padded text length x rows; patches x images)."""
    tokens = {"vision": 0, "text": 0}
    ids = batch.get("input_ids")
    if ids is not None:
        tokens["text"] = int(ids.shape[0]) * int(ids.shape[1])
    pixels = batch.get("pixel_values")
    if pixels is not None:
        v = config.vision_config
        tokens["vision"] = int(pixels.shape[0]) * (v.image_size // v.patch_size) ** 2
    return tokens


def plan_checkpointing(free_bytes: float, layer_bytes: dict[str, int], layers: dict[str, int],
                       order: tuple[str, ...] = AUTO_ORDER) -> dict[str, int]:
    """How many layers of each tower stay checkpointed so that the activations kept fit in ``free_bytes``:
    towers in ``order`` give up their checkpointing layer by layer while the next one still fits."""
    checkpointed = dict(layers)
    left = free_bytes
    for tower in order:
        cost = layer_bytes.get(tower, 0)
        kept = layers.get(tower, 0) if cost <= 0 else int(max(0.0, min(layers.get(tower, 0), left // cost)))
        checkpointed[tower] = layers.get(tower, 0) - kept
        left -= kept * cost
    return checkpointed


# ----------------------------------------------------------------------------- the checkpointing callback


def _cuda_peak() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _cuda_total() -> int | None:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if torch.cuda.is_available() else None


class LayerCheckpointing(TrainerCallback):
    """Chooses which layers recompute their activations (--checkpointing_scope, --checkpointing_layers).

    With a fixed selection it sets each layer's flag once, when training begins. With ``auto`` the first
    optimizer step checkpoints every layer and its peak memory is read; from then on, before each forward, the
    layers whose activations fit in what the budget leaves (the memory model, for that batch's shape) keep them.
    ``auto`` resets CUDA's peak-memory counter when training starts, so that the first step's own peak is read.
    """

    def __init__(self, scope: str = "all", selection: CheckpointSelection = CheckpointSelection(),
                 budget_gib: float | None = None, read_peak: Callable[[], int | None] | None = None,
                 read_total: Callable[[], int | None] | None = None):
        self.scope, self.selection, self.budget_gib = scope, selection, budget_gib
        self.read_peak = read_peak or (lambda: _cuda_peak())
        self.read_total = read_total or (lambda: _cuda_total())
        self.base: int | None = None  # peak of the all-checkpointed first step, optimizer state included
        self.plans: list[dict[str, int]] = []  # the distinct plans auto applied, for logs and tests
        self._hook = None
        self._model: torch.nn.Module | None = None
        self._layers: dict[str, int] = {}
        self._towers: dict[str, list[GradientCheckpointingLayer]] = {}
        self._lora = LoraShape(r=0, dropout=0.0, towers=frozenset())
        self._autocast = False

    @classmethod
    def from_args(cls, script_args: Any) -> LayerCheckpointing:
        return cls(script_args.checkpointing_scope, parse_checkpointing_layers(script_args.checkpointing_layers),
                   script_args.checkpointing_budget_gib)

    def _static_counts(self) -> dict[str, int | None]:
        counts: dict[str, int | None] = {"vision": self.selection.vision, "text": self.selection.text}
        for tower in TOWERS:
            if self.scope not in ("all", tower):
                counts[tower] = 0
        return counts

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not args.activation_checkpointing:
            return
        self._towers = layer_towers(model)
        done = apply_checkpointing(model, self._static_counts(), self._towers)
        self._layers = {tower: len(layers) for tower, layers in self._towers.items()}
        if self.selection == CheckpointSelection():
            return
        logger.info("Activation checkpointing: %s", ", ".join(f"{t} {done[t]} of {self._layers[t]} layers"
                                                             for t in TOWERS))
        if self.selection.auto and self._hook is None:
            self._model = model
            self._lora = LoraShape.of(model)
            # accelerate's autocast wraps forward, inside this hook: read the setting from the arguments.
            self._autocast = getattr(args, "mixed_precision", "no") in ("bf16", "fp16")
            self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()  # the first step's peak, not the loading's

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if not self.selection.auto or self.base is not None or self._model is None:
            return
        peak = self.read_peak()
        if peak is None:
            logger.warning("--checkpointing_layers auto measures GPU memory and there is no CUDA device: every layer "
                           "stays checkpointed")
            self._remove_hook()
            self._model = None
            return
        # The first step's peak may come before the optimizer's state exists (it is made by its first update).
        state_bytes = sum(t.numel() * t.element_size() for s in getattr(optimizer, "state", {}).values()
                          for t in s.values() if torch.is_tensor(t))
        self.base = peak + state_bytes

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def budget_bytes(self) -> int | None:
        if self.budget_gib is not None:
            return int(self.budget_gib * GIB)
        total = self.read_total()
        return None if total is None else int(total * 0.9)

    def _before_forward(self, module, args, kwargs):
        if self.base is None or not module.training or not torch.is_grad_enabled():
            return None
        budget = self.budget_bytes()
        if budget is None:
            return None
        config = getattr(module, "config", None)
        tokens = batch_tokens(config, kwargs)
        per_layer = {tower: layer_bytes_per_token(config, tower, self._lora, self._autocast) * tokens[tower]
                     for tower in TOWERS}
        counts = self._static_counts()
        allowed = {t: self._layers[t] if counts[t] is None else min(counts[t], self._layers[t]) for t in TOWERS}
        free = budget * (1 - AUTO_MARGIN) - self.base
        plan = plan_checkpointing(free, per_layer, allowed, self.selection.order)
        done = apply_checkpointing(module, plan, self._towers)
        if not self.plans or self.plans[-1] != done:
            kept = sum((allowed[t] - done[t]) * per_layer[t] for t in TOWERS)
            logger.info("Activation checkpointing (auto, budget %.1f GiB, measured base %.1f GiB): vision %d of %d, "
                        "text %d of %d layers recompute; %.1f GiB of activations kept", budget / GIB, self.base / GIB,
                        done["vision"], self._layers["vision"], done["text"], self._layers["text"], kept / GIB)
            self.plans.append(done)
        return None


# ----------------------------------------------------------------------------- precision


def check_precision(script_args: Any, model_args: Any) -> None:
    """--pure_bf16 needs a model loaded in bf16: refused at parse time, before anything loads."""
    if script_args.pure_bf16 and str(model_args.dtype) not in ("bfloat16", "torch.bfloat16"):
        raise ValueError(f"--pure_bf16 trains the bf16 weights as they are and needs --dtype bfloat16 "
                         f"(got --dtype {model_args.dtype}); drop --pure_bf16 or load the model in bf16")


def configure_precision(script_args: Any, training_args: Any, model_args: Any) -> None:
    """--pure_bf16: train the bf16 model without autocast. Call before the trainer is built (its accelerator
    reads the mixed-precision setting when it is made)."""
    if not script_args.pure_bf16:
        return
    check_precision(script_args, model_args)
    training_args.bf16 = False
    training_args.mixed_precision = "no"  # also overrides ACCELERATE_MIXED_PRECISION from `accelerate launch`


def cast_trainable_to_bf16(model: torch.nn.Module) -> int:
    """The adapter in bf16 (TRL does this for a 4-bit model, PEFT upcasts it to fp32 otherwise): without autocast,
    an fp32 adapter would cast every activation it reads. Returns how many parameters were cast."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.bfloat16 and param.is_floating_point():
            param.data = param.data.to(torch.bfloat16)
            cast += 1
    return cast


# ----------------------------------------------------------------------------- compiled blocks


def _checkpointed_call(compiled: Callable) -> Callable:
    """A layer's forward running ``compiled`` (its class's original forward, compiled), checkpointed outside the
    compiled code as GradientCheckpointingLayer does: the checkpoint flag can change without a recompile."""

    def forward(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(functools.partial(compiled, self, **kwargs), *args)
        return compiled(self, *args, **kwargs)

    return forward


def compile_blocks(model: torch.nn.Module, scope: str, backend: str = "inductor") -> dict[str, int]:
    """Compile the forward of each layer in ``scope`` (vision, text or all); layers of one class share one
    compiled function, so 34 decoder layers compile like one (a few times: sliding and global attention, a
    guard on the mask's layout). Returns how
    many layers of each tower now run compiled."""
    if scope == "none":
        return {tower: 0 for tower in TOWERS}
    # Every layer class's forward is one code object for the compiler (a decorator's wrapper, even, shared by
    # both towers): leave room for its variants (sliding/global attention, static/dynamic) before it gives up
    # and runs the layer uncompiled.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    compiled_by_class: dict[type, Callable] = {}
    done = {tower: 0 for tower in TOWERS}
    for tower, layers in layer_towers(model).items():
        if scope not in ("all", tower):
            continue
        # Text layers see a new padded length nearly every batch: symbolic lengths from the start (one compile, not
        # a static one then a dynamic one). Vision layers see 4096 patches per image: static until that changes.
        dynamic = True if tower == "text" else None
        for layer in layers:
            cls = type(layer)
            if cls not in compiled_by_class:
                original = getattr(cls.forward, "__wrapped__", None)
                if original is None:
                    raise RuntimeError(f"{cls.__name__}.forward is not the checkpointing wrapper transformers puts on "
                                       "its layers; --compile_blocks does not know this transformers version: drop it")
                compiled_by_class[cls] = _checkpointed_call(torch.compile(original, backend=backend, dynamic=dynamic))
            layer.forward = types.MethodType(compiled_by_class[cls], layer)
            done[tower] += 1
    return done


# ----------------------------------------------------------------------------- wiring


def apply_speed_options(trainer: Any, script_args: Any) -> None:
    """What must happen after SFTTrainer has wrapped the model with PEFT and before training starts."""
    model = trainer.model
    if script_args.pure_bf16:
        cast_trainable_to_bf16(model)
    if script_args.compile_blocks != "none":
        done = compile_blocks(model, script_args.compile_blocks, script_args.compile_blocks_backend)
        logger.info("Compiled layers (%s): vision %d, text %d", script_args.compile_blocks_backend, done["vision"],
                    done["text"])


def describe_checkpointing(model: torch.nn.Module) -> dict[str, str]:
    """``{"vision": "3/27", "text": "34/34"}``: checkpointed layers of each tower, for logs and the benchmark."""
    return {tower: f"{sum(bool(layer.gradient_checkpointing) for layer in layers)}/{len(layers)}"
            for tower, layers in layer_towers(model).items()}


def estimate_activation_gib(config: Any, lora: LoraShape, micro_batch: int, text_tokens: int, images: int = 1,
                            autocast: bool = False) -> dict[str, float]:
    """GiB of activations one layer of each tower keeps for a micro-batch of ``micro_batch`` samples of
    ``text_tokens`` tokens and ``images`` images each (the memory model, for planning by hand)."""
    v = config.vision_config
    vision_tokens = micro_batch * images * (v.image_size // v.patch_size) ** 2
    return {"vision": layer_bytes_per_token(config, "vision", lora, autocast) * vision_tokens / GIB,
            "text": layer_bytes_per_token(config, "text", lora, autocast) * micro_batch * text_tokens / GIB}

