"""Throughput through a served model: the same requests one at a time and N in flight.

    python bench/remote_throughput.py                                  # transformers serve, tiny model, CPU
    python bench/remote_throughput.py --url http://gpu-box:8000/v1     # a running vLLM / SGLang server
    python bench/remote_throughput.py --evaluate --rows 24             # radiology.evaluate --server_url

Sends ``--requests`` greedy requests (real MR/CT/RGB images from pydicom's test files, fixed
``--max_new_tokens``) through radiology.remote.RemoteModel.generate_many, first with concurrency 1,
then with ``--concurrency``, and prints requests/s for each and their ratio. Greedy answers must be
the same in both runs (a check that concurrency changes speed only). Without --url it writes the
tiny Gemma 3 to a temporary folder and serves it with `transformers serve` on the CPU for the run.

With ``--evaluate`` it runs the evaluation itself instead (``radiology.evaluate`` with ``--server_url``):
a seed-schema test split of ``--rows`` real images scored through the same server with ``--concurrency
1``, then ``--concurrency N``; it prints the generation time metrics.json records for each (rows/s),
the whole run's wall time, their ratio, and whether the predictions are the same.
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
    # The CLI's module rather than its script: the script may not sit beside this interpreter (pip --target).
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
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


def _evaluate(url: str, model: str | None, folder: Path, rows: int, concurrency: int, max_new_tokens: int) -> dict:
    """One radiology.evaluate run through the server: generation seconds (metrics.json), wall seconds, texts."""
    from radiology.data import DatasetArguments
    from radiology.evaluate import EvalArguments, EvalConfig, run_evaluation
    from radiology.remote import ServerArguments
    from tests.fixtures import write_seed_parquet

    data = folder / "data"
    if not data.exists():
        write_seed_parquet(data, splits={"test": rows}, bad_rows=False)
    config = EvalConfig(
        args=EvalArguments(output_dir=str(folder / f"eval-{concurrency}"), concurrency=concurrency,
                           bootstrap_resamples=200, examples=1),
        data=DatasetArguments(dataset_name=str(data)),
        settings=GenerationSettings(max_new_tokens=max_new_tokens, seed=0),
        server=ServerArguments(server_url=url, server_model=model, server_read_timeout=600),
    )
    start = time.perf_counter()
    outcome = run_evaluation(config)
    wall = time.perf_counter() - start
    served = outcome.metrics["models"]["model"]
    if served["errors"]:
        raise SystemExit(f"{served['errors']} of {rows} rows failed; see {outcome.output_dir / 'predictions.jsonl'}")
    return {"seconds": served["seconds"], "wall": wall, "texts": [row["model"]["text"] for row in outcome.predictions],
            "name": served["server_model"]}


def _report_evaluation(url: str, args: argparse.Namespace, one: dict, many: dict) -> None:
    print(f"radiology.evaluate --server_url {url} (model {one['name']}); {args.rows} rows, greedy, "
          f"max {args.max_new_tokens} new tokens")
    for label, run in (("1", one), (str(args.concurrency), many)):
        print(f"--concurrency {label}:  generation {run['seconds']:7.2f} s  {args.rows / run['seconds']:6.2f} rows/s;"
              f"  whole run {run['wall']:7.2f} s")
    print(f"ratio (generation): {one['seconds'] / many['seconds']:.2f}x; whole run: {one['wall'] / many['wall']:.2f}x; "
          f"same predictions: {one['texts'] == many['texts']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running server's API base (default: serve the tiny model here)")
    parser.add_argument("--model", default=None, help="served model name (default: the first listed)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument("--evaluate", action="store_true", help="time radiology.evaluate --server_url instead")
    parser.add_argument("--rows", type=int, default=24, help="rows of the evaluated split (with --evaluate)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        server = None
        url = args.url
        if url is None:
            server = _serve_tiny(Path(scratch) / "tiny", args.port, Path(scratch) / "serve.log")
            url = f"http://127.0.0.1:{args.port}/v1"
        try:
            model = RemoteModel(url, args.model, read_timeout=600)
            if args.evaluate:
                model.generate_many([RemoteRequest(image) for image in _images()[:2]],
                                    GenerationSettings(max_new_tokens=args.max_new_tokens), concurrency=2)  # warm-up
                one = _evaluate(url, args.model, Path(scratch), args.rows, 1, args.max_new_tokens)
                many = _evaluate(url, args.model, Path(scratch), args.rows, args.concurrency, args.max_new_tokens)
                _report_evaluation(url, args, one, many)
                return
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
