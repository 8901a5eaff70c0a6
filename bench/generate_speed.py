"""Generation speed: plain ``model.generate`` and the package's decode engine, with each speed option.

    python bench/generate_speed.py                           # GPU: Gemma 3 4B shape, random weights
    python bench/generate_speed.py --size tiny --new_tokens 8 --variants today,all   # CPU: the whole script in seconds
    python bench/generate_speed.py --variants today,all,compile --precisions bf16 --budget_s 420 --profile

For each precision (bf16, 4-bit NF4) it measures plain generate once, then each engine variant
(radiology.engine.DecodeEngine options, VARIANTS below) in four scenarios:
  one       one 896x896 image through radiology.generate.stream_text as the app calls it: first token
            as the caller sees it (image preprocessing, tokenization, queue, vision encoder, prefill,
            first choice, hand-over), decode tokens/s, the engine's breakdown of the first token, and
            the device's time per step without the hand-over (DecodeEngine.time_steps)
  four      4 concurrent requests: aggregate tokens/s against one request's (the same way measured)
  eight     one prompt with 8 images (radiology.generate.build_inputs(processor, [img] * 8))
  followup  a three-turn conversation (caption, a question and its answer, a second question)
and whether greedy output equals plain generate's token for token (equal tokens / compared; a
shortfall names the first differing index). Stop tokens are ignored: every answer is --new_tokens long.

Each result is printed as a JSON line as it comes (and appended to $OUT/generate_speed.jsonl); a
compact table of everything so far follows each variant, and the last lines printed are that table.
--budget_s skips what would not finish in time; --profile adds a torch.profiler table of 16 decode
steps per variant (kernel time by kind, top kernels; tables in $OUT/generate_speed_profiles.txt).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = Path(os.environ.get("OUT", "bench-results"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Engine options per variant: today's engine, each lever alone, all of them together.
VARIANTS: dict[str, dict[str, Any]] = {
    "today": {},
    "all": {"compile_step": True, "decode_attention": "filled", "choose_in_graph": True, "compile_vision": True},
    "compile": {"compile_step": True},
    "filled": {"decode_attention": "filled"},
    "choose": {"choose_in_graph": True},
    "vision": {"compile_vision": True},
    "min512": {"min_len": 512},
    "compile+filled": {"compile_step": True, "decode_attention": "filled"},
    "autotune": {"compile_step": True, "compile_mode": "max-autotune-no-cudagraphs", "decode_attention": "filled",
                 "choose_in_graph": True},
    "nowait": {"batch_wait_s": 0.002},
}
# Rough seconds on an H200, for --budget_s: a variant's scenarios, plus each compile it needs first (a
# compiled step or encoder is reused by later variants of the same precision: same function, same model).
SCENARIOS_COST_S = 25
COMPILE_COST_S = {"step-model": 80, "step-filled": 80, "vision": 40}
AUTOTUNE_COST_S = 300
CAPTION = "Axial CT of the chest shows a spiculated nodule in the right upper lobe."
FOLLOW_UPS = [("Is there any pleural effusion?", "No pleural effusion is seen."),
              ("How large is the nodule and where exactly is it?", None)]
SCENARIOS = ("one", "four", "eight", "followup")

RESULTS: list[dict] = []


# ---------------------------------------------------------------------- output


def log(record: dict) -> None:
    RESULTS.append(record)
    print(json.dumps(record, default=str), flush=True)
    with open(OUT / "generate_speed.jsonl", "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def rounded(values: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}


def cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def print_table() -> None:
    """One row per (precision, variant): what the issue's targets are stated in."""
    rows = [r for r in RESULTS if "variant" in r and "one" in r]
    head = ["prec", "variant", "warm_s", "tok/s", "ttft_s", "eng_1st", "step_ms", "4x", "8img_ttft", "8img_tok/s",
            "3turn_ttft", "3turn_tok/s", "greedy one/8img/3turn", "peak_gib"]
    lines = [" | ".join(head)]
    for r in rows:
        one, four, eight, follow = (r.get(k) or {} for k in SCENARIOS)
        lines.append(" | ".join([
            r["precision"], r["variant"], cell(r.get("warm_up_s")), cell(one.get("decode_tok_s")),
            cell(one.get("ttft_s")), cell(one.get("prefill_and_first_token_s")), cell(one.get("step_ms")),
            cell(four.get("ratio")), cell(eight.get("ttft_s")), cell(eight.get("decode_tok_s")),
            cell(follow.get("ttft_s")), cell(follow.get("decode_tok_s")),
            " ".join(cell(s.get("greedy")) for s in (one, eight, follow)), cell(r.get("peak_gib")),
        ]))
    for r in (r for r in RESULTS if r.get("path") == "plain"):
        lines.append(f"{r['precision']} | plain | - | {cell(r.get('decode_tok_s'))} | {cell(r.get('ttft_s'))} | "
                     f"8img {cell(r.get('eight_decode_tok_s'))} tok/s | 3turn {cell(r.get('followup_decode_tok_s'))} "
                     "tok/s")
    firsts = [r for r in rows if r.get("one")]
    if firsts:
        lines.append("first token (s): prec variant | preprocess queue collate vision prefill choice handover | "
                     "caller total")
        for r in firsts:
            one = r["one"]
            parts = " ".join(cell(one.get(k)) for k in ("preprocess_s", "queue_s", "collate_s", "vision_s",
                                                        "prefill_s", "first_choice_s", "handover_s"))
            lines.append(f"  {r['precision']} {r['variant']} | {parts} | {cell(one.get('ttft_s'))}")
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines.append("decode step profile: prec variant how | kernels/step | kernel ms/step | ms by kind")
        for r in profiled:
            for how, p in r["profile"].items():
                kinds = " ".join(f"{k} {v:.3g}" for k, v in p["ms_by_kind"].items())
                lines.append(f"  {r['precision']} {r['variant']} {how} | {p['kernels_per_step']} | "
                             f"{p['kernel_ms_per_step']} | {kinds}")
    for r in RESULTS:
        if "skipped" in r or "error" in r:
            lines.append(f"  {r.get('precision')} {r.get('variant', '')}: {r.get('skipped') or r.get('error')}")
    print("\n".join(["", "=" * 30 + " generate_speed summary " + "=" * 30, *lines]), flush=True)


# ---------------------------------------------------------------------- inputs


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def test_image(seed: int, size: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8), mode="L").resize((size, size))


def followup_inputs(processor, image: Image.Image) -> dict[str, torch.Tensor]:
    """The three-turn prompt: the image and instruction, the caption as the first answer, a question
    with its answer, and a second question awaiting the answer."""
    from radiology.data import DEFAULT_INSTRUCTION, build_messages

    messages = build_messages(DEFAULT_INSTRUCTION, caption=CAPTION, follow_ups=FOLLOW_UPS)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], images=[[image]], return_tensors="pt", add_special_tokens=False)


def scenario_inputs(loaded, scenario: str, image: Image.Image) -> dict[str, torch.Tensor]:
    from radiology.generate import build_inputs

    if scenario == "eight":
        return build_inputs(loaded.processor, [image] * 8)
    if scenario == "followup":
        return followup_inputs(loaded.processor, image)
    return build_inputs(loaded.processor, image)


def first_difference(expected: list[int], got: list[int]) -> str:
    """'k/n': the first k of plain generate's n tokens are equal (k is also the first differing index)."""
    same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return f"{same}/{len(expected)}"


# ---------------------------------------------------------------------- plain generate


def plain_ids(loaded, inputs: dict[str, torch.Tensor], new_tokens: int) -> list[int]:
    """Greedy new ids from plain generate as radiology.generate calls it (image placeholders suppressed),
    never stopping early: the engine ignores stop tokens in this benchmark, so plain generate must too."""
    from radiology.tokens import never_generated, special_ids

    moved = {k: v.to(loaded.model.device) for k, v in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(torch.bfloat16)
    with torch.inference_mode():
        out = loaded.model.generate(**moved, do_sample=False, max_new_tokens=new_tokens, eos_token_id=[],
                                    pad_token_id=special_ids(loaded.processor).pad,
                                    suppress_tokens=never_generated(loaded.processor))
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def measure_plain(loaded, image: Image.Image, new_tokens: int, equal_tokens: int) -> dict:
    """Plain generate: first token and decode speed for one image (preprocessing included, as the
    caller sees it), and the greedy ids every variant is compared with, per scenario."""
    def run(scenario: str, n: int) -> tuple[float, list[int]]:
        sync()
        start = time.perf_counter()
        ids = plain_ids(loaded, scenario_inputs(loaded, scenario, image), n)
        sync()
        return time.perf_counter() - start, ids

    run("one", 2)
    first, _ = run("one", 1)
    total, ids_one = run("one", new_tokens)
    result = dict(ttft_s=first, decode_tok_s=(new_tokens - 1) / (total - first) if total > first else None,
                  total_s=total)
    expected = {"one": ids_one}
    for scenario in ("eight", "followup"):
        n = min(equal_tokens, new_tokens)
        first, _ = run(scenario, 1)
        total, expected[scenario] = run(scenario, n)
        result[f"{scenario}_decode_tok_s"] = (n - 1) / (total - first) if total > first and n > 1 else None
    return result | {"expected": expected}


# ---------------------------------------------------------------------- the engine


def stream_once(loaded, scenario: str, image: Image.Image, new_tokens: int) -> dict:
    """One request the way the app makes it; times from the call (inputs built inside it)."""
    from radiology.generate import GenerationSettings, stream_text

    settings = GenerationSettings(max_new_tokens=new_tokens)
    sync()
    start = time.perf_counter()
    first = None
    if scenario == "followup":  # no follow-up entry point in radiology.generate: the engine directly
        stream = loaded.engine.stream(followup_inputs(loaded.processor, image), settings)
    else:
        stream = stream_text(loaded, [image] * 8 if scenario == "eight" else image, settings=settings)
    for _ in stream:
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return dict(ttft_s=first, decode_tok_s=(new_tokens - 1) / max(total - first, 1e-9), total_s=total,
                **loaded.engine.last_timings)


def concurrent(loaded, images: list[Image.Image], new_tokens: int) -> float:
    """Aggregate tokens/s of len(images) requests streamed from as many threads at once."""
    from radiology.generate import GenerationSettings, stream_text

    settings = GenerationSettings(max_new_tokens=new_tokens)

    def one(image: Image.Image) -> None:
        for _ in stream_text(loaded, image, settings=settings):
            pass

    threads = [threading.Thread(target=one, args=(image,)) for image in images]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(images) * new_tokens / (time.perf_counter() - start)


def preprocess_seconds(loaded, image: Image.Image, repeats: int = 3) -> float:
    from radiology.generate import build_inputs

    start = time.perf_counter()
    for _ in range(repeats):
        build_inputs(loaded.processor, image)
    return (time.perf_counter() - start) / repeats


def measure_variant(loaded, precision: str, variant: str, images: list[Image.Image], expected: dict,
                    args: argparse.Namespace) -> None:
    from radiology.engine import DecodeEngine
    from radiology.generate import GenerationSettings

    if loaded.engine is not None:
        loaded.engine.close()
    loaded.engine = DecodeEngine(loaded, max_batch=4, **VARIANTS[variant])
    loaded.engine.ignore_stop_tokens = True
    record: dict[str, Any] = {"precision": precision, "variant": variant, "options": VARIANTS[variant]}
    start = time.perf_counter()
    warm = scenario_inputs(loaded, "one", images[0])
    loaded.engine.warm_up(warm, GenerationSettings(max_new_tokens=4), batch_sizes=(1, 4))
    record["warm_up_s"] = time.perf_counter() - start
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    new_tokens = args.new_tokens
    for scenario in [s for s in SCENARIOS if s in args.scenarios]:
        if scenario == "four":
            stream_once(loaded, "one", images[0], new_tokens)  # the same way as the 4 below, warm
            alone = concurrent(loaded, images[:1], new_tokens)
            together = concurrent(loaded, images[:4], new_tokens)
            record["four"] = rounded(dict(one_tok_s=alone, four_tok_s=together, ratio=together / alone,
                                          batches=dict(loaded.engine.batch_sizes)))
            continue
        first_run = time.perf_counter()
        stream_once(loaded, scenario, images[0], new_tokens)  # graphs of new lengths, compiles: not timed
        first_run = time.perf_counter() - first_run
        result = stream_once(loaded, scenario, images[0], new_tokens)
        result["first_run_s"] = first_run
        inputs = scenario_inputs(loaded, scenario, images[0])
        ids = loaded.engine.generate_ids(inputs, GenerationSettings(max_new_tokens=len(expected[scenario])))
        result["greedy"] = first_difference(expected[scenario], ids)
        result["prompt_tokens"] = inputs["input_ids"].shape[1]
        if scenario == "one":
            result["preprocess_s"] = preprocess_seconds(loaded, images[0])
            result["step_ms"] = 1000 * loaded.engine.time_steps(inputs, steps=16)
        record[scenario] = rounded(result)
    if DEVICE == "cuda":
        record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.profile:
        record["profile"] = profile_steps(loaded, precision, variant, scenario_inputs(loaded, "one", images[0]))
    log(record)


# ---------------------------------------------------------------------- profile


KINDS = [("attention", ("attention", "flash", "fmha", "sdpa", "softmax", "cudnn")),
         ("gemm", ("gemm", "gemv", "cutlass", "nvjet", "matmul", "sm90_", "sm80_", "splitk", "cublas", "dequant",
                   "aten::mm", "aten::bmm", "aten::addmm", "aten::linear")),
         ("fused (triton)", ("triton",)),
         ("copy/cast", ("copy", "cast", "to_copy", "convert")),
         ("elementwise/reduce", ("elementwise", "reduce", "vectorized", "index", "fill", "cat", "where", "arange",
                                 "scatter", "gather", "sort", "argmax", "radix", "cub"))]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, words in KINDS if any(w in lowered for w in words)), "other")


def profile_steps(loaded, precision: str, variant: str, inputs: dict[str, torch.Tensor], steps: int = 16) -> dict:
    """torch.profiler over `steps` decode steps, graphs replayed as served and the same steps run eagerly:
    kernels per step, kernel time per step by kind, and the top kernels (tables appended to
    $OUT/generate_speed_profiles.txt)."""
    from torch.profiler import ProfilerActivity, profile

    from radiology.engine import DecodeEngine

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    summary: dict[str, Any] = {}
    options = VARIANTS[variant]
    engines = {"graphs": loaded.engine}
    if DEVICE == "cuda":  # kernels inside a replayed graph may not be traced one by one: the eager step too
        engines["eager_step"] = DecodeEngine(loaded, use_graphs=False, **options)
    for name, engine in engines.items():
        engine.time_steps(inputs, steps=2)  # compiles, captures
        prof = profile(activities=activities)
        engine.time_steps(inputs, steps=steps, trace=prof)
        events = prof.key_averages()
        device_events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        if not device_events:  # the CPU: operators instead of kernels
            device_events = [e for e in events if not e.key.startswith("ProfilerStep")]
        time_of = (lambda e: getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) \
            if DEVICE == "cuda" else (lambda e: e.self_cpu_time_total)
        per_step = steps
        kinds: dict[str, float] = {}
        for e in device_events:
            kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + time_of(e) / 1000 / per_step
        top = sorted(device_events, key=time_of, reverse=True)[:12]
        summary[name] = {
            "kernels_per_step": round(sum(e.count for e in device_events) / per_step, 1),
            "kernel_ms_per_step": round(sum(kinds.values()), 3),
            "ms_by_kind": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [(e.key[:70], e.count, round(time_of(e) / 1000 / per_step, 4)) for e in top[:6]],
        }
        table = None
        for sort in (["self_device_time_total", "self_cuda_time_total"] if DEVICE == "cuda"
                     else ["self_cpu_time_total"]):
            try:
                table = events.table(sort_by=sort, row_limit=25, max_name_column_width=90)
                break
            except Exception:  # a sort key this torch version names otherwise
                continue
        table = table or events.table(row_limit=25)
        with open(OUT / "generate_speed_profiles.txt", "a") as f:  # one file: the device returns few
            f.write(f"\n==== {precision} {variant} {name}: {steps} decode steps ====\n{table}\n")
        if name != "graphs":
            engine.close()
    return summary


def preprocess_options(loaded, size: int) -> dict:
    """Image preprocessing alone, for an image of size x size pixels: the processor as loaded, and the
    same after shrinking with PIL's reduce (integer box filter) to at most twice the model's input."""
    from radiology.generate import build_inputs

    image = test_image(7, size)
    sides = getattr(loaded.processor.image_processor, "size", None)
    target = (sides.get("height") if isinstance(sides, dict) else getattr(sides, "height", None)) or 896
    factor = max(1, size // (2 * target))

    def seconds(make) -> float:
        make()
        start = time.perf_counter()
        for _ in range(3):
            make()
        return (time.perf_counter() - start) / 3

    result = {"image_px": size, "processor": type(loaded.processor.image_processor).__name__,
              "processor_s": seconds(lambda: build_inputs(loaded.processor, image)),
              "reduce_then_processor_s": seconds(lambda: build_inputs(loaded.processor, image.reduce(factor))),
              "reduce_factor": factor}
    # transformers' torchvision image processor, on the CPU and on the GPU, where torchvision is installed.
    try:
        from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

        pil = loaded.processor.image_processor
        fast = Gemma3ImageProcessor(size={"height": target, "width": target}, image_mean=pil.image_mean,
                                    image_std=pil.image_std)
        reference = pil(images=[image], return_tensors="pt")["pixel_values"]
        for device in ["cpu"] + (["cuda"] if DEVICE == "cuda" else []):
            result[f"torchvision_{device}_s"] = seconds(
                lambda: fast(images=[image], return_tensors="pt", device=device))
            pixels = fast(images=[image], return_tensors="pt", device=device)["pixel_values"].float().cpu()
            result[f"torchvision_{device}_max_diff"] = float((pixels - reference).abs().max())
    except Exception as err:  # no torchvision, or another constructor
        result["torchvision"] = repr(err)[:120]
    return rounded(result)


# ---------------------------------------------------------------------- driver


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def compiles_needed(variant: str) -> set[str]:
    options = VARIANTS[variant]
    kinds = set()
    if options.get("compile_step"):
        kinds.add("step-filled" if options.get("decode_attention") == "filled" else "step-model")
    if options.get("compile_vision"):
        kinds.add("vision")
    return kinds


class Models:
    """Each precision's model, loaded when first needed and kept (bf16 and 4-bit of the 4B shape take
    ~11 GiB together), with plain generate's results: a plan may go back and forth between them."""

    def __init__(self, checkpoint: Path, args: argparse.Namespace):
        self.checkpoint, self.args = checkpoint, args
        self.loaded: dict[str, Any] = {}
        self.expected: dict[str, dict] = {}
        self.compiled: dict[str, set[str]] = {}
        self.images = [test_image(i, args.image_px) for i in range(4)]

    def get(self, precision: str):
        from radiology.generate import load_for_generation

        if precision not in self.loaded:
            before = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
            loaded = load_for_generation(str(self.checkpoint), load_in_4bit=precision == "4bit", device=DEVICE,
                                         attn_implementation=self.args.attn, fast=False)
            self.loaded[precision] = loaded
            self.compiled[precision] = set()
            weights = (torch.cuda.memory_allocated() - before) / 2**30 if DEVICE == "cuda" else None
            log({"precision": precision, "weights_gib": weights,
                 "preprocess": preprocess_options(loaded, self.args.big_px)})
            baseline = measure_plain(loaded, self.images[0], self.args.new_tokens, self.args.equal_tokens)
            self.expected[precision] = baseline.pop("expected")
            log({"precision": precision, "path": "plain", **rounded(baseline)})
        return self.loaded[precision]

    def cost(self, precision: str, variant: str) -> float:
        seconds = SCENARIOS_COST_S if precision in self.loaded else 3 * SCENARIOS_COST_S  # + loading, plain
        seconds += sum(COMPILE_COST_S[k] for k in compiles_needed(variant) - self.compiled.get(precision, set()))
        if VARIANTS[variant].get("compile_mode", "default") != "default":
            seconds += AUTOTUNE_COST_S
        seconds += 10 if self.args.profile else 0
        return seconds * (0.05 if self.args.size == "tiny" else 1)

    def close(self) -> None:
        for loaded in self.loaded.values():
            loaded.close()  # ends the engine's worker thread, which holds the model


def run_plan(checkpoint: Path, plan: list[tuple[str, str]], args: argparse.Namespace, budget: Budget) -> None:
    models = Models(checkpoint, args)
    try:
        for precision, variant in plan:
            cost = models.cost(precision, variant)
            if budget.left() < cost:
                log({"precision": precision, "variant": variant,
                     "skipped": f"budget: {budget.left():.0f} s left, about {cost:.0f} s needed"})
                continue
            try:
                loaded = models.get(precision)
                measure_variant(loaded, precision, variant, models.images, models.expected[precision], args)
                models.compiled[precision] |= compiles_needed(variant)
            except Exception as err:
                traceback.print_exc()
                log({"precision": precision, "variant": variant, "error": repr(err)[:400]})
                gc.collect()
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            print_table()
    finally:
        models.close()


def prepare_checkpoint(args: argparse.Namespace) -> Path:
    if args.size == "tiny":
        from radiology.tiny import write_tiny_model

        folder = Path(args.checkpoint or "/tmp/generate-speed-tiny")
        return folder if (folder / "config.json").exists() else write_tiny_model(folder)
    from radiology.shapes import write_random_gemma3

    return write_random_gemma3(args.size, args.checkpoint or f"/tmp/gemma3-{args.size}", device=DEVICE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4b", help="4b (published shape, random weights) or tiny (CPU check)")
    parser.add_argument("--checkpoint", default=None, help="where the model is written (default /tmp/...)")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--equal_tokens", type=int, default=128,
                        help="tokens compared with plain generate for the 8-image and three-turn prompts")
    parser.add_argument("--precisions", default="bf16,4bit")
    parser.add_argument("--variants", default="today,all,choose,filled,min512,vision,compile+filled,compile",
                        help=f"bf16's variants, comma-separated, in order, from {', '.join(VARIANTS)}")
    parser.add_argument("--variants_4bit", default="today,all", help="4-bit's variants (as --variants)")
    parser.add_argument("--plan", default=None,
                        help="precision:variant pairs in the order to run, e.g. bf16:today,bf16:all,4bit:today,"
                             "4bit:all,bf16:compile (default: --variants for bf16, then --variants_4bit)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--image_px", type=int, default=896, help="the test images' side")
    parser.add_argument("--big_px", type=int, default=2048, help="the side of the image preprocessing is timed on")
    parser.add_argument("--budget_s", type=float, default=float("inf"),
                        help="skip variants that would not finish within this many seconds from the start")
    parser.add_argument("--profile", action="store_true", help="torch.profiler over 16 decode steps per variant")
    args = parser.parse_args()
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if args.plan:
        plan = [tuple(item.split(":", 1)) if ":" in item else ("", item) for item in args.plan.split(",") if item]
    else:
        chosen = {"bf16": args.variants, "4bit": args.variants_4bit}
        plan = [(p, v) for p in args.precisions.split(",") if p in chosen for v in chosen[p].split(",") if v]
    unknown = [f"{p}:{v}" for p, v in plan if p not in ("bf16", "4bit") or v not in VARIANTS]
    unknown += [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}; precisions bf16, 4bit; variants: {', '.join(VARIANTS)}; "
                     f"scenarios: {', '.join(SCENARIOS)}")
    budget = Budget(args.budget_s)
    OUT.mkdir(parents=True, exist_ok=True)
    import transformers

    log({"env": dict(device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", torch=torch.__version__,
                     transformers=transformers.__version__, size=args.size, new_tokens=args.new_tokens,
                     plan=[f"{p}:{v}" for p, v in plan])})
    run_plan(prepare_checkpoint(args), plan, args, budget)
    print_table()


if __name__ == "__main__":
    main()
