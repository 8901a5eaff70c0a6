"""Generation speed on the GPU: plain ``model.generate`` and the package's path, side by side.

    python bench/generate_speed.py --out results/        # on a machine with a CUDA GPU

On Gemma 3 4B at its published shape with random weights (radiology.shapes), one 896x896 image,
a fixed number of new tokens (stop tokens ignored), in one run:
  plain     model.generate(**inputs, do_sample=False) with a dynamic cache, as the seed does it
  package   radiology.generate.stream_text as the app uses it (streaming, radiology.engine underneath)
for bf16 and 4-bit NF4: time to first token (from the call, image preprocessing and encoder
included), decode tokens/s, peak memory; 4 concurrent requests (aggregate tokens/s); and whether
greedy output is token-for-token the same as plain generate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radiology.shapes import write_random_gemma3  # noqa: E402

OUT = Path(os.environ.get("OUT", "bench-results"))


def log(record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(OUT / "generate_speed.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def test_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8), mode="L").resize((896, 896))


def plain(loaded, image, new_tokens: int) -> dict:
    from radiology.generate import build_inputs

    ids = loaded.processor.tokenizer
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  pad_token_id=ids.pad_token_id)
    model = loaded.model

    def run(n: int) -> tuple[float, torch.Tensor]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        inputs = build_inputs(loaded.processor, image)
        inputs = {k: v.to("cuda") for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with torch.inference_mode():
            out = model.generate(**inputs, **{**kwargs, "max_new_tokens": n, "min_new_tokens": n})
        torch.cuda.synchronize()
        return time.perf_counter() - start, out[0, inputs["input_ids"].shape[1]:]

    run(4)
    run(4)
    first, _ = run(1)
    total, tokens = run(new_tokens)
    return dict(ttft_s=first, decode_tok_s=(new_tokens - 1) / (total - first), total_s=total,
                tokens=tokens.tolist())


def package(loaded, image, new_tokens: int) -> dict:
    from radiology.generate import GenerationSettings, build_inputs, stream_text

    settings = GenerationSettings(max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    start = time.perf_counter()
    first = None
    chunks = 0
    for _ in stream_text(loaded, image, settings=settings):
        chunks += 1
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    inputs = build_inputs(loaded.processor, image)
    tokens = loaded.engine.generate_ids(inputs, settings)
    return dict(ttft_s=first, decode_tok_s=(len(tokens) - 1) / (total - first), total_s=total,
                streamed_chunks=chunks, tokens=tokens, **loaded.engine.last_timings)


def concurrent(loaded, images, new_tokens: int, use_plain: bool) -> dict:
    from radiology.generate import GenerationSettings, build_inputs, stream_text

    settings = GenerationSettings(max_new_tokens=new_tokens)
    counts = [0] * len(images)
    lock = threading.Lock()

    def one(i: int) -> None:
        if use_plain:
            # Plain generate serves one request at a time: what a queue with concurrency 1 does.
            with lock:
                inputs = {k: v.to("cuda") for k, v in build_inputs(loaded.processor, images[i]).items()}
                inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
                with torch.inference_mode():
                    loaded.model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens)
            counts[i] = new_tokens
        else:
            text = ""
            for text in stream_text(loaded, images[i], settings=settings):
                pass
            counts[i] = new_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return dict(requests=len(images), aggregate_tok_s=sum(counts) / elapsed, wall_s=elapsed)


def run_precision(checkpoint: Path, four_bit: bool, new_tokens: int, attn: str, plain_concurrent: bool = True) -> None:
    from radiology.generate import load_for_generation

    name = "4bit" if four_bit else "bf16"
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    # Closed on leaving, failures included: the engine's worker thread holds the model, which would
    # otherwise stay on the GPU while the next precision is measured.
    with load_for_generation(str(checkpoint), load_in_4bit=four_bit, device="cuda", attn_implementation=attn) as loaded:
        measure_precision(loaded, name, new_tokens, plain_concurrent)


def measure_precision(loaded, name: str, new_tokens: int, plain_concurrent: bool) -> None:
    from radiology.generate import warm_up

    loaded.engine.ignore_stop_tokens = True
    log({"precision": name, "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2)})
    images = [test_image(i) for i in range(4)]
    baseline = plain(loaded, images[0], new_tokens)
    tokens_plain = baseline.pop("tokens")
    log({"precision": name, "path": "plain", **{k: round(v, 4) for k, v in baseline.items()}})
    start = time.perf_counter()
    warm_up(loaded)
    log({"precision": name, "warm_up_s": round(time.perf_counter() - start, 1)})
    torch.cuda.reset_peak_memory_stats()
    fast = package(loaded, images[0], new_tokens)
    tokens_fast = fast.pop("tokens")
    same = next((i for i, (a, b) in enumerate(zip(tokens_plain, tokens_fast)) if a != b), len(tokens_fast))
    log({"precision": name, "path": "package", **{k: round(v, 4) for k, v in fast.items()},
         "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
         "greedy_identical_tokens": same, "of": len(tokens_plain),
         "speedup": round(fast["decode_tok_s"] / baseline["decode_tok_s"], 2)})
    for use_plain in (True, False) if plain_concurrent else (False,):
        result = concurrent(loaded, images, new_tokens, use_plain)
        log({"precision": name, "path": "plain" if use_plain else "package", "concurrent": result})
    single = concurrent(loaded, images[:1], new_tokens, False)
    log({"precision": name, "path": "package", "concurrent": single})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--precisions", default="bf16,4bit")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--checkpoint", default="/tmp/gemma3-4b")
    parser.add_argument("--skip_plain_concurrent", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    import transformers

    log({"env": dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__,
                     transformers=transformers.__version__)})
    checkpoint = write_random_gemma3("4b", args.checkpoint)
    for precision in args.precisions.split(","):
        try:
            run_precision(checkpoint, precision == "4bit", args.new_tokens, args.attn, not args.skip_plain_concurrent)
        except Exception as err:
            import traceback

            traceback.print_exc()
            log({"precision": precision, "error": repr(err)[:400]})
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
