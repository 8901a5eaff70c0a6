"""The demo on a served model (`python app.py --server_url URL`): gradio_client against the app wired
to a real `transformers serve` of the tiny Gemma 3 (tests/servers.py), through a relay that keeps
every byte the app sends it."""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import urllib.request

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

import app
from radiology.generate import GenerationSettings
from radiology.remote import RemoteModel
from radiology.serve import load_study
from tests.conftest import free_port, start_app
from tests.fixtures import SENTINEL, sentinel_hits, write_sentinel_dicom
from tests.servers import Proxy
from tests.test_app import EXAMPLE, generate_args
from tests.test_remote import LONG, RefusingServer, _cancellations, _wait_for_cancellation


@pytest.fixture(scope="module")
def relay(server):
    proxy = Proxy(server.port)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def served_app(relay, tmp_path_factory):
    """The demo as `python app.py --server_url RELAY --max_new_tokens LONG` starts it."""
    running = start_app(tmp_path_factory.mktemp("served-app-cache"), server_url=relay.url, max_new_tokens=LONG)
    yield running
    running.close()


def _page_config(running) -> dict:
    with urllib.request.urlopen(running.url + "config") as response:
        return json.loads(response.read().decode())


def _component(config: dict, elem_id: str) -> dict:
    return next(c["props"] for c in config["components"] if c["props"].get("elem_id") == elem_id)


def _expected(images, settings: GenerationSettings, url: str, **kwargs) -> str:
    """The server's answer asked directly, without the app."""
    return RemoteModel(url).generate(images, "Describe this image.", settings, **kwargs)


# --------------------------------------------------------------------------- options


def test_server_options_come_from_flags_or_variables_and_refuse_a_mix(capsys):
    config = app.parse_args([], environ={"RADIOLOGY_SERVER_URL": "http://gpu:8000/v1", "RADIOLOGY_SERVER_MODEL": "m",
                                         "RADIOLOGY_BASELINE_MODEL": "base", "RADIOLOGY_SERVER_READ_TIMEOUT": "7"})
    assert (config.server_url, config.server_model, config.baseline_model, config.server_read_timeout) == (
        "http://gpu:8000/v1", "m", "base", 7.0)
    remote, baseline = app.remote_models(config)
    assert (remote.url, remote.model) == ("http://gpu:8000/v1", "m")
    assert (baseline.url, baseline.model) == ("http://gpu:8000/v1", "base")  # the same server by default
    assert app.remote_models(app.parse_args([], environ={})) == (None, None)
    for argv, message in [
        (["--server_url", "http://gpu:8000"], "must be http"),
        (["--server_url", "http://gpu:8000/v1", "--model", "runs/r1/merged"], "leave out --model"),
        (["--baseline_model", "base"], "give --baseline_server_url"),
        (["--baseline", "google/gemma-3-4b-pt", "--baseline_server_url", "http://gpu:8001/v1"],
         "give the baseline once"),
    ]:
        with pytest.raises(SystemExit):
            app.parse_args(argv, environ={})
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app.parse_args([], environ={"RADIOLOGY_SERVER_READ_TIMEOUT": "0"})
    assert "RADIOLOGY_SERVER_READ_TIMEOUT: must be above 0 seconds" in capsys.readouterr().err


def test_require_model_exits_with_the_reason_when_the_server_is_down(capsys):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    assert app.main(["--server_url", dead, "--require_model"]) == 2
    assert "connection refused" in capsys.readouterr().err


# --------------------------------------------------------------------------- through the server


def test_the_model_panel_names_the_server_and_no_model_is_loaded(served_app, relay, tiny_model_dir):
    assert [type(m).__name__ for m in served_app.served.models] == ["RemoteModel"]
    assert served_app.served.server_problem is None
    config = _page_config(served_app)
    panel = _component(config, "model-panel")["value"]
    assert f"served by {relay.url} (model {tiny_model_dir})".replace("_", "\\_") in panel
    assert "model server's" in panel and "footprint" not in panel
    assert _component(config, "server-notice")["visible"] is False


def test_a_good_request_is_answered_by_the_server_with_the_image_the_app_renders(served_app, server):
    client = served_app.client()
    job = client.submit(*generate_args(EXAMPLE, max_new_tokens=24), api_name="/generate")
    updates = list(job)
    text, about = job.result()
    assert text and text == _expected(load_study([str(EXAMPLE)]).images,
                                      GenerationSettings(max_new_tokens=24), server.url)
    assert len({u[0] for u in updates if u[0]}) >= 2  # it streamed
    assert "served by" in about and "greedy, max 24 new tokens" in about and "done in" in about
    # Sampling maps too: seed, temperature, top-p and top-k reach the server.
    sampled = client.predict(*generate_args(EXAMPLE, max_new_tokens=16, mode="sampling", seed=7), api_name="/generate")
    settings = GenerationSettings(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.95, top_k=64, seed=7)
    assert sampled[0] == _expected(load_study([str(EXAMPLE)]).images,
                                   settings, server.url)


def test_a_bad_request_is_refused_before_the_server_hears_of_it(served_app, relay):
    before = len(relay.requests())
    args = generate_args(EXAMPLE)
    args[3] = 9.0  # temperature beyond its range
    with pytest.raises(AppError, match="Temperature"):
        served_app.client().predict(*args, api_name="/generate")
    assert len(relay.requests()) == before


def test_patient_data_never_reaches_the_server(served_app, relay, server, tmp_path):
    scan = write_sentinel_dicom(tmp_path, f"{SENTINEL}-scan.dcm")
    prior = write_sentinel_dicom(tmp_path, f"{SENTINEL}-prior.dcm")
    before = len(relay.requests())
    args = [*generate_args(scan, max_new_tokens=8), "Cough for 3 weeks.", "auto", None, handle_file(str(prior))]
    text, about = served_app.client().predict(*args, api_name="/generate")
    sent = relay.requests()[before:]
    bodies = b"".join(body for _, body in sent)
    images = re.findall(rb"data:image/png;base64,([A-Za-z0-9+/=]+)", bodies)
    assert len(images) == 2 and b"Cough for 3 weeks." in bodies  # the images and the history did travel
    hits = sentinel_hits(*(head + body for head, body in sent), *(base64.b64decode(i) for i in images),
                         server.log_text(), text, about)
    print(f"sentinel hits in {len(sent)} requests and the server log: {len(hits)}")
    assert hits == []


def _wait_for_text(job, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(update[0] for update in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(update[0] for update in job.outputs()), "no text arrived"


def test_stop_closes_the_stream_and_the_server_stops_generating(served_app, server):
    client = served_app.client()
    before = len(_cancellations(server))
    job = client.submit(*generate_args(EXAMPLE, max_new_tokens=LONG), api_name="/generate")
    _wait_for_text(job)
    client.predict(api_name="/stop")
    text, about = job.result(timeout=120)
    assert "stopped by user" in about
    generated = _wait_for_cancellation(server, before)
    print(f"the server cancelled the generation after {generated} of {LONG} tokens")
    assert generated < LONG


def test_a_server_that_dies_mid_stream_keeps_the_text_so_far_and_the_next_request_is_answered(served_app, relay):
    client = served_app.client()
    job = client.submit(*generate_args(EXAMPLE, max_new_tokens=LONG), api_name="/generate")
    _wait_for_text(job)
    relay.cut()
    with pytest.raises(AppError, match="closed the connection after .* the text so far is kept"):
        job.result(timeout=120)
    assert [u for u in job.outputs() if u[0]]  # the text so far stayed on the page
    assert "closed the connection" in served_app.served.server_problem
    text, about = client.predict(*generate_args(EXAMPLE, max_new_tokens=8), api_name="/generate")
    assert text and "done in" in about and served_app.served.server_problem is None


def test_a_dead_server_is_named_on_the_page_and_the_app_recovers_when_it_returns(server, tmp_path):
    port = free_port()
    running = start_app(tmp_path, server_url=f"http://127.0.0.1:{port}/v1")
    proxy = None
    try:
        notice = _component(_page_config(running), "server-notice")
        assert notice["visible"] and "connection refused" in notice["value"]
        assert "tries the server again" in notice["value"]
        client = running.client()
        with pytest.raises(AppError, match="could not answer: cannot connect .*connection refused"):
            client.predict(*generate_args(EXAMPLE, max_new_tokens=8), api_name="/generate")
        proxy = Proxy(server.port, port=port)  # the server is back
        text, about = client.predict(*generate_args(EXAMPLE, max_new_tokens=8), api_name="/generate")
        assert text and "done in" in about
        assert running.served.server_problem is None and app.server_notice(running.served).visible is False
    finally:
        running.close()
        if proxy is not None:
            proxy.close()


def test_a_server_that_never_answers_is_a_message_after_the_read_timeout(tmp_path):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never says a word
    running = start_app(tmp_path, server_url=f"http://127.0.0.1:{silent.getsockname()[1]}/v1", server_read_timeout=1)
    try:
        assert "read timeout" in running.served.server_problem
        with pytest.raises(AppError, match="sent nothing within the read timeout"):
            running.client().predict(*generate_args(EXAMPLE, max_new_tokens=8), api_name="/generate")
    finally:
        running.close()
        silent.close()


def test_a_served_model_without_vision_is_named_as_such(tmp_path):
    refusing = RefusingServer("At most 0 image(s) may be provided in one prompt.")
    running = start_app(tmp_path, server_url=refusing.url)
    try:
        assert "has no vision tower" in running.served.server_problem
        with pytest.raises(AppError, match="has no vision tower"):
            running.client().predict(*generate_args(EXAMPLE, max_new_tokens=8), api_name="/generate")
    finally:
        running.close()
        refusing.close()


def test_a_served_baseline_answers_beside_the_served_model(server, relay, tmp_path, tiny_model_dir):
    running = start_app(tmp_path, server_url=relay.url, baseline_server_url=server.url)
    try:
        text, about, baseline_text, baseline_about = running.client().predict(
            *generate_args(EXAMPLE, max_new_tokens=12), api_name="/generate")
        assert text and text == baseline_text  # one model behind both URLs, greedy
        assert f"served by {relay.url}" in about and f"served by {server.url}" in baseline_about
        panel = _component(_page_config(running), "model-panel")["value"]
        assert "**Baseline:** served by" in panel
    finally:
        running.close()
