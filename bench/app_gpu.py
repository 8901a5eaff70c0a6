"""The demo on a GPU as its users meet it: app.py's start-up steps (load, warm-up, launch) on a model folder,
then concurrent gradio_client requests with a real image, then a CUDA out-of-memory fault forced on one
request, then one more request, which must be served.

    source bench/device_setup.sh && python3 bench/app_gpu.py --model /tmp/gemma3-4b --requests 8

The model is loaded in this process, as `python app.py --model FOLDER --require_model` does, so that the
out-of-memory fault can be forced: the process's CUDA memory is capped just above what it holds, a request
asks for the longest answer, and the cap is lifted again. Answers run to exactly --max_new_tokens (the decode
engine ignores stop tokens here, the mechanism the other benchmarks use), so tokens/s are exact counts.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request_args(image: Path, max_new_tokens: int) -> list:
    """/generate's inputs in the order of the page's controls (the later ones take their defaults)."""
    from gradio_client import handle_file

    return [handle_file(str(image)), "Describe this image.", "greedy", 1.0, 0.95, 64, max_new_tokens, None]


def timed_request(url: str, image: Path, max_new_tokens: int) -> dict:
    from gradio_client import Client

    started = time.perf_counter()
    try:
        result = Client(url, verbose=False).predict(*request_args(image, max_new_tokens), api_name="/generate")
        return {"ok": True, "seconds": time.perf_counter() - started, "chars": len(result[0]), "line": result[1]}
    except Exception as err:  # the page's message, as a script sees it
        return {"ok": False, "seconds": time.perf_counter() - started, "error": f"{type(err).__name__}: {err}"}


def force_out_of_memory(url: str, image: Path, limit_tokens: int) -> dict:
    """One request under a memory cap just above what the process holds: it must fail with the app's
    out-of-memory message (not a crash), and the cap is lifted afterwards whatever happens."""
    import torch

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    held = torch.cuda.memory_reserved(0)
    torch.cuda.set_per_process_memory_fraction(min(1.0, (held + (16 << 20)) / total), 0)
    try:
        return timed_request(url, image, limit_tokens)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (e.g. the 4B shape with random weights)")
    parser.add_argument("--requests", type=int, default=8, help="concurrent requests")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--image", default=str(ROOT / "assets" / "ct_axial.png"))
    parser.add_argument("--concurrency", default=None, help="app.py's --concurrency (default: the app's)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import app
    from radiology.serve import StopRegistry, load_for_demo, warm_up_on_gpu

    started = time.perf_counter()
    config = app.parse_args(["--model", args.model, "--require_model", "--host", "127.0.0.1",
                             "--port", str(free_port())] + (["--concurrency", args.concurrency] if args.concurrency else []))
    served = load_for_demo(config.model, config.adapter, config.load_in_4bit, config.device, config.cache_dir,
                           require_model=True)
    loaded_s = time.perf_counter() - started
    warm_up_s = warm_up_on_gpu(served.loaded)
    engine = served.loaded.engine
    if engine is not None:
        engine.ignore_stop_tokens = True  # every answer is exactly --max_new_tokens long
    demo = app.build_demo(served, config, stops=StopRegistry())
    app.launch(demo, config, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{config.port}/"
    ready_s = time.perf_counter() - started
    print(f"model {served.loaded.name}, {served.loaded.precision} on {served.loaded.device}; loaded in {loaded_s:.1f} s, "
          f"warm-up {warm_up_s or 0:.1f} s, serving after {ready_s:.1f} s; Generate's concurrency "
          f"{config.concurrency or 'default (the engine batch)'}")
    image = Path(args.image)

    one = timed_request(url, image, args.max_new_tokens)
    print(f"1 request: {json.dumps(one)}; {args.max_new_tokens / one['seconds']:.1f} tokens/s as a client sees it")
    wall = time.perf_counter()
    with ThreadPoolExecutor(args.requests) as pool:
        results = list(pool.map(lambda _: timed_request(url, image, args.max_new_tokens), range(args.requests)))
    wall = time.perf_counter() - wall
    answered = sum(r["ok"] for r in results)
    aggregate = answered * args.max_new_tokens / wall
    print(f"{args.requests} concurrent: {answered} answered in {wall:.1f} s, aggregate {aggregate:.1f} tokens/s "
          f"({aggregate / (args.max_new_tokens / one['seconds']):.2f}x one request); slowest {max(r['seconds'] for r in results):.1f} s")
    for r in results:
        if not r["ok"]:
            print("  failed:", r["error"])

    import torch

    oom = after = None
    verdict = True
    if torch.cuda.is_available() and served.loaded.device.startswith("cuda"):
        oom = force_out_of_memory(url, image, config.max_new_tokens)
        print(f"forced out-of-memory request: {json.dumps(oom)}")
        after = timed_request(url, image, args.max_new_tokens)
        print(f"next request: {json.dumps(after)}")
        verdict = not oom["ok"] and "out of memory" in oom.get("error", "") and after["ok"]
        print("out-of-memory handled, next request served:", verdict)
    else:
        print("out-of-memory fault: not forced (no CUDA device)")
    if args.json:
        Path(args.json).write_text(json.dumps({"loaded_s": loaded_s, "warm_up_s": warm_up_s, "ready_s": ready_s,
                                               "one": one, "concurrent": results, "wall_s": wall,
                                               "aggregate_tokens_per_s": aggregate, "oom": oom, "after": after}))
    demo.close()
    served.close()
    return 0 if answered == args.requests and verdict else 1


if __name__ == "__main__":
    sys.exit(main())
