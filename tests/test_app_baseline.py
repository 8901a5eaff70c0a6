"""The demo with a baseline (`python app.py --baseline ...`): one Generate streams the served model's
answer, then the baseline's, side by side, each with the model and settings that produced it."""

from __future__ import annotations

import html
import json
import time
import urllib.request

import pytest
from gradio_client.exceptions import AppError

import app
from radiology.serve import DemoModel, load_for_demo
from tests.test_app import EXAMPLE, generate_args


def _page_config(server) -> dict:
    with urllib.request.urlopen(server.url + "config") as response:
        return json.loads(response.read().decode())


def _elem_ids(config: dict) -> set[str]:
    return {c["props"].get("elem_id") for c in config["components"]} - {None}


def test_one_generate_streams_both_answers_side_by_side(baseline_server):
    served = baseline_server.served
    job = baseline_server.client().submit(*generate_args(EXAMPLE, max_new_tokens=24), api_name="/generate")
    updates = list(job)
    text, about, baseline_text, baseline_about = job.result()
    assert text.strip() and baseline_text.strip()
    assert text != baseline_text  # two models with different weights
    # Each answer streams: the model's first, while the baseline waits, then the baseline's.
    growing = [u[0] for u in updates if u[0] and not u[2]]
    growing_baseline = [u[2] for u in updates if u[2]]
    assert len(set(growing)) >= 2 and len(set(growing_baseline)) >= 2
    assert all(baseline_text.startswith(part) for part in growing_baseline)
    assert any("waiting" in u[3] for u in updates if u[0] and not u[2])
    # The line under each answer names its model and the settings used.
    assert about.startswith(served.loaded.name) and baseline_about.startswith(served.baseline.name)
    assert served.baseline.name == "tiny-baseline-seed1" and served.baseline.name not in about
    for line in (about, baseline_about):
        assert "greedy, max 24 new tokens" in line and "done in" in line


def test_page_labels_the_baseline_and_shows_it_in_the_model_panel(baseline_server):
    config = _page_config(baseline_server)
    assert {"answer", "answer-settings", "baseline-answer", "baseline-answer-settings"} <= _elem_ids(config)
    text = json.dumps(config)
    assert "Baseline, for comparison: tiny-baseline-seed1" in text
    panel = next(c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "model-panel")
    assert "**Baseline:** `tiny-baseline-seed1`" in panel and "baseline footprint:" in panel


def test_without_a_baseline_the_page_has_one_answer(app_server):
    assert "baseline-answer" not in _elem_ids(_page_config(app_server))
    result = app_server.client().predict(*generate_args(EXAMPLE, max_new_tokens=4), api_name="/generate")
    assert len(result) == 2


def _wait_for(job, column: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(update[column] for update in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(update[column] for update in job.outputs()), "no text arrived"


@pytest.mark.parametrize("during", ["model", "baseline"])
def test_stop_ends_the_request_for_both_models(baseline_server, monkeypatch, during):
    # With stop tokens ignored (the engine's forced length), the random models write until Stop (or max_new_tokens).
    for loaded in baseline_server.served.models:
        monkeypatch.setattr(loaded.engine, "ignore_stop_tokens", True)
    client = baseline_server.client()
    job = client.submit(*generate_args(EXAMPLE, max_new_tokens=1000, mode="sampling", seed=3), api_name="/generate")
    _wait_for(job, 0 if during == "model" else 2)
    stopped_at = time.monotonic()
    client.predict(api_name="/stop")
    text, about, baseline_text, baseline_about = job.result(timeout=120)
    assert time.monotonic() - stopped_at < 10
    if during == "model":
        assert "stopped by user" in about
        assert baseline_text == "[not run: stopped by user]" and "not run (stopped by user)" in baseline_about
    else:
        assert "done in" in about and text.strip()
        assert "stopped by user" in baseline_about and baseline_text.strip()


def test_a_baseline_that_cannot_be_loaded_is_named_on_the_page(tmp_path, capsys):
    missing = str(tmp_path / "no-such-baseline")
    served = load_for_demo(None, cache_dir=tmp_path, baseline=missing)
    assert isinstance(served, DemoModel) and served.baseline is None
    page = json.dumps(app.build_demo(served).config, default=repr)  # (a gr.State's delete callback is a function)
    assert html.escape(f"The baseline {missing} could not be loaded") in page
    assert html.escape("this page shows the model's answer alone") in page and "baseline-notice" in page
    assert app.main(["--baseline", missing, "--require_model", "--cache_dir", str(tmp_path)]) == 2
    assert f"error: the baseline {missing} could not be loaded" in capsys.readouterr().err


def test_errors_before_generation_leave_both_models_free(baseline_server, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    client = baseline_server.client()
    with pytest.raises(AppError, match="not a readable PNG"):
        client.predict(*generate_args(notes), api_name="/generate")
    text, _, baseline_text, _ = client.predict(*generate_args(EXAMPLE, max_new_tokens=4), api_name="/generate")
    assert text.strip() and baseline_text.strip()


def test_main_warms_up_each_model_and_logs_the_seconds(tiny_model_dir, tmp_path, monkeypatch, caplog):
    warmed, launched = [], []
    # What warm_up_on_gpu returns on CUDA (seconds) for both models; launching is left out.
    monkeypatch.setattr(app, "warm_up_on_gpu", lambda loaded: warmed.append(loaded.name) or 1.5)
    monkeypatch.setattr(app, "launch", lambda demo, config: launched.append(config))
    caplog.set_level("INFO", logger="radiology.app")
    assert app.main(["--baseline", str(tiny_model_dir), "--cache_dir", str(tmp_path)]) == 0
    assert warmed == ["tiny demo model (random weights)", tiny_model_dir.name] and len(launched) == 1
    assert "model warmed up in 1.5 s" in caplog.text and "baseline warmed up in 1.5 s" in caplog.text


def test_side_by_side_items_say_each_models_state_for_the_settings_lines(baseline_server, monkeypatch):
    """The app's lines come from stream_side_by_side's items: which model runs, which is done (cut at
    max new tokens here) or stopped, and for how long."""
    import threading

    from radiology.generate import GenerationSettings, SideBySideTexts, stream_side_by_side
    from radiology.serve import read_upload

    models, image = baseline_server.served.models, read_upload(EXAMPLE)
    for loaded in models:  # every answer runs to its max new tokens
        monkeypatch.setattr(loaded.engine, "ignore_stop_tokens", True)
    items = list(stream_side_by_side(models, image, settings=GenerationSettings(max_new_tokens=6)))
    assert all(isinstance(item, SideBySideTexts) for item in items)
    states = [tuple(item.states) for item in items]
    assert states[0] == ("generating", "waiting") and states[-1] == ("cut", "cut")
    assert ("cut", "generating") in states and items[-1].seconds[0] > 0 and items[-1].seconds[1] > 0
    # A stop asked while the first model writes: it is "stopped", the second "not run"; the
    # caller's event is set by nobody else, so "stopped" always means a person asked.
    stop = threading.Event()
    stream = stream_side_by_side(models, image, settings=GenerationSettings(max_new_tokens=200), stop=stop)
    assert next(stream).states == ["generating", "waiting"]
    stop.set()
    last = list(stream)[-1]
    assert last.states == ["stopped", "not run"] and last[1] == ""
    finished = threading.Event()
    list(stream_side_by_side(models[:1], image, settings=GenerationSettings(max_new_tokens=4), stop=finished))
    assert not finished.is_set()
