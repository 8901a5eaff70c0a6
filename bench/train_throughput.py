"""Training throughput on the GPU: the seed recipe and this project's train.py path, side by side.

    python bench/train_throughput.py --out results/            # on a machine with a CUDA GPU
    python bench/train_throughput.py --variants seed,default,bs8 --steps 8

Builds Gemma 3 at a published size with random weights (radiology.shapes; speed and memory are
real, words are not), writes a synthetic dataset with the seed dataset's shape (896x896 images,
prompt + 256 image tokens + a 20-120 token caption), and measures in one run:
  seed     the seed recipe as written: eager attention, batch 1 x 4, prepare_model_for_kbit_training,
           LoRA all-linear + lm_head/embed_tokens as two untied copies, a hand-written loop
  default  the real train.py path (radiology.training.build_trainer: collator, loading, SFTTrainer)
           with recipes/gemma3-4b-qlora.yaml
  bsN      the default path with N samples per micro-batch (a larger effective batch)
  fast     recipes/gemma3-4b-qlora-fast.yaml (no LoRA in the vision tower), reported on its own line
Reports samples/s, tokens/s, peak GPU memory, achieved TFLOP/s from the FLOP count below, MFU
against a measured bf16 matmul ceiling, and each variant's ratio to the seed. Also checks that
the seed and default paths give the same loss on identical batches and move it the same way.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
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

from radiology.shapes import gemma3_config, write_random_gemma3  # noqa: E402

OUT = Path(os.environ.get("OUT", "bench-results"))


def log(record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(OUT / "train_throughput.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- FLOPs


def forward_flops(size: str, text_tokens: int, label_tokens: int) -> float:
    """Forward FLOPs of one sample: SigLIP over 4096 patches, the projector, the text model over
    ``text_tokens`` and the LM head over the ``label_tokens`` positions that carry a loss (a fused
    head computes only those; counting all positions would reward wasted work)."""
    cfg = gemma3_config(size)
    v, t = cfg.vision_config, cfg.text_config
    patches = (v.image_size // v.patch_size) ** 2
    d, ff = v.hidden_size, v.intermediate_size
    vision = v.num_hidden_layers * (2 * patches * (4 * d * d + 2 * d * ff) + 4 * patches * patches * d)
    vision += 2 * patches * 3 * 14 * 14 * d  # patch embedding
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


# ----------------------------------------------------------------------------- data


def synthetic_dataset(folder: Path, rows: int, seed: int = 0) -> Path:
    """Parquet in the seed dataset's schema: smooth random 896x896 grayscale images, captions of
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
        image = Image.fromarray(small, mode="L").resize((896, 896), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        caption = "".join(rng.choice(string.ascii_lowercase + "  ") for _ in range(rng.randint(20, 120))).strip()
        records.append({"image": {"bytes": buffer.getvalue(), "path": None}, "image_id": f"synthetic_{i:05d}",
                        "caption": caption or "x", "cui": []})
    Dataset.from_list(records).cast_column("image", ImageFeature()).to_parquet(str(folder / "train.parquet"))
    return folder


# ----------------------------------------------------------------------------- variants


def reset_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def fixed_batches(checkpoint: Path, data: Path, count: int, batch_size: int) -> list[dict]:
    """Batches built by the project's collator from the dataset, reused by every variant that
    needs identical inputs."""
    from transformers import AutoProcessor

    from radiology.collate import CaptionCollator
    from radiology.data import DEFAULT_INSTRUCTION, load_caption_dataset, prepare_caption_dataset

    processor = AutoProcessor.from_pretrained(checkpoint)
    rows = prepare_caption_dataset(load_caption_dataset(str(data), "train")).dataset
    collator = CaptionCollator(processor, DEFAULT_INSTRUCTION)
    return [collator([rows[(i * batch_size + j) % len(rows)] for j in range(batch_size)]) for i in range(count)]


def seed_recipe(checkpoint: Path, batches: list[dict], steps: int, warmup: int, accumulation: int = 4,
                record_losses: bool = True) -> dict:
    """The seed notebook's recipe, mirrored by hand (what its SFTTrainer call does per step)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    reset_memory()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, quantization_config=quant, dtype=torch.bfloat16,
                                                        attn_implementation="eager", device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, bias="none", target_modules="all-linear",
                      task_type="CAUSAL_LM", modules_to_save=["lm_head", "embed_tokens"])
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    losses, samples, start = [], 0, None
    cursor = 0
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start, samples = time.perf_counter(), 0
        step_loss = 0.0
        for _ in range(accumulation):
            batch = {k: v.cuda(non_blocking=True) for k, v in batches[cursor % len(batches)].items()}
            cursor += 1
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).loss / accumulation
            loss.backward()
            step_loss += float(loss) if record_losses else 0.0  # a sync per micro-step, cheap beside ~1.5 s
            samples += batch["input_ids"].shape[0]
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = dict(samples_per_s=samples / elapsed, trainable=trainable, micro_batch=1, accumulation=accumulation,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30, losses=losses)
    del model, optimizer, params
    reset_memory()
    return result


def project_path(checkpoint: Path, data: Path, recipe: str, steps: int, warmup: int, overrides: list[str],
                 record_losses: bool = False) -> dict:
    """The real train.py path: argument parsing, data loading, collator, model loading, SFTTrainer."""
    from transformers import TrainerCallback

    from radiology.config import parse_args
    from radiology.training import build_trainer, load_training_data

    reset_memory()
    argv = ["--config", str(ROOT / "recipes" / recipe), "--model_name_or_path", str(checkpoint),
            "--processor_name_or_path", str(checkpoint), "--dataset_name", str(data),
            "--output_dir", "/tmp/bench-run", "--overwrite_output_dir", "true", "--max_train_samples", "100000",
            "--max_steps", str(warmup + steps), "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", "1", "--merge", "false", *overrides]
    script, training, model_args = parse_args(argv)
    trainer = build_trainer(script, training, model_args, load_training_data(script, training))

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.start = None
            self.samples = self.tokens = self.label_tokens = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.start = time.perf_counter()

    clock = Clock()
    trainer.add_callback(clock)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = trainer.train()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - clock.start
    samples = steps * training.per_device_train_batch_size * training.gradient_accumulation_steps
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = dict(samples_per_s=samples / elapsed, trainable=trainable, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               micro_batch=training.per_device_train_batch_size, accumulation=training.gradient_accumulation_steps,
               losses=losses, final_loss=result.training_loss)
    del trainer, result
    reset_memory()
    return out


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


def profile_default(checkpoint: Path, data: Path, steps: int = 3) -> None:
    """A torch.profiler trace of the default path's steady state: where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from radiology.config import parse_args
    from radiology.training import build_trainer, load_training_data

    reset_memory()
    argv = ["--config", str(ROOT / "recipes" / "gemma3-4b-qlora.yaml"), "--model_name_or_path", str(checkpoint),
            "--processor_name_or_path", str(checkpoint), "--dataset_name", str(data),
            "--output_dir", "/tmp/bench-run", "--overwrite_output_dir", "true", "--max_train_samples", "100000",
            "--max_steps", str(2 + steps), "--save_strategy", "no", "--report_to", "none", "--merge", "false"]
    script, training, model_args = parse_args(argv)
    trainer = build_trainer(script, training, model_args, load_training_data(script, training))
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    class Window(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                prof.__enter__()

    trainer.add_callback(Window())
    trainer.train()
    torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    averages = prof.key_averages()
    (OUT / "profile_cuda.txt").write_text(averages.table(sort_by="cuda_time_total", row_limit=40))
    (OUT / "profile_cpu.txt").write_text(averages.table(sort_by="cpu_time_total", row_limit=40))
    cuda_busy = sum(e.self_device_time_total for e in averages) / 1e6
    log({"profile": {"steps": steps, "gpu_busy_s": round(cuda_busy, 2),
                     "wall_s_per_step_note": "compare gpu_busy_s/steps with the measured s/step"}})
    del trainer
    reset_memory()


def loss_agreement(checkpoint: Path, batches: list[dict]) -> dict:
    """Seed path vs project path on identical batches at initialisation (LoRA B = 0, so both are
    the base model): the loss must agree within bf16 tolerance."""
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
            attn_implementation="eager" if name == "seed" else "sdpa", device_map={"": 0})
        if name == "seed":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            add_fused_lm_head(model)
        model.eval()
        values = []
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for batch in batches:
                batch = {k: v.cuda() for k, v in batch.items()}
                if name == "seed":
                    values.append(float(model(**batch).loss))
                else:
                    out = model(**batch, fused_lm_head=True)
                    values.append(float(-out.log_probs.sum() / out.label_mask.sum()))
        losses[name] = values
        del model
    diffs = [abs(a - b) / abs(a) for a, b in zip(losses["seed"], losses["project"])]
    return dict(seed=losses["seed"], project=losses["project"], max_relative_difference=max(diffs))


VARIANTS = {
    "default": ("gemma3-4b-qlora.yaml", []),
    "recipe_1x4": ("gemma3-4b-qlora.yaml", ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"]),
    "no_ckpt": ("gemma3-4b-qlora.yaml", ["--activation_checkpointing", "false"]),
    "ckpt_vision": ("gemma3-4b-qlora.yaml", ["--checkpointing_scope", "vision"]),
    "ckpt_text": ("gemma3-4b-qlora.yaml", ["--checkpointing_scope", "text"]),
    "bs8": ("gemma3-4b-qlora.yaml", ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1"]),
    "bs16": ("gemma3-4b-qlora.yaml", ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1"]),
    "fast": ("gemma3-4b-qlora-fast.yaml", []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4b", choices=["4b", "12b", "27b"])
    parser.add_argument("--variants", default="ceiling,agreement,seed,default,fast,bs8,bs16,no_ckpt,ckpt_vision,profile")
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--checkpoint", default=None, help="model folder (default: built under /tmp)")
    parser.add_argument("--extra", default="", help="extra train.py flags for the default variant")
    parser.add_argument("--budget_s", type=float, default=float("inf"), help="skip variants after this long")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    import peft
    import transformers
    import trl

    log({"env": dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
                     transformers=transformers.__version__, trl=trl.__version__, peft=peft.__version__)})
    t0 = time.perf_counter()
    checkpoint = Path(args.checkpoint or f"/tmp/gemma3-{args.size}")
    write_random_gemma3(args.size, checkpoint)
    data = synthetic_dataset(checkpoint.parent / "bench-data", rows=256)
    tokens_per_sample, labels_per_sample = token_stats(checkpoint, data)
    log({"setup_s": round(time.perf_counter() - t0, 1), "tokens_per_sample": round(tokens_per_sample, 1),
         "label_tokens_per_sample": round(labels_per_sample, 1)})
    ceiling = None
    rows = []
    for name in args.variants.split(","):
        if time.perf_counter() - t0 > args.budget_s:
            log({"variant": name, "skipped": "time budget"})
            continue
        try:
            if name == "ceiling":
                ceiling = matmul_tflops()
                log({"bf16_matmul_tflops": round(ceiling, 1)})
                continue
            if name == "profile":
                profile_default(checkpoint, data)
                continue
            if name == "agreement":
                log({"agreement": loss_agreement(checkpoint, fixed_batches(checkpoint, data, 4, 1))})
                continue
            if name == "seed":
                batches = fixed_batches(checkpoint, data, 16, 1)
                result = seed_recipe(checkpoint, batches, args.steps, args.warmup)
            else:
                recipe, overrides = VARIANTS[name]
                extra = args.extra.split() if name == "default" and args.extra else []
                result = project_path(checkpoint, data, recipe, args.steps, args.warmup, overrides + extra)
        except Exception as err:  # one failing variant must not lose the others' numbers
            import traceback

            traceback.print_exc()
            log({"variant": name, "error": repr(err)[:400]})
            reset_memory()
            continue
        flops = 3 * forward_flops(args.size, round(tokens_per_sample), round(labels_per_sample))
        result["tokens_per_s"] = result["samples_per_s"] * tokens_per_sample
        result["tflops"] = result["samples_per_s"] * flops / 1e12
        if ceiling:
            result["mfu"] = result["tflops"] / ceiling
        result["variant"] = name
        log({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()})
        rows.append(result)
    seed = next((r for r in rows if r["variant"] == "seed"), None)
    print("\n| variant | micro x accum | trainable | samples/s | tokens/s | peak GiB | TFLOP/s | MFU | x seed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["samples_per_s"] / seed["samples_per_s"] if seed else float("nan")
        shape = f"{r.get('micro_batch', 1)} x {r.get('accumulation', 4)}"
        print(f"| {r['variant']} | {shape} | {r['trainable'] / 1e6:.0f} M | {r['samples_per_s']:.2f} | "
              f"{r.get('tokens_per_s', float('nan')):.0f} | {r['peak_gib']:.1f} | {r.get('tflops', float('nan')):.0f} | "
              f"{r.get('mfu', float('nan')):.1%} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
