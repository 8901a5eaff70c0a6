"""The demo (app.py) served on the tiny model and driven through gradio_client, as a user's browser
or a script would: streaming, bad files, load, Stop, GPU out-of-memory, upload clean-up, start-up."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
import torch
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app
from radiology.serve import StopRegistry, read_upload
from tests.conftest import ROOT, free_port, start_app
from tests.fixtures import encode, real_images

EXAMPLE = ROOT / "assets" / "ct_axial.png"


def generate_args(path: Path | str, max_new_tokens: int = 24, mode: str = "greedy", seed: int | None = None,
                  instruction: str = "Describe this image.") -> list:
    """The /generate endpoint's inputs, in the order of the UI's controls."""
    return [handle_file(str(path)), instruction, mode, 1.0, 0.95, 64, max_new_tokens, seed]


def token_count(served, text: str) -> int:
    return len(served.loaded.processor.tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------- options and pieces


def test_importing_app_launches_nothing():
    # A launch would block this interpreter (and print its URL); the import must return at once.
    result = subprocess.run(
        [sys.executable, "-c", "import app; print('imported', app.build_demo.__name__)"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "imported build_demo" in result.stdout
    assert "Running on" not in result.stdout + result.stderr


def test_options_come_from_flags_then_environment_then_defaults():
    environ = {"RADIOLOGY_MODEL": "org/model", "RADIOLOGY_4BIT": "yes", "RADIOLOGY_CONCURRENCY": "3",
               "RADIOLOGY_AUTH": "ana:s3cret,ben:pa:ss", "RADIOLOGY_PORT": "7999"}
    config = app.parse_args(["--port", "8001", "--no-load_in_4bit", "--adapter", "runs/r1"], environ)
    assert config.model == "org/model" and config.adapter == "runs/r1"
    assert config.load_in_4bit is False and config.port == 8001  # flags win
    assert config.concurrency == 3 and config.auth == [("ana", "s3cret"), ("ben", "pa:ss")]
    defaults = app.parse_args([], {})
    assert defaults == app.AppConfig()
    assert defaults.model is None and defaults.concurrency == 1 and defaults.max_queue >= 8


@pytest.mark.parametrize("variable, value, expected", [
    ("RADIOLOGY_CONCURRENCY", "two", "RADIOLOGY_CONCURRENCY: invalid literal"),
    ("RADIOLOGY_MAX_QUEUE", "0", "RADIOLOGY_MAX_QUEUE: must be 1 or more"),
    ("RADIOLOGY_4BIT", "maybe", "RADIOLOGY_4BIT: expected true/false"),
    ("RADIOLOGY_AUTH", "nopassword", "RADIOLOGY_AUTH: expected user:password"),
])
def test_bad_environment_values_name_the_variable(capsys, variable, value, expected):
    with pytest.raises(SystemExit):
        app.parse_args([], {variable: value})
    assert expected in capsys.readouterr().err


def test_settings_from_the_controls():
    greedy = app.settings_from_ui("greedy", 0.5, 0.9, 10, 32, None, 1024)
    assert not greedy.do_sample and greedy.max_new_tokens == 32
    sampling = app.settings_from_ui("sampling", 0.5, 0.9, 10, 32, 7, 1024)
    assert sampling.do_sample and sampling.temperature == 0.5 and sampling.top_k == 10 and sampling.seed == 7
    with pytest.raises(ValueError, match="between 1 and 1024"):
        app.settings_from_ui("greedy", 1.0, 0.9, 10, 5000, None, 1024)
    with pytest.raises(ValueError, match="'greedy' or 'sampling'"):
        app.settings_from_ui("beam", 1.0, 0.9, 10, 32, None, 1024)
    with pytest.raises(ValueError, match="temperature"):
        app.settings_from_ui("sampling", 0.0, 0.9, 10, 32, None, 1024)
    with pytest.raises(ValueError, match="seed must be between 0 and"):
        app.settings_from_ui("sampling", 1.0, 0.9, 10, 32, -1, 1024)


def test_on_zero_gpu_the_gpu_function_gets_only_picklable_arguments(app_server, monkeypatch):
    calls = []

    class FakeSpaces:  # what ZeroGPU's decorator does that matters here: pickle the call's arguments
        @staticmethod
        def GPU(duration):
            def wrap(fn):
                def run(*args, **kwargs):
                    calls.append(duration)
                    pickle.dumps((args, kwargs))  # sent to a worker process on ZeroGPU
                    yield from fn(*args, **kwargs)
                return run
            return wrap

    monkeypatch.setattr(app, "spaces", FakeSpaces)
    generate = app.make_generate(app_server.served.loaded, StopRegistry(), app.AppConfig(gpu_duration=33))
    updates = list(generate(str(EXAMPLE), "Describe.", "greedy", 1.0, 0.95, 64, 8, None,
                            gr.Request(session_hash="zero")))
    assert calls == [33]
    assert updates[-1][0].strip() and "done" in updates[-1][1]


def test_examples_are_small_readable_images_with_source_and_licence():
    examples = app.load_examples()
    manifest = json.loads((ROOT / "assets" / "examples.json").read_text())
    assert len(examples) == len(manifest) >= 3
    for example in examples:
        path = Path(example["path"])
        assert path.stat().st_size < 100_000, f"{path.name} is over 100 KB"
        assert read_upload(path).mode == "RGB"
        assert example["caption"] and example["source"] and example["licence"]
        assert path.name in (ROOT / "assets" / "README.md").read_text()


def test_pillow_bomb_guard_stays_on_with_the_app_imported():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 200_000_000


# --------------------------------------------------------------------------- the served app


def test_page_shows_disclaimer_demo_notice_and_model(app_server):
    with urllib.request.urlopen(app_server.url + "config") as response:
        config = response.read().decode()
    assert json.dumps(app.DISCLAIMER)[1:-1] in config
    assert "Demo model: the output is meaningless text" in config
    assert "No model is configured" in config
    assert "tiny demo model (random weights)" in config and "bf16" in config


def test_queue_and_concurrency_follow_the_options(app_server):
    assert app_server.demo._queue.max_size == app_server.config.max_queue
    generate = next(d for d in app_server.demo.fns.values() if d.api_name == "generate")
    assert generate.concurrency_limit == app_server.config.concurrency == 1
    stop = next(d for d in app_server.demo.fns.values() if d.api_name == "stop")
    assert stop.concurrency_limit is None  # Stop must run while generation holds the GPU slot


def test_image_in_streamed_text_out(app_server):
    job = app_server.client().submit(*generate_args(EXAMPLE, max_new_tokens=24), api_name="/generate")
    updates = list(job)
    text, about = job.result()
    assert text.strip()
    growing = [t for t, _ in updates if t]
    assert len(set(growing)) >= 3, "the text should arrive in several pieces"
    assert all(text.startswith(part) for part in growing)
    assert "tiny demo model (random weights)" in about and "greedy, max 24 new tokens" in about
    assert "done in" in about


def test_same_image_and_settings_give_the_same_greedy_text(app_server):
    client = app_server.client()
    first = client.predict(*generate_args(EXAMPLE, max_new_tokens=16), api_name="/generate")[0]
    second = client.predict(*generate_args(EXAMPLE, max_new_tokens=16), api_name="/generate")[0]
    assert first and first == second


def test_sampling_with_a_seed_is_reproducible(app_server):
    client = app_server.client()
    runs = [client.predict(*generate_args(EXAMPLE, 16, "sampling", seed=3), api_name="/generate") for _ in range(2)]
    assert runs[0][0] == runs[1][0]
    assert "sampling" in runs[0][1] and "seed 3" in runs[0][1]


def test_preview_shows_what_the_model_sees(app_server, tmp_path):
    tiff = tmp_path / "scan.tiff"
    tiff.write_bytes(encode(real_images()["ct_16bit"], "TIFF"))
    preview = app_server.client().predict(handle_file(str(tiff)), api_name="/preview")
    image = Image.open(preview)
    assert image.size == real_images()["ct_16bit"].size


@pytest.mark.parametrize("kind", ["corrupt png", "text named .png"])
def test_bad_file_gives_a_clear_error_and_the_next_request_works(app_server, tmp_path, kind):
    png = encode(real_images()["mr_gray"], "PNG")
    bad = tmp_path / "upload.png"
    bad.write_bytes(png[: len(png) // 2] if kind == "corrupt png" else b"Findings: none. This is a text file.\n")
    client = app_server.client()
    with pytest.raises(AppError) as caught:
        client.predict(*generate_args(bad), api_name="/generate")
    message = str(caught.value)
    assert "could not be decoded" in message or "not a readable PNG, JPEG" in message
    assert "upload" in message.lower()  # says what to do
    text, about = client.predict(*generate_args(EXAMPLE, max_new_tokens=8), api_name="/generate")
    assert text.strip() and "done" in about


def test_unsupported_file_type_is_refused_by_name(app_server, tmp_path):
    notes = tmp_path / "report.txt"
    notes.write_text("not an image")
    with pytest.raises(AppError, match=r"Invalid file type.*\.png"):
        app_server.client().predict(*generate_args(notes), api_name="/generate")


def test_eight_requests_at_once_are_all_answered(app_server):
    results: dict[int, tuple[str, str]] = {}
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            results[index] = app_server.client().predict(*generate_args(EXAMPLE, max_new_tokens=12),
                                                         api_name="/generate")
        except BaseException as err:  # collected: a thread's exception would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert sorted(results) == list(range(8))
    assert all(text.strip() and "done" in about for text, about in results.values())
    assert len({text for text, _ in results.values()}) == 1  # greedy: every user gets the same answer


def test_stop_ends_a_long_generation_early(app_server, monkeypatch):
    # The random tiny model may end its answer early on its own, or settle into special tokens that
    # show no text: without stop tokens, and sampling with a seed, a long request stays long and
    # visible until Stop ends it.
    monkeypatch.setattr(app_server.served.loaded, "stop_token_ids", [])
    client = app_server.client()
    # The same seeded request runs to 200 tokens when nobody stops it ...
    unstopped, _ = client.predict(*generate_args(EXAMPLE, max_new_tokens=200, mode="sampling", seed=3),
                                  api_name="/generate")
    full = token_count(app_server.served, unstopped)  # special tokens the model emits do not show
    assert full >= 150
    # ... and Stop, pressed after the first piece of a 1000-token request, ends it well before that.
    job = client.submit(*generate_args(EXAMPLE, max_new_tokens=1000, mode="sampling", seed=3), api_name="/generate")
    deadline = time.monotonic() + 120
    while not any(update[0] for update in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(update[0] for update in job.outputs()), "no text arrived"
    stopped_at = time.monotonic()
    client.predict(api_name="/stop")
    text, about = job.result(timeout=120)
    assert time.monotonic() - stopped_at < 10
    assert "stopped by user" in about
    assert token_count(app_server.served, text) < full / 2
    assert unstopped.startswith(text[: len(text) // 2])  # the same answer, cut short


def test_stop_reaches_only_the_sessions_own_generation(app_server):
    mine, theirs = app_server.client(), app_server.client()
    job = mine.submit(*generate_args(EXAMPLE, max_new_tokens=40), api_name="/generate")
    deadline = time.monotonic() + 120
    while not any(update[0] for update in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    theirs.predict(api_name="/stop")  # another user's Stop, while this generation runs
    _, about = job.result(timeout=120)
    assert "done" in about and "stopped" not in about


# --------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    """A second demo whose uploads expire after one second and may weigh 200 KB at most."""
    running = start_app(tmp_path_factory.mktemp("fault-cache"), upload_ttl=1, max_file_size="200kb")
    yield running
    running.close()


def test_gpu_out_of_memory_frees_memory_and_the_app_keeps_serving(fault_server, monkeypatch):
    model = fault_server.served.loaded.model
    freed = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(model, "forward", out_of_memory)  # every generation path calls the forward
    client = fault_server.client()
    with pytest.raises(AppError, match="ran out of memory.*keeps serving"):
        client.predict(*generate_args(EXAMPLE), api_name="/generate")
    assert freed, "torch.cuda.empty_cache was not called"
    monkeypatch.undo()
    text, about = client.predict(*generate_args(EXAMPLE, max_new_tokens=8), api_name="/generate")
    assert text.strip() and "done" in about


def test_other_generation_failures_are_a_clear_message(fault_server, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("some internal key")

    monkeypatch.setattr(fault_server.served.loaded.model, "forward", broken)
    with pytest.raises(AppError, match=r"Generation failed \(KeyError\)"):
        fault_server.client().predict(*generate_args(EXAMPLE), api_name="/generate")


def test_uploads_over_the_size_limit_are_refused(fault_server, tmp_path):
    noise = Image.frombytes("L", (700, 700), os.urandom(700 * 700))  # incompressible: ~490 KB as PNG
    big = tmp_path / "big.png"
    big.write_bytes(encode(noise, "PNG"))
    assert big.stat().st_size > 400_000
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # checked before sending, and by the server
        fault_server.client().predict(*generate_args(big), api_name="/generate")
    small = tmp_path / "small.png"
    small.write_bytes(encode(noise.resize((100, 100)), "PNG"))
    text, _ = fault_server.client().predict(*generate_args(small, max_new_tokens=4), api_name="/generate")
    assert text.strip()


def test_uploads_are_deleted_from_the_cache(fault_server, tmp_path):
    upload = tmp_path / "private.png"
    upload.write_bytes(encode(real_images()["mr_gray"], "PNG"))
    fault_server.client().predict(*generate_args(upload, max_new_tokens=4), api_name="/generate")
    stored = [Path(p) for p in fault_server.demo.upload_file_set if Path(p).name == "private.png"]
    assert stored, "the upload should have reached the server's cache"
    deadline = time.monotonic() + 15
    while any(p.exists() for p in stored) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not any(p.exists() for p in stored)


# --------------------------------------------------------------------------- python app.py


def test_require_model_exits_with_the_reason_instead_of_serving_the_tiny_model(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    assert app.main(["--model", missing, "--require_model", "--cache_dir", str(tmp_path)]) == 2
    assert f"error: {missing} could not be loaded" in capsys.readouterr().err


def test_python_app_py_starts_on_the_tiny_model_and_answers(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RADIOLOGY_PORT": str(port), "RADIOLOGY_HOST": "127.0.0.1",
           "RADIOLOGY_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("RADIOLOGY_MODEL", None)
    log = tmp_path / "app.log"
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "Running on local URL" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.5)
        assert "Running on local URL" in log.read_text(), log.read_text()
        from gradio_client import Client

        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        text, about = client.predict(*generate_args(EXAMPLE, max_new_tokens=8), api_name="/generate")
        assert text.strip() and "tiny demo model" in about
        # A broken upload whose name carries a (made-up) patient's identity.
        broken = tmp_path / "DOE_JOHN_19570312.png"
        broken.write_bytes(b"not an image")
        with pytest.raises(AppError):
            client.predict(*generate_args(broken), api_name="/generate")
        output = log.read_text()
        assert "serving the tiny demo model" in output and "meaningless" in output
        # Nothing about the uploads (names, content) reaches the log.
        assert "ct_axial" not in output and "DOE_JOHN" not in output and "not an image" not in output
    finally:
        process.terminate()
        process.wait(timeout=30)
