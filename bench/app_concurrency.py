"""The demo on a served model under concurrent requests: N gradio_client requests at once.

    python bench/app_concurrency.py                                   # transformers serve, tiny model, CPU
    python bench/app_concurrency.py --url http://127.0.0.1:8000/v1    # a vLLM / SGLang server on this machine
    python bench/app_concurrency.py --counts 8 32 --max_queue 16

Starts the app (``app.py --server_url``) in this process in front of the server, with a TCP relay
between them that keeps every byte the app sends. For each count N in ``--counts`` it submits N
Generate requests at once through one gradio_client Client, each uploading a DICOM file with planted
patient data (tests/fixtures.py), and prints how many were answered, how many were refused with a
message (the queue full: --max_queue), and how many failed otherwise, with the wall time. At the end
it prints how often the planted values appear in the requests sent to the server (their bodies and
the PNG images in them) and in the server's log: the expected count is 0.
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from radiology.serve import load_for_demo  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.fixtures import sentinel_hits, write_sentinel_dicom  # noqa: E402
from tests.servers import Proxy, Server  # noqa: E402


def _outcome(job) -> str:
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    try:
        text, about = job.result(timeout=600)
    except QueueError as err:  # more than --max_queue waiting: refused at once, with Gradio's message
        return f"queue full: {err}"
    except AppError as err:
        return f"refused: {str(err)[:80]}"
    except Exception as err:  # anything else is what this script is here to find
        return f"failed: {type(err).__name__}: {str(err)[:80]}"
    return "answered" if text and "done in" in about else f"empty: {about[:80]}"


def run(count: int, client, scan: Path, max_new_tokens: int) -> Counter:
    from gradio_client import handle_file

    args = [handle_file(str(scan)), "Describe this image.", "greedy", 1.0, 0.95, 64, max_new_tokens, None]
    started = time.perf_counter()
    jobs = [client.submit(*args, api_name="/generate") for _ in range(count)]
    outcomes = Counter(_outcome(job) for job in jobs)
    print(f"{count} at once: {dict(outcomes)} in {time.perf_counter() - started:.1f} s", flush=True)
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server's API base on this machine (the relay reaches 127.0.0.1 only; "
                        "default: transformers serve of the tiny model)")
    parser.add_argument("--counts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--max_queue", type=int, default=16, help="the app's --max_queue")
    parser.add_argument("--concurrency", type=int, default=None, help="the app's --concurrency (default: its own)")
    args = parser.parse_args()

    from gradio_client import Client

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        server = None
        if args.url is None:
            from radiology.tiny import write_tiny_model

            server = Server(write_tiny_model(folder / "tiny"), folder / "server.log")
            upstream = server.port
        else:
            upstream = int(re.search(r":(\d+)/", args.url).group(1))
        relay = Proxy(upstream)
        config = app.AppConfig(host="127.0.0.1", port=free_port(), server_url=relay.url, max_queue=args.max_queue,
                               concurrency=args.concurrency)
        remote, _ = app.remote_models(config)
        served = load_for_demo(None, remote=remote)
        demo = app.build_demo(served, config)
        app.launch(demo, config, prevent_thread_lock=True, quiet=True)
        print(f"app on {relay.url} ({served.loaded.device}); concurrency "
              f"{config.concurrency or app.default_concurrency(served.loaded)}, max queue {config.max_queue}")
        try:
            client = Client(f"http://127.0.0.1:{config.port}/", verbose=False)
            scan = write_sentinel_dicom(folder, "scan.dcm")
            for count in args.counts:
                run(count, client, scan, args.max_new_tokens)
            sent = relay.requests()
            images = re.findall(rb"data:image/png;base64,([A-Za-z0-9+/=]+)", b"".join(body for _, body in sent))
            texts = [head + body for head, body in sent] + [base64.b64decode(i) for i in images]
            if server is not None:
                texts.append(server.log_text())
            hits = sentinel_hits(*texts)
            print(f"requests sent to the server: {len(sent)} ({len(images)} images); "
                  f"planted patient data found in them and the server log: {len(hits)} times")
        finally:
            demo.close()
            relay.close()
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
