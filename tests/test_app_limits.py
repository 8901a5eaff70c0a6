"""The demo's resource bounds, measured on `python app.py` in its own process: the memory that
parallel previews of huge uploads take, and what uploads leave in Gradio's temporary folder."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.fixtures import encode, real_images
from tests.test_app import app_process_in, generate_args

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads Linux's /proc")


@pytest.fixture(scope="module")
def short_lived_app(tmp_path_factory):
    """`python app.py` whose uploads (and previews) expire after a few seconds."""
    with app_process_in(tmp_path_factory.mktemp("limits"), RADIOLOGY_UPLOAD_TTL="5") as running:
        yield running


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _previews_at_once(url: str, paths: list[Path]) -> list[BaseException | tuple]:
    results: list[BaseException | tuple] = []

    def one(path: Path) -> None:
        try:
            results.append(Client(url, verbose=False).predict(handle_file(str(path)), "header", api_name="/preview"))
        except BaseException as err:  # collected: a thread's exception would otherwise vanish
            results.append(err)

    threads = [threading.Thread(target=one, args=(path,)) for path in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def test_parallel_previews_of_huge_images_stay_within_a_bounded_memory(short_lived_app, tmp_path):
    pid = short_lived_app.process.pid
    # 6000 x 6000 16-bit: under the upload budget (64 MP), above the working one (16.7 MP). A flat
    # image compresses to a small file; decoding it still takes the full 72 MB, and converting it
    # at full size took ~300 MB more (a float copy, then RGB), for each preview at once.
    large = []
    for level in range(4):  # four different images: four different previews
        large.append(tmp_path / f"large{level}.png")
        large[-1].write_bytes(encode(Image.fromarray(np.full((6000, 6000), 1200 + level, dtype=np.uint16)), "PNG"))
    # 13000 x 13000: under Pillow's own bomb limit, over the upload budget.
    huge = tmp_path / "huge.png"
    huge.write_bytes(encode(Image.new("L", (13000, 13000)), "PNG"))
    assert all(path.stat().st_size < 2_000_000 for path in [*large, huge])

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    before = _status_kib(pid, "VmRSS")
    results = _previews_at_once(short_lived_app.url, large) + _previews_at_once(short_lived_app.url, [huge] * 4)
    grown_mib = (_status_kib(pid, "VmHWM") - before) / 1024

    print(f"peak growth {grown_mib:.0f} MiB")
    assert grown_mib < 900, f"4 parallel previews of 36 MP 16-bit images took {grown_mib:.0f} MiB at the peak"
    shown = [r for r in results[:4] if isinstance(r, tuple)]
    assert len(shown) == 4, results[:4]
    assert all(r[0] is not None and Image.open(r[0]).width * Image.open(r[0]).height <= 4096 * 4096 for r in shown), shown
    refused = [r for r in results[4:] if isinstance(r, BaseException)]
    # A preview's problem is a warning on the page; through the API the preview comes back empty.
    assert len(refused) + sum(1 for r in results[4:] if isinstance(r, tuple) and r[0] is None) == 4, results[4:]


def test_huge_image_gets_a_message_naming_the_budget(short_lived_app, tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(encode(Image.new("1", (9000, 9000)), "PNG"))
    with pytest.raises(AppError, match=r"9000 x 9000 pixels \(81 megapixels\).*up to 64 megapixels\. Downscale"):
        Client(short_lived_app.url, verbose=False).predict(*generate_args(huge, max_new_tokens=4),
                                                           api_name="/generate")


def test_nothing_of_the_uploads_stays_in_gradios_temporary_folder(short_lived_app, tmp_path):
    gradio_folder = short_lived_app.folders[0]
    kept_before = {p for p in gradio_folder.rglob("*") if p.is_file()}  # the example images' copies
    upload = tmp_path / "private_scan.png"
    upload.write_bytes(encode(real_images()["mr_gray"], "PNG"))
    client = Client(short_lived_app.url, verbose=False)
    for _ in range(3):
        client.predict(handle_file(str(upload)), "header", api_name="/preview")
        text, _ = client.predict(*generate_args(upload, max_new_tokens=4), api_name="/generate")
        assert text.strip()
    with pytest.raises(AppError):  # a refused request leaves nothing either
        client.predict(*generate_args(upload, max_new_tokens=4), None, "PHI-4242", None, api_name="/generate")
    deadline = time.monotonic() + 30
    left: list[Path] = []
    while time.monotonic() < deadline:
        left = [p for p in gradio_folder.rglob("*") if p.is_file() and p not in kept_before]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"left in Gradio's temporary folder after the uploads expired: {left}"
