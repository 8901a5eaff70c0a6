"""Training throughput on the GPU: the seed recipe, this project's train.py path and its speed options.

    python bench/train_throughput.py --budget_s 420                       # on a machine with a CUDA GPU (~7 min)
    python bench/train_throughput.py --variants seed,default,pure_bf16 --steps 6
    python bench/train_throughput.py --size tiny --steps 2 --warmup 1     # the whole script on the CPU, in ~2 min

Builds Gemma 3 at a published size with random weights (radiology.shapes; speed and memory are
real, words are not; ``--size tiny``: radiology.tiny), writes a synthetic dataset with the seed
dataset's shape (896x896 images, prompt + 256 image tokens + a 20-120 token caption), and measures
in one run:
  seed       the seed recipe as written: eager attention, batch 1 x 4, prepare_model_for_kbit_training,
             LoRA all-linear + lm_head/embed_tokens as two untied copies, a hand-written loop
  default    the real train.py path (radiology.training.build_trainer: collator, loading, SFTTrainer)
             with recipes/gemma3-4b-qlora.yaml
  the speed options of radiology.speed, alone and together (VARIANTS below): pure_bf16, ckpt_auto,
             pure_auto, pure_auto_v, compile, pure_compile, all (pure bf16 + auto checkpointing + compiled blocks)
  bsN, fast, no_ckpt, ckpt_vision, ckpt_text, recipe_1x4: larger micro-batches, recipes/gemma3-4b-qlora-fast.yaml,
             no checkpointing, one tower checkpointed, the default split as the seed's 1 x 4
Reports samples/s, tokens/s, peak memory (torch's count), achieved TFLOP/s from the FLOP count below,
MFU against a bf16 matmul ceiling measured in the same run, and each variant's ratio to the seed.

Identical batches: every variant reads the same rows in the same order (``--sampling sequential``,
the recipe's group_by_length only reorders rows to pad less), and the seed loop reads them too, so
the first step's loss (taken at initialisation: LoRA B = 0) must agree with the seed's within bf16
tolerance, and the later steps' losses show that each option moves the loss the same way. The seed
loop's logged loss is weighted by tokens like TRL's (its gradient stays the seed's own).

The device tool returns only the end of the output: progress goes to results/train_throughput.jsonl
and one line per variant; the full tables come last, the compact one at the very end.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import random
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = Path(os.environ.get("OUT", "bench-results"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GIB = 2**30


def log(record: dict) -> None:
    """One JSON record to the results file; printed only with --verbose (the output's end is what returns)."""
    with open(OUT / "train_throughput.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if VERBOSE:
        print(json.dumps(record), flush=True)


VERBOSE = False


def say(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------- device helpers


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if DEVICE == "cuda" else float("nan")


def reset_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- FLOPs


def forward_flops(cfg, text_tokens: int, label_tokens: int) -> float:
    """Forward FLOPs of one sample: SigLIP over its patches, the projector, the text model over
    ``text_tokens`` and the LM head over the ``label_tokens`` positions that carry a loss (a fused
    head computes only those; counting all positions would reward wasted work)."""
    v, t = cfg.vision_config, cfg.text_config
    patches = (v.image_size // v.patch_size) ** 2
    d, ff = v.hidden_size, v.intermediate_size
    vision = v.num_hidden_layers * (2 * patches * (4 * d * d + 2 * d * ff) + 4 * patches * patches * d)
    vision += 2 * patches * 3 * v.patch_size * v.patch_size * d  # patch embedding
    projector = 2 * cfg.mm_tokens_per_image * d * t.hidden_size
    h, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_token = 2 * (h * q + 2 * h * kv + q * h + 3 * h * t.intermediate_size)
    attention = 4 * text_tokens * text_tokens * q / 2  # causal: half the score matrix on average
    text = t.num_hidden_layers * (text_tokens * per_token + attention)
    head = 2 * label_tokens * h * t.vocab_size
    return float(vision + projector + text + head)


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


# ----------------------------------------------------------------------------- model and data


def build_checkpoint(size: str, folder: Path) -> Path:
    if size == "tiny":
        from radiology.tiny import write_tiny_model

        return folder if (folder / "config.json").exists() else write_tiny_model(folder)
    from radiology.shapes import write_random_gemma3

    return write_random_gemma3(size, folder, device=DEVICE)


def synthetic_dataset(folder: Path, rows: int, image_size: int = 896, seed: int = 0) -> Path:
    """Parquet in the seed dataset's schema: smooth random grayscale images, captions of
    20-120 characters (the offline tokenizer is character-level, so 20-120 tokens)."""
    from datasets import Dataset, Image as ImageFeature
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "train.parquet").exists():
        return folder
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    records = []
    for i in range(rows):
        small = (np_rng.random((28, 28)) * 255).astype(np.uint8)
        image = Image.fromarray(small, mode="L").resize((image_size, image_size), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        caption = "".join(rng.choice(string.ascii_lowercase + "  ") for _ in range(rng.randint(20, 120))).strip()
        records.append({"image": {"bytes": buffer.getvalue(), "path": None}, "image_id": f"synthetic_{i:05d}",
                        "caption": caption or "x", "cui": []})
    Dataset.from_list(records).cast_column("image", ImageFeature()).to_parquet(str(folder / "train.parquet"))
    return folder


def synthetic_study_dataset(folder: Path, rows: int, images: int, image_size: int = 896, seed: int = 0) -> Path:
    """Like synthetic_dataset, with ``images`` images per row in an ``images`` list column: a study
    (e.g. slices of a series) whose images all go into one prompt."""
    from datasets import Dataset, Image as ImageFeature, Sequence
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "train.parquet").exists():
        return folder
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    records = []
    for i in range(rows):
        pictures = []
        for _ in range(images):
            small = (np_rng.random((28, 28)) * 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(small, mode="L").resize((image_size, image_size), Image.BILINEAR).save(buffer, format="PNG")
            pictures.append({"bytes": buffer.getvalue(), "path": None})
        caption = "".join(rng.choice(string.ascii_lowercase + "  ") for _ in range(rng.randint(20, 120))).strip()
        records.append({"images": pictures, "image_id": f"study_{i:05d}", "caption": caption or "x"})
    Dataset.from_list(records).cast_column("images", Sequence(ImageFeature())).to_parquet(str(folder / "train.parquet"))
    return folder


def fixed_batches(checkpoint: Path, data: Path, count: int, batch_size: int = 1) -> list[dict]:
    """Batches built by the project's collator from the dataset's first rows, in order: what the
    train.py variants read with --train_sampling_strategy sequential."""
    from transformers import AutoProcessor

    from radiology.collate import CaptionCollator
    from radiology.data import DEFAULT_INSTRUCTION, load_caption_dataset, prepare_caption_dataset

    processor = AutoProcessor.from_pretrained(checkpoint)
    rows = prepare_caption_dataset(load_caption_dataset(str(data), "train")).dataset
    collator = CaptionCollator(processor, DEFAULT_INSTRUCTION)
    return [collator([rows[(i * batch_size + j) % len(rows)] for j in range(batch_size)]) for i in range(count)]


def token_stats(checkpoint: Path, data: Path) -> tuple[float, float]:
    """Mean tokens and mean loss-carrying tokens per sample over the dataset (unpadded): every
    variant sees the same rows, so tokens/s and FLOPs follow from samples/s."""
    from transformers import AutoProcessor

    from radiology.collate import IGNORE_INDEX, CaptionCollator
    from radiology.data import DEFAULT_INSTRUCTION, load_caption_dataset, prepare_caption_dataset

    collator = CaptionCollator(AutoProcessor.from_pretrained(checkpoint), DEFAULT_INSTRUCTION)
    rows = prepare_caption_dataset(load_caption_dataset(str(data), "train")).dataset.remove_columns("image")
    encoded = [collator.encode_row(row) for row in rows]
    tokens = sum(len(ids) for ids, _ in encoded) / len(encoded)
    labels = sum(sum(1 for x in lab if x != IGNORE_INDEX) for _, lab in encoded) / len(encoded)
    return tokens, labels


# ----------------------------------------------------------------------------- the seed recipe


def seed_recipe(checkpoint: Path, batches: list[dict], steps: int, warmup: int, accumulation: int = 4) -> dict:
    """The seed notebook's recipe, mirrored by hand (what its SFTTrainer call does per step). Reads
    ``batches`` (micro-batches of one row) in order, ``accumulation`` per optimizer step."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    reset_memory()
    torch.manual_seed(0)  # LoRA's initialisation and dropout masks: the same from run to run
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, quantization_config=quant, dtype=torch.bfloat16,
                                                        attn_implementation="eager",
                                                        device_map={"": 0} if DEVICE == "cuda" else None)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules="all-linear",
                      task_type="CAUSAL_LM", modules_to_save=["lm_head", "embed_tokens"])
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    # weight_decay 0 as the seed's SFTTrainer (torch's AdamW would default to 0.01)
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=DEVICE == "cuda")
    model.train()
    reset_memory()
    losses, samples, start, cursor = [], 0, None, 0
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            start, samples = time.perf_counter(), 0
        weighted, tokens = 0.0, 0
        for _ in range(accumulation):
            batch = {k: v.to(DEVICE, non_blocking=True) for k, v in batches[cursor % len(batches)].items()}
            cursor += 1
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = model(**batch).loss
            (loss / accumulation).backward()
            # Logged weighted by tokens, as TRL logs it, so that the first step compares with train.py's.
            count = int((batch["labels"][:, 1:] != -100).sum())
            weighted, tokens = weighted + float(loss) * count, tokens + count  # a sync: cheap beside ~1.3 s
            samples += batch["input_ids"].shape[0]
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(weighted / max(tokens, 1))
    sync()
    elapsed = time.perf_counter() - start
    result = dict(samples_per_s=samples / elapsed, trainable=trainable, micro_batch=1, accumulation=accumulation,
                  peak_gib=peak_gib(), losses=losses, checkpointed="all")
    del model, optimizer, params
    reset_memory()
    return result


# ----------------------------------------------------------------------------- the train.py path


def project_path(checkpoint: Path, data: Path, recipe: str, steps: int, warmup: int, overrides: list[str],
                 measure_loader: bool = False) -> dict:
    """The real train.py path: argument parsing, data loading, collator, model loading, SFTTrainer."""
    from transformers import TrainerCallback

    from radiology.config import parse_args
    from radiology.speed import describe_checkpointing
    from radiology.training import build_trainer, load_training_data

    reset_memory()
    argv = ["--config", str(ROOT / "recipes" / recipe), "--model_name_or_path", str(checkpoint),
            "--processor_name_or_path", str(checkpoint), "--dataset_name", str(data),
            "--output_dir", "/tmp/bench-run", "--overwrite_output_dir", "true", "--max_train_samples", "100000",
            "--max_steps", str(warmup + steps), "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", "1", "--merge", "false", "--disable_tqdm", "true", *BASE_OVERRIDES, *overrides]
    script, training, model_args = parse_args(argv)
    trainer = build_trainer(script, training, model_args, load_training_data(script, training))
    quiet(trainer)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.start = None
            self.warmup_peak = float("nan")

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                sync()
                self.warmup_peak = peak_gib()  # compile and auto's measured first step happen before this
                if DEVICE == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

    clock = Clock()
    trainer.add_callback(clock)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = trainer.train()
    sync()
    elapsed = time.perf_counter() - clock.start
    samples = steps * training.per_device_train_batch_size * training.gradient_accumulation_steps
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    checkpointed = describe_checkpointing(trainer.model) if training.activation_checkpointing else None
    out = dict(samples_per_s=samples / elapsed, trainable=trainable, peak_gib=peak_gib(),
               warmup_peak_gib=clock.warmup_peak, micro_batch=training.per_device_train_batch_size,
               accumulation=training.gradient_accumulation_steps, losses=losses, final_loss=result.training_loss,
               checkpointed=" ".join(f"{k[0]}{v}" for k, v in checkpointed.items()) if checkpointed else "off")
    if measure_loader:
        out["loader_samples_per_s"] = loader_rate(trainer)
    del trainer, result
    reset_memory()
    return out


def quiet(trainer) -> None:
    """No per-step log lines (the device returns only the output's end); --verbose keeps them."""
    from transformers.trainer_callback import PrinterCallback

    if not VERBOSE:
        trainer.remove_callback(PrinterCallback)


def loader_rate(trainer, batches: int = 12) -> float:
    """Samples/s the training DataLoader alone delivers (workers, pinned memory): it must stay well above
    the training rate, or it is on the critical path."""
    loader = trainer.get_train_dataloader()
    iterator = iter(loader)
    next(iterator)  # workers started
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        samples += batch["input_ids"].shape[0]
    return samples / (time.perf_counter() - start)


def profile_default(checkpoint: Path, data: Path, name: str, overrides: list[str], steps: int = 3) -> None:
    """A torch.profiler trace of a train.py variant's steady state: where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from radiology.config import parse_args
    from radiology.training import build_trainer, load_training_data

    reset_memory()
    argv = ["--config", str(ROOT / "recipes" / "gemma3-4b-qlora.yaml"), "--model_name_or_path", str(checkpoint),
            "--processor_name_or_path", str(checkpoint), "--dataset_name", str(data),
            "--output_dir", "/tmp/bench-run", "--overwrite_output_dir", "true", "--max_train_samples", "100000",
            "--max_steps", str(3 + steps), "--save_strategy", "no", "--report_to", "none", "--merge", "false",
            "--disable_tqdm", "true", *BASE_OVERRIDES, *overrides]
    script, training, model_args = parse_args(argv)
    trainer = build_trainer(script, training, model_args, load_training_data(script, training))
    quiet(trainer)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    prof = profile(activities=activities)

    class Window(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                prof.__enter__()

    trainer.add_callback(Window())
    trainer.train()
    sync()
    prof.__exit__(None, None, None)
    averages = prof.key_averages()
    sort = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    (OUT / f"profile_{name}.txt").write_text(averages.table(sort_by=sort, row_limit=40))
    busy = sum(e.self_device_time_total for e in averages) / 1e6
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    copies = sum(e.self_device_time_total for e in averages if e.key in ("aten::copy_", "aten::_to_copy")) / 1e6
    log({"profile": {"overrides": overrides, "steps": steps, "gpu_busy_s": round(busy, 2),
                     "copy_s": round(copies, 2), "launches_per_step": launches // steps}})
    say(f"profile {name}: GPU busy {busy / steps:.3f} s/step, copies {copies / steps:.3f} s/step, "
        f"{launches // steps} launches/step")
    del trainer
    reset_memory()


def loss_agreement(checkpoint: Path, batches: list[dict]) -> dict:
    """Seed path vs project path on identical batches at initialisation (LoRA B = 0, so both are
    the base model), forward only: the loss must agree within bf16 tolerance."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    from trl.trainer.utils import add_fused_lm_head

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    losses = {}
    for name in ("seed", "project"):
        reset_memory()
        model = AutoModelForImageTextToText.from_pretrained(
            checkpoint, quantization_config=quant, dtype=torch.bfloat16,
            attn_implementation="eager" if name == "seed" else "sdpa",
            device_map={"": 0} if DEVICE == "cuda" else None)
        if name == "seed":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            add_fused_lm_head(model)
        model.eval()
        values = []
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            for batch in batches:
                batch = {k: v.to(DEVICE) for k, v in batch.items()}
                if name == "seed":
                    values.append(float(model(**batch).loss))
                else:
                    out = model(**batch, fused_lm_head=True)
                    values.append(float(-out.log_probs.sum() / out.label_mask.sum()))
        losses[name] = values
        del model
    diffs = [abs(a - b) / abs(a) for a, b in zip(losses["seed"], losses["project"])]
    return dict(seed=losses["seed"], project=losses["project"], max_relative_difference=max(diffs))


# ----------------------------------------------------------------------------- variants

BUDGET = "BUDGET"  # replaced by --budget_gib, else the seed's peak measured in this run, else 29.5
PURE = ["--pure_bf16", "true"]
AUTO = ["--checkpointing_layers", "auto", "--checkpointing_budget_gib", BUDGET]
COMPILE = ["--compile_blocks", "all"]
BASE_OVERRIDES: list[str] = []  # set in main: sampling, CPU flags

# name: (recipe, train.py flags, what it isolates)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "default": ("gemma3-4b-qlora.yaml", [], "recipe as shipped: autocast, every layer checkpointed"),
    "pure_bf16": ("gemma3-4b-qlora.yaml", PURE, "bf16 end to end, no autocast"),
    "ckpt_auto": ("gemma3-4b-qlora.yaml", AUTO, "checkpoint only what the budget needs"),
    "pure_auto": ("gemma3-4b-qlora.yaml", PURE + AUTO, "pure bf16 + auto checkpointing"),
    "pure_auto_v": ("gemma3-4b-qlora.yaml", PURE + ["--checkpointing_layers", "auto:vision"] + AUTO[2:],
                    "pure bf16 + auto checkpointing, vision layers kept first"),
    "compile": ("gemma3-4b-qlora.yaml", COMPILE, "compiled blocks alone (autocast)"),
    "pure_compile": ("gemma3-4b-qlora.yaml", PURE + COMPILE, "pure bf16 + compiled blocks"),
    "all": ("gemma3-4b-qlora.yaml", PURE + AUTO + COMPILE, "pure bf16 + auto checkpointing + compiled blocks"),
    "ckpt_vision": ("gemma3-4b-qlora.yaml", ["--checkpointing_scope", "vision"], "run B's: text layers keep theirs"),
    "ckpt_text": ("gemma3-4b-qlora.yaml", ["--checkpointing_scope", "text"], "vision layers keep theirs"),
    "no_ckpt": ("gemma3-4b-qlora.yaml", ["--activation_checkpointing", "false"], "no checkpointing at all"),
    "recipe_1x4": ("gemma3-4b-qlora.yaml", ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps",
                                            "4"], "the default split as the seed's"),
    "bs8": ("gemma3-4b-qlora.yaml", ["--per_device_train_batch_size", "8"], "8 samples per step"),
    "bs16": ("gemma3-4b-qlora.yaml", ["--per_device_train_batch_size", "16"], "16 samples per step"),
    "fast": ("gemma3-4b-qlora-fast.yaml", [], "no LoRA in the vision tower"),
    # Studies: 8 images per sample (slices of a series), the default recipe with room for their image blocks.
    "images8": ("gemma3-4b-qlora.yaml", ["--images_column", "images", "--max_images", "8", "--max_length", "4096"],
                "8 images per sample, default recipe"),
}
COMPILED = {"compile", "pure_compile", "all"}
# Seconds a variant needs at least, to skip it rather than be cut off by --budget_s (4B on an H200).
NEEDS_S = {"images8": 60, "seed": 45, "compile": 150, "pure_compile": 150, "all": 150, "profile": 60, "profile_pure_auto": 60}
DEFAULT_VARIANTS = "ceiling,seed,default,pure_bf16,ckpt_auto,pure_auto,pure_auto_v,all,compile"


def fmt(value: float, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def print_tables(rows: list[dict], seed: dict | None, final: bool) -> None:
    seed_rate = seed["samples_per_s"] if seed else None
    seed_first = seed["losses"][0] if seed and seed.get("losses") else None
    if final:
        say("\n| variant | micro x accum | checkpointed (vision/text) | trainable | samples/s | tokens/s | peak GiB "
            "| warm-up peak | TFLOP/s | MFU | x seed |")
        say("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            say(f"| {r['variant']} | {r.get('micro_batch', 1)} x {r.get('accumulation', 4)} | {r.get('checkpointed', '')} "
                f"| {r['trainable'] / 1e6:.0f} M | {r['samples_per_s']:.2f} | {fmt(r.get('tokens_per_s'), '.0f')} "
                f"| {fmt(r['peak_gib'], '.1f')} | {fmt(r.get('warmup_peak_gib'), '.1f')} | {fmt(r.get('tflops'), '.0f')} "
                f"| {fmt(r.get('mfu'), '.1%')} | {fmt(r['samples_per_s'] / seed_rate if seed_rate else None, '.2f')} |")
        say("\nLoss per optimizer step on identical rows (step 1 at initialisation; seed: token-weighted):")
        for r in rows:
            say(f"  {r['variant']:>13}: " + " ".join(f"{x:.4f}" for x in r.get("losses", [])))
    say("\n| variant | samples/s | peak GiB | MFU | x seed | step-1 loss | rel. to seed | last loss |")
    say("|---|---|---|---|---|---|---|---|")
    for r in rows:
        losses = r.get("losses") or [float("nan")]
        rel = abs(losses[0] - seed_first) / abs(seed_first) if seed_first else None
        say(f"| {r['variant']} | {r['samples_per_s']:.2f} | {fmt(r['peak_gib'], '.1f')} | {fmt(r.get('mfu'), '.1%')} "
            f"| {fmt(r['samples_per_s'] / seed_rate if seed_rate else None, '.2f')} | {losses[0]:.4f} | {fmt(rel, '.1e')} "
            f"| {losses[-1]:.4f} |")


def main() -> None:
    global VERBOSE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4b", choices=["tiny", "4b", "12b", "27b"])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, run in order: ceiling, agreement, seed, profile, profile_pure_auto, "
                             f"{', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (auto measures its first)")
    parser.add_argument("--compile_warmup", type=int, default=3, help="warm-up steps of compiled variants")
    parser.add_argument("--seed_steps", type=int, default=4, help="measured steps of the seed recipe (~5 s each)")
    parser.add_argument("--seed_warmup", type=int, default=1)
    parser.add_argument("--sampling", default="sequential", choices=["sequential", "group_by_length"],
                        help="row order of the train.py variants; sequential reads what the seed reads")
    parser.add_argument("--budget_gib", type=float, default=None,
                        help="memory budget of auto checkpointing (default: the seed's peak in this run, else 29.5)")
    parser.add_argument("--compile_backend", default="inductor", help="aot_eager: check the path without codegen")
    parser.add_argument("--checkpoint", default=None, help="model folder (default: built under /tmp)")
    parser.add_argument("--extra", default="", help="extra train.py flags for every train.py variant")
    parser.add_argument("--budget_s", type=float, default=float("inf"),
                        help="wall-clock budget: a variant that would not finish in what is left is skipped")
    parser.add_argument("--verbose", action="store_true", help="print every JSON record and the trainer's logs")
    args = parser.parse_args()
    VERBOSE = args.verbose
    OUT.mkdir(parents=True, exist_ok=True)
    if not VERBOSE:
        for name in ("transformers", "peft", "trl", "accelerate", "datasets", "radiology", "bitsandbytes"):
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        logging.basicConfig(level=logging.INFO)
    import peft
    import transformers
    import trl
    from transformers import AutoConfig

    global BASE_OVERRIDES
    # No warm-up of the learning rate: the seed loop has none, so the losses compare step for step.
    BASE_OVERRIDES = ["--train_sampling_strategy", args.sampling, "--compile_blocks_backend", args.compile_backend,
                      "--warmup_steps", "0"]
    if DEVICE == "cpu":
        BASE_OVERRIDES += ["--use_cpu", "true", "--optim", "adamw_torch", "--dataloader_num_workers", "2"]
    BASE_OVERRIDES += args.extra.split()

    env = dict(device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", torch=torch.__version__,
               cuda=torch.version.cuda, transformers=transformers.__version__, trl=trl.__version__,
               peft=peft.__version__)
    log({"env": env})
    say(f"env: {env}")
    t0 = time.perf_counter()
    checkpoint = build_checkpoint(args.size, Path(args.checkpoint or f"/tmp/gemma3-{args.size}"))
    config = AutoConfig.from_pretrained(checkpoint)
    rows_needed = 4 * max(args.warmup, args.compile_warmup, args.seed_warmup) + 4 * max(args.steps, args.seed_steps)
    image_size = 64 if args.size == "tiny" else 896
    data = synthetic_dataset(Path(f"/tmp/bench-data-{args.size}"), rows=max(64 if args.size == "tiny" else 256,
                                                                             rows_needed), image_size=image_size)
    tokens_per_sample, labels_per_sample = token_stats(checkpoint, data)
    flops = 3 * forward_flops(config, round(tokens_per_sample), round(labels_per_sample))
    log({"setup_s": round(time.perf_counter() - t0, 1), "tokens_per_sample": round(tokens_per_sample, 1),
         "label_tokens_per_sample": round(labels_per_sample, 1), "train_tflop_per_sample": flops / 1e12})
    say(f"setup {time.perf_counter() - t0:.0f} s: {tokens_per_sample:.0f} tokens/sample, {labels_per_sample:.0f} "
        f"with a loss, {flops / 1e12:.1f} TFLOP/sample (fwd+bwd, no recompute)")
    ceiling, rows, seed = None, [], None
    for name in args.variants.split(","):
        left = args.budget_s - (time.perf_counter() - t0)
        if left < NEEDS_S.get(name, 30 if args.budget_s != float("inf") else 0):
            log({"variant": name, "skipped": "time budget"})
            say(f"{name}: skipped ({left:.0f} s left of --budget_s)")
            continue
        started = time.perf_counter()
        try:
            if name == "ceiling":
                if DEVICE == "cuda":
                    ceiling = matmul_tflops()
                    log({"bf16_matmul_tflops": round(ceiling, 1)})
                    say(f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s")
                continue
            if name in ("profile", "profile_pure_auto"):
                profile_default(checkpoint, data, "default" if name == "profile" else "pure_auto",
                                [] if name == "profile" else
                                [x if x != BUDGET else str(args.budget_gib or 29.5) for x in PURE + AUTO])
                continue
            if name == "agreement":
                result = loss_agreement(checkpoint, fixed_batches(checkpoint, data, 4, 1))
                log({"agreement": result})
                say(f"agreement (forward, 4 batches): max relative difference {result['max_relative_difference']:.1e}")
                continue
            if name == "seed":
                batches = fixed_batches(checkpoint, data, 4 * (args.seed_warmup + args.seed_steps), 1)
                result = seed_recipe(checkpoint, batches, args.seed_steps, args.seed_warmup)
                seed = result
            else:
                recipe, overrides, _ = VARIANTS[name]
                budget = args.budget_gib or (seed["peak_gib"] if seed and seed["peak_gib"] == seed["peak_gib"] else 29.5)
                overrides = [f"{budget:.2f}" if x == BUDGET else x for x in overrides]
                warmup = args.compile_warmup if name in COMPILED else args.warmup
                variant_data = data
                if name.startswith("images"):
                    count = int(name[len("images"):])
                    variant_data = synthetic_study_dataset(Path(f"/tmp/bench-data-{args.size}-x{count}"),
                                                           rows=4 * (warmup + args.steps), images=count,
                                                           image_size=image_size)
                result = project_path(checkpoint, variant_data, recipe, args.steps, warmup, overrides,
                                      measure_loader=name == "default")
        except Exception as err:  # one failing variant must not lose the others' numbers
            import traceback

            traceback.print_exc()
            log({"variant": name, "error": repr(err)[:400]})
            say(f"{name}: FAILED {repr(err)[:300]}")
            reset_memory()
            continue
        if name.startswith("images"):  # other samples: their tokens and FLOPs are not the table's
            result["images_per_s"] = result["samples_per_s"] * int(name[len("images"):])
            result["tokens_per_s"], result["tflops"] = float("nan"), float("nan")
        else:
            result["tokens_per_s"] = result["samples_per_s"] * tokens_per_sample
            result["tflops"] = result["samples_per_s"] * flops / 1e12
        if ceiling:
            result["mfu"] = result["tflops"] / ceiling
        result["variant"] = name
        result["wall_s"] = time.perf_counter() - started
        log({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()})
        rows.append(result)
        ratio = f", x{result['samples_per_s'] / seed['samples_per_s']:.2f} seed" if seed and result is not seed else ""
        loader = f", loader {result['loader_samples_per_s']:.1f} samples/s" if "loader_samples_per_s" in result else ""
        say(f"{name}: {result['samples_per_s']:.2f} samples/s, peak {fmt(result['peak_gib'], '.1f')} GiB"
            f"{ratio}, checkpointed {result.get('checkpointed')}, losses "
            + " ".join(f"{x:.4f}" for x in result.get("losses", [])) + f"{loader} ({result['wall_s']:.0f} s)")
    if rows:
        print_tables(rows, seed, final=True)
        say(f"\n(total {time.perf_counter() - t0:.0f} s; budget for auto: --budget_gib or the seed's peak; "
            f"rows read in order: --sampling {args.sampling})")
        print_tables(rows, seed, final=False)


if __name__ == "__main__":
    main()
