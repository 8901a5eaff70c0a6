"""Loaded models are freed when their users are done with them: the decode engine's worker thread
holds the model, so dropping the last reference is not enough; close() ends it."""

from __future__ import annotations

import gc
import os
import signal
import time
import weakref

import pytest

import radiology.evaluate as evaluate_module
from radiology.data import DatasetArguments
from radiology.evaluate import EvalArguments, EvalConfig, run_evaluation
from radiology.generate import GenerationSettings, generate_text, load_for_generation, stream_text
from radiology.serve import load_for_demo
from tests.fixtures import real_images

SETTINGS = GenerationSettings(max_new_tokens=4)
IMAGE = real_images()["rgb"]


def _dead(ref: weakref.ref) -> bool:
    gc.collect()
    return ref() is None


def test_close_frees_a_model_whose_engine_has_served(tiny_model_dir):
    loaded = load_for_generation(str(tiny_model_dir))
    assert generate_text(loaded, IMAGE, settings=SETTINGS)  # the engine's worker now runs
    worker, model = loaded.engine._worker, weakref.ref(loaded.model)
    loaded.close()
    assert _dead(model) and not worker.is_alive() and loaded.closed
    with pytest.raises(RuntimeError, match="was closed; load it again"):
        generate_text(loaded, IMAGE, settings=SETTINGS)
    loaded.close()  # a second close does nothing


def test_a_with_block_frees_the_model_on_leaving_even_after_a_failure(tiny_model_dir):
    with pytest.raises(ZeroDivisionError):
        with load_for_generation(str(tiny_model_dir)) as loaded:
            model = weakref.ref(loaded.model)
            for _ in stream_text(loaded, IMAGE, settings=SETTINGS):
                pass
            1 / 0
    assert _dead(model)


def test_evaluation_frees_each_model_before_loading_the_next(tiny_model_dir, seed_data_dir, tmp_path, monkeypatch):
    models: list[weakref.ref] = []

    def recording_load(*args, **kwargs):
        assert all(_dead(ref) for ref in models), "the previous model is still in memory"
        loaded = load_for_generation(*args, **kwargs)
        models.append(weakref.ref(loaded.model))
        return loaded

    monkeypatch.setattr(evaluate_module, "load_for_generation", recording_load)
    args = EvalArguments(model=str(tiny_model_dir), baseline=str(tiny_model_dir), output_dir=str(tmp_path / "eval"),
                         device="cpu", max_samples=2, bootstrap_resamples=20)
    run_evaluation(EvalConfig(args=args, data=DatasetArguments(dataset_name=str(seed_data_dir)), settings=SETTINGS))
    assert len(models) == 2 and all(_dead(ref) for ref in models)


def test_demo_model_close_frees_the_model_and_the_baseline(tiny_model_dir, tmp_path):
    served = load_for_demo(None, cache_dir=tmp_path, baseline=str(tiny_model_dir))
    refs = []
    for loaded in served.models:
        assert generate_text(loaded, IMAGE, settings=SETTINGS)
        refs.append(weakref.ref(loaded.model))
    served.close()
    assert len(refs) == 2 and all(_dead(ref) for ref in refs)


class _Terminated(Exception):
    """Raised by the test's own SIGTERM handler: main() must put its own in place while serving."""


def test_app_frees_the_models_when_sigterm_stops_the_server(tmp_path, monkeypatch):
    import app

    served_models: list = []
    refs: list[weakref.ref] = []

    def serve_until_terminated(demo, config, **overrides):
        for loaded in served_models[0].models:
            assert generate_text(loaded, IMAGE, settings=SETTINGS)
            refs.append(weakref.ref(loaded.model))
        os.kill(os.getpid(), signal.SIGTERM)  # as `docker stop` does
        time.sleep(30)  # Gradio's serving loop; the signal ends it
        raise AssertionError("SIGTERM did not stop serving")

    def recording_load_for_demo(*args, **kwargs):
        served_models.append(load_for_demo(*args, **kwargs))
        return served_models[-1]

    monkeypatch.setattr(app, "load_for_demo", recording_load_for_demo)
    monkeypatch.setattr(app, "build_demo", lambda served, config: None)
    monkeypatch.setattr(app, "launch", serve_until_terminated)

    def ours(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        assert app.main(["--cache_dir", str(tmp_path)]) == 0
        assert signal.getsignal(signal.SIGTERM) is ours, "main() gives the previous handler back"
    finally:
        signal.signal(signal.SIGTERM, previous)
    (served,) = served_models
    assert served.loaded.closed and refs and all(_dead(ref) for ref in refs)
