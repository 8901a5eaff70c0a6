"""Throughput through a served model: the same requests one at a time and N in flight.

    python bench/remote_throughput.py                                  # transformers serve, tiny model, CPU
    python bench/remote_throughput.py --url http://gpu-box:8000/v1     # a running vLLM / SGLang server

Sends ``--requests`` greedy requests (real MR/CT/RGB images from pydicom's test files, fixed
``--max_new_tokens``) through radiology.remote.RemoteModel.generate_many, first with concurrency 1,
then with ``--concurrency``, and prints requests/s for each and their ratio. Greedy answers must be
the same in both runs (a check that concurrency changes speed only). Without --url it writes the
tiny Gemma 3 to a temporary folder and serves it with `transformers serve` on the CPU for the run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radiology.generate import GenerationSettings  # noqa: E402
from radiology.remote import RemoteModel, RemoteRequest  # noqa: E402


def _images() -> list:
    from tests.fixtures import real_images

    pictures = real_images()
    return [pictures[name] for name in ("mr_gray", "ct_16bit", "rgb")]


def _serve_tiny(folder: Path, port: int, log: Path) -> subprocess.Popen:
    from radiology.tiny import write_tiny_model

    write_tiny_model(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"transformers serve exited; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"transformers serve did not come up in 180 s; see {log}")


def _timed(model: RemoteModel, rows: list[RemoteRequest], settings: GenerationSettings, concurrency: int):
    start = time.perf_counter()
    answers = model.generate_many(rows, settings, concurrency=concurrency)
    seconds = time.perf_counter() - start
    failed = [a for a in answers if isinstance(a, Exception)]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(rows)} requests failed, e.g.: {failed[0]}")
    return answers, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running server's API base (default: serve the tiny model here)")
    parser.add_argument("--model", default=None, help="served model name (default: the first listed)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=18931)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        server = None
        url = args.url
        if url is None:
            server = _serve_tiny(Path(scratch) / "tiny", args.port, Path(scratch) / "serve.log")
            url = f"http://127.0.0.1:{args.port}/v1"
        try:
            model = RemoteModel(url, args.model, read_timeout=600)
            images = _images()
            rows = [RemoteRequest(images[i % len(images)]) for i in range(args.requests)]
            settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
            model.generate_many(rows[:2], settings, concurrency=2)  # warm-up: model load, first-request costs
            one, t1 = _timed(model, rows, settings, 1)
            many, tn = _timed(model, rows, settings, args.concurrency)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    print(f"server: {url} (model {model.name}); {args.requests} greedy requests, max {args.max_new_tokens} new tokens")
    print(f"concurrency 1:  {t1:7.2f} s  {args.requests / t1:6.2f} requests/s")
    print(f"concurrency {args.concurrency}:  {tn:7.2f} s  {args.requests / tn:6.2f} requests/s")
    print(f"ratio: {t1 / tn:.2f}x; same answers: {one == many}")


if __name__ == "__main__":
    main()
