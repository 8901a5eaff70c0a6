"""Generation through a served model (radiology.remote) against a real OpenAI-compatible server:
`transformers serve` on the tiny Gemma 3, started here as a subprocess on the CPU."""

from __future__ import annotations

import base64
import io
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from radiology.data import DEFAULT_INSTRUCTION, build_messages, decode_image
from radiology.generate import GenerationSettings, generate_text, load_for_generation
from radiology.remote import (
    RemoteModel,
    RemoteModelError,
    RemoteRequest,
    _redact,
    check_server,
    openai_messages,
)
from tests.conftest import free_port
from tests.fixtures import SENTINEL, real_images, sentinel_hits, write_sentinel_dicom
from tests.servers import Proxy, Server

CANCELLED = re.compile(r"test-hook: generation cancelled after (\d+) tokens")
LONG = 1500  # new tokens that take the tiny model minutes on a shared CPU: only a cancel ends them early


# --------------------------------------------------------------------------- fixtures (the server: tests/conftest.py)


@pytest.fixture(scope="session")
def remote(server) -> RemoteModel:
    return RemoteModel(server.url)


@pytest.fixture(scope="session")
def image() -> Image.Image:
    return real_images()["mr_gray"]


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The same model loaded here, generating with plain model.generate as the server does. (The
    decode engine can differ from it at a bf16 near-tie: on this image with context, by one ulp at
    token 45; so it is not the reference for prompt equality.)"""
    return load_for_generation(str(tiny_model_dir), device="cpu", fast=False)


# --------------------------------------------------------------------------- the prompt


def test_prompt_is_the_training_user_turn_with_images_first_in_order(image):
    second = real_images()["rgb"]
    messages = openai_messages([image, second], "Describe.", context="Fever for 3 days.")
    expected_text = build_messages("Describe.", context="Fever for 3 days.")[0]["content"][1]["text"]
    content = messages[0]["content"]
    assert [item["type"] for item in content] == ["image_url", "image_url", "text"]
    assert content[2]["text"] == expected_text
    for item, picture in zip(content, [image, second]):
        url = item["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert sent.tobytes() == decode_image(picture).tobytes()  # the pixels the local path uses
    assert openai_messages(image)[0]["content"][1]["text"] == DEFAULT_INSTRUCTION


def test_image_metadata_never_travels(image):
    planted = decode_image(image)
    exif = Image.Exif()
    exif[0x010E] = f"{SENTINEL} image description"  # ImageDescription
    planted.info.update(icc_profile=SENTINEL.encode() * 8, comment=SENTINEL, exif=exif.tobytes())
    url = openai_messages(planted)[0]["content"][0]["image_url"]["url"]
    png = base64.b64decode(url.split(",", 1)[1])
    assert not sentinel_hits(png)
    assert "icc_profile" not in Image.open(io.BytesIO(png)).info


def test_bad_inputs_are_refused_before_any_request():
    with pytest.raises(ValueError, match="/v1"):
        RemoteModel("http://localhost:8000")
    with pytest.raises(ValueError, match="PIL images"):
        openai_messages(["scan.png"])
    assert "/v1" in check_server("localhost:8000")


def test_a_server_reason_is_shortened_and_loses_echoed_image_data_and_context():
    echoed = "bad request: {'url': 'data:image/png;base64," + "iVBORw0KGgo" * 50 + "', 'text': 'Fever 39C'}"
    reason = _redact(echoed, secrets=["Fever 39C"])
    assert "iVBORw0KGgo" not in reason and "Fever 39C" not in reason
    assert "[image data]" in reason and len(reason) <= 300


# --------------------------------------------------------------------------- through the server


def test_stream_arrives_in_pieces_that_grow(remote, image):
    pieces = list(remote.stream(image, settings=GenerationSettings(max_new_tokens=40)))
    assert len(pieces) >= 3
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
    assert pieces[-1] == remote.generate(image, settings=GenerationSettings(max_new_tokens=40))


def test_greedy_through_the_server_equals_local_generation(remote, local, image):
    settings = GenerationSettings(max_new_tokens=48)
    for context in (None, "Fever for 3 days; known COPD."):
        expected = generate_text(local, image, settings=settings, context=context)
        assert expected  # a non-empty answer, so that equality means something
        assert remote.generate(image, settings=settings, context=context) == expected


def test_sampling_is_seeded_and_top_k_reaches_the_server(remote, local, image):
    def sample(seed: int, top_k: int) -> str:
        settings = GenerationSettings(max_new_tokens=16, do_sample=True, seed=seed, top_k=top_k)
        return remote.generate(image, settings=settings)

    assert sample(3, 64) == sample(3, 64)
    assert sample(3, 64) != sample(4, 64)
    # top_k=1 leaves one candidate per step, whatever the seed: the local answer with top_k=1.
    top_1 = generate_text(local, image, settings=GenerationSettings(max_new_tokens=16, do_sample=True, seed=0, top_k=1))
    assert sample(5, 1) == sample(6, 1) == top_1
    assert sample(5, 0) != top_1  # without top-k the same seed samples something else


def test_the_default_model_is_the_one_the_server_lists(remote, tiny_model_dir):
    assert remote.resolve_model() == str(tiny_model_dir)
    assert remote.name == str(tiny_model_dir)
    assert remote.device == f"served by {remote.url} (model {tiny_model_dir})"
    assert check_server(remote.url) is None


def test_a_model_the_server_does_not_serve(server, tiny_model_dir, image):
    message = check_server(server.url, "no-such-model")
    assert "does not serve model 'no-such-model'" in message and str(tiny_model_dir) in message
    with pytest.raises(RemoteModelError, match="it serves: " + re.escape(str(tiny_model_dir))):
        RemoteModel(server.url, "no-such-model").generate(image)


def test_a_server_that_is_not_running(image):
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert "connection refused" in check_server(url)
    with pytest.raises(RemoteModelError, match="cannot connect .*connection refused.*--server_url"):
        RemoteModel(url, "m").generate(image)


def test_a_server_that_never_answers_hits_the_read_timeout(image):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never says a word
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
    try:
        assert "read timeout" in check_server(url, read_timeout=1)
        with pytest.raises(RemoteModelError, match="sent nothing within the read timeout.*--server_read_timeout"):
            RemoteModel(url, "m", read_timeout=1).generate(image)
    finally:
        silent.close()


def _cancellations(server: Server) -> list[int]:
    return [int(n) for n in CANCELLED.findall(server.log_text())]


def _wait_for_cancellation(server: Server, before: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _cancellations(server)
        if len(found) > before:
            return found[-1]
        time.sleep(0.2)
    raise AssertionError(f"the server did not cancel the generation:\n{server.log_text()[-2000:]}")


def test_stop_closes_the_stream_and_the_server_cancels_the_generation(server, remote, image):
    settings = GenerationSettings(max_new_tokens=LONG)
    stop = threading.Event()
    before = len(_cancellations(server))
    pieces = []
    for text in remote.stream(image, settings=settings, stop=stop):
        pieces.append(text)
        if len(pieces) == 2:
            stop.set()
    assert len(pieces) == 2  # the stream ended at the stop, not at the end of the answer
    assert _wait_for_cancellation(server, before) < LONG

    # Closing the iterator (a client that stops listening) does the same.
    before = len(_cancellations(server))
    stream = remote.stream(image, settings=settings)
    next(stream)
    stream.close()
    assert _wait_for_cancellation(server, before) < LONG


def test_a_server_that_dies_mid_stream_keeps_the_partial_text(tiny_model_dir, tmp_path, image):
    doomed = Server(tiny_model_dir, tmp_path / "doomed.log")
    try:
        pieces: list[str] = []
        with pytest.raises(RemoteModelError, match="closed the connection.*the text so far is kept") as caught:
            for text in RemoteModel(doomed.url).stream(image, settings=GenerationSettings(max_new_tokens=LONG)):
                pieces.append(text)
                if len(pieces) == 2:
                    doomed.kill()
        assert pieces and caught.value.partial == pieces[-1]
    finally:
        doomed.stop()


def test_a_connection_the_server_closes_unanswered_is_tried_again_once(server, tiny_model_dir, image):
    settings = GenerationSettings(max_new_tokens=8)
    expected = RemoteModel(server.url).generate(image, settings=settings)
    flaky = Proxy(server.port, drop_first=1)
    try:
        assert RemoteModel(flaky.url, str(tiny_model_dir)).generate(image, settings=settings) == expected
    finally:
        flaky.close()
    twice = Proxy(server.port, drop_first=2)  # once is retried, not twice: the message names the cause
    try:
        with pytest.raises(RemoteModelError, match="disconnected without sending a response"):
            RemoteModel(twice.url, str(tiny_model_dir)).generate(image, settings=settings)
    finally:
        twice.close()


def test_requests_never_carry_dicom_header_values(server, tmp_path):
    from radiology.dicom import read_dicom_image

    rendered = read_dicom_image(write_sentinel_dicom(tmp_path))
    proxy = Proxy(server.port)
    try:
        answer = RemoteModel(proxy.url).generate(rendered.image, settings=GenerationSettings(max_new_tokens=8))
    finally:
        proxy.close()
    sent = bytes(proxy.sent)
    assert b"data:image/png;base64," in sent  # the image did travel, so the check below means something
    assert not sentinel_hits(sent, answer)
    for encoded in re.findall(rb"data:image/png;base64,([A-Za-z0-9+/=]+)", sent):
        assert not sentinel_hits(base64.b64decode(encoded))
    assert not sentinel_hits(server.log_text())


def test_several_requests_in_flight_keep_their_order(remote, image):
    other = real_images()["rgb"]
    settings = GenerationSettings(max_new_tokens=12)
    rows = [RemoteRequest(image), RemoteRequest(image, context="<end_of_turn>"), RemoteRequest(other),
            RemoteRequest(image)]
    results = remote.generate_many(rows, settings, concurrency=3)
    assert results[0] == results[3] == remote.generate(image, settings=settings)
    assert results[2] == remote.generate(other, settings=settings) != results[0]
    assert isinstance(results[1], ValueError) and "<end_of_turn>" in str(results[1])


def _write_text_only_model(folder: Path) -> Path:
    """The tiny Gemma 3's language model alone (no vision tower) with its tokenizer and template."""
    from transformers import Gemma3ForCausalLM

    from radiology.tiny import build_tiny_model, build_tiny_processor

    processor = build_tiny_processor()
    text_model = Gemma3ForCausalLM(build_tiny_model(processor).config.text_config)
    tokenizer = processor.tokenizer
    tokenizer.chat_template = processor.chat_template
    text_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_served_model_without_vision_is_named_as_such(tmp_path):
    text_only = Server(_write_text_only_model(tmp_path / "text-only"), tmp_path / "text-only.log")
    try:
        message = check_server(text_only.url)
    finally:
        text_only.stop()
    assert message is not None and "has no vision tower" in message and "multimodal merged folder" in message


class RefusingServer:
    """A minimal HTTP server answering as vLLM does (its error body, status 400) to every chat
    request: how vLLM refuses images for a text-only model, or more images than it allows."""

    def __init__(self, message: str):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 (http.server's name)
                self._send(200, {"object": "list", "data": [{"id": "served", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self._send(400, {"object": "error", "message": message, "type": "BadRequestError",
                                 "param": None, "code": 400})

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("message, expected", [
    ("At most 0 image(s) may be provided in one prompt.", "has no vision tower"),
    ("served is not a multimodal model None", "has no vision tower"),
    ("At most 2 image(s) may be provided in one prompt. Set `--limit-mm-per-prompt` to increase this limit.",
     "takes at most 2 image"),
])
def test_vllm_refusals_become_messages_that_say_what_to_do(image, message, expected):
    refusing = RefusingServer(message)
    try:
        with pytest.raises(RemoteModelError, match=expected):
            RemoteModel(refusing.url).generate([image, image, image])
        if "vision" in expected:
            assert expected in check_server(refusing.url)
    finally:
        refusing.close()


def test_training_and_evaluation_import_without_the_server_client_which_only_a_server_url_needs():
    """A GPU box set up for training may lack the openai client: train.py must still start there."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = """
import builtins
real = builtins.__import__
def without_client(name, globals=None, *args, **kwargs):
    if name in ("openai", "httpx2") and (globals or {}).get("__name__") == "radiology.remote":
        raise ImportError(name)
    return real(name, globals, *args, **kwargs)
builtins.__import__ = without_client
import radiology.training, radiology.evaluate
from radiology.remote import RemoteModel, RemoteModelError
try:
    RemoteModel("http://127.0.0.1:9/v1")
except RemoteModelError as err:
    print("refused:", err)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: a server URL needs the openai client: pip install -r requirements.txt" in done.stdout
