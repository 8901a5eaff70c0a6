"""The serve stage: the upload door, the demo model fallback, stop signals, fault helpers."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from radiology.serve import (
    DEMO_MODEL_NAME,
    UPLOAD_SUFFIXES,
    StopRegistry,
    UploadError,
    UserStop,
    demo_model_dir,
    describe_model,
    free_accelerator_memory,
    is_out_of_memory,
    load_for_demo,
    read_upload,
)
from tests.fixtures import encode, real_images

# A file name like the ones clinicians' exports carry: it must never reach an error message.
SENTINEL = "DOE_JOHN_19570312"

_PILLOW_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                  ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF"}


def _image_for(fmt: str) -> Image.Image:
    images = real_images()
    return {
        "TIFF": images["ct_16bit"],       # 16-bit grayscale, as scanners export it
        "GIF": images["palette"],
        "JPEG": images["rgb"],
        "BMP": images["mr_gray"],
        "WEBP": images["rgb"],
        "PNG": images["ct_16bit"],
    }[fmt]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_every_accepted_suffix_has_a_decoder():
    assert set(UPLOAD_SUFFIXES) == set(_PILLOW_FORMAT)


@pytest.mark.parametrize("suffix", UPLOAD_SUFFIXES)
def test_read_upload_decodes_every_supported_format_to_rgb(tmp_path, suffix):
    fmt = _PILLOW_FORMAT[suffix]
    source = _image_for(fmt)
    path = _write(tmp_path / f"{SENTINEL}{suffix.upper()}", encode(source, fmt))  # upper-case names too
    image = read_upload(path)
    assert image.mode == "RGB"
    assert image.size == source.size
    # A 16-bit image is stretched, not clipped to white: its picture survives.
    assert len(set(image.convert("L").getdata())) > 16


def test_read_upload_keeps_the_16_bit_contrast_of_a_tiff(tmp_path):
    path = _write(tmp_path / "ct.tiff", encode(real_images()["ct_16bit"], "TIFF"))
    gray = read_upload(path).convert("L")
    low, high = gray.getextrema()
    assert low == 0 and high == 255


def _bad_uploads(tmp_path) -> dict[str, tuple[object, str]]:
    png = encode(real_images()["mr_gray"], "PNG")
    ppm = encode(real_images()["mr_gray"], "PPM")
    return {
        "nothing": (None, "No image"),
        "text named .png": (_write(tmp_path / f"{SENTINEL}.png", b"this is a text file, not an image\n"),
                            "not a readable PNG"),
        "truncated png": (_write(tmp_path / f"{SENTINEL}_cut.png", png[: len(png) // 2]), "could not be decoded"),
        "ppm named .png": (_write(tmp_path / f"{SENTINEL}_ppm.png", ppm), "not a readable PNG"),
        "text file": (_write(tmp_path / f"{SENTINEL}.txt", b"hello"), "Unsupported file type .txt"),
        "no suffix": (_write(tmp_path / SENTINEL, png), "Unsupported file type (none)"),
        "deleted": (tmp_path / f"{SENTINEL}_gone.png", "no longer on the server"),
    }


@pytest.mark.parametrize("case", ["nothing", "text named .png", "truncated png", "ppm named .png",
                                  "text file", "no suffix", "deleted"])
def test_read_upload_refuses_with_a_clear_message_and_never_the_file_name(tmp_path, case):
    path, expected = _bad_uploads(tmp_path)[case]
    with pytest.raises(UploadError) as caught:
        read_upload(path)
    message = str(caught.value)
    assert expected in message
    assert SENTINEL not in message and str(tmp_path) not in message


def test_read_upload_keeps_the_decompression_bomb_guard(tmp_path):
    # 20000 x 20000 one-bit pixels compress to a few tens of KB: small file, huge image.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 200_000
    path = _write(tmp_path / "bomb.png", buffer.getvalue())
    assert Image.MAX_IMAGE_PIXELS is not None
    with pytest.raises(UploadError, match="too large to decode safely"):
        read_upload(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(UPLOAD_SUFFIXES))
def test_read_upload_raises_only_its_own_error_on_random_bytes(tmp_path, data, suffix):
    path = _write(tmp_path / f"random{suffix}", data)
    try:
        image = read_upload(path)
    except UploadError:
        return
    assert image.mode == "RGB"  # random bytes that happen to decode are fine, as RGB


def test_stop_registry_stops_only_the_sessions_own_generations():
    stops = StopRegistry()
    with stops.running("alice") as (key_a, event_a), stops.running("bob") as (key_b, event_b):
        assert stops.event(key_a) is event_a and len(stops) == 2
        assert stops.stop("alice") == 1
        assert event_a.is_set() and event_a.requested
        assert not event_b.is_set() and not event_b.requested
    assert len(stops) == 0
    assert stops.stop("alice") == 0


def test_stop_registry_gives_a_fresh_event_for_an_unknown_key():
    event = StopRegistry().event("not-registered")
    assert isinstance(event, threading.Event) and not event.is_set()


def test_user_stop_tells_a_requested_stop_from_a_natural_end():
    natural, asked = UserStop(), UserStop()
    natural.set()  # what stream_text does when generation ends by itself
    asked.request()
    assert natural.is_set() and not natural.requested
    assert asked.is_set() and asked.requested


def test_out_of_memory_is_recognised_and_memory_is_freed(monkeypatch):
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    free_accelerator_memory()
    assert calls == [1]


def test_demo_model_is_built_once_in_the_cache(tmp_path):
    first = demo_model_dir(tmp_path)
    weights = sorted(first.glob("*.safetensors"))
    assert weights and (first / "config.json").is_file() and (first / "processor_config.json").is_file()
    stamp = weights[0].stat().st_mtime_ns
    assert demo_model_dir(tmp_path) == first
    assert weights[0].stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-")]  # no staging left behind


def test_load_for_demo_without_a_model_serves_the_tiny_one(tmp_path):
    served = load_for_demo(None, cache_dir=tmp_path)
    assert served.placeholder and served.reason == "no model is configured"
    assert served.loaded.name == DEMO_MODEL_NAME
    assert served.loaded.precision == "bf16" and served.loaded.device == "cpu"


def test_load_for_demo_falls_back_with_the_reason_when_the_model_is_missing(tmp_path):
    missing = str(tmp_path / "no-such-model")
    served = load_for_demo(missing, cache_dir=tmp_path)
    assert served.placeholder
    assert missing in served.reason and "could not be loaded" in served.reason
    with pytest.raises(OSError):
        load_for_demo(missing, cache_dir=tmp_path, require_model=True)


def test_load_for_demo_serves_a_configured_model(tiny_model_dir, tmp_path):
    served = load_for_demo(str(tiny_model_dir), cache_dir=tmp_path)
    assert not served.placeholder and served.reason is None
    assert served.loaded.name == tiny_model_dir.name
    line = describe_model(served.loaded)
    assert tiny_model_dir.name in line and "bf16" in line and "cpu" in line
