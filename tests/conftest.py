"""Shared fixtures: a tiny Gemma 3 built offline, seed-schema data, one trained run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures import write_audit_fixture, write_seed_parquet

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(*args: str, cwd: Path = ROOT, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a project command line as a user would, in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from radiology.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def seed_data_dir(tmp_path_factory) -> Path:
    return write_seed_parquet(tmp_path_factory.mktemp("data") / "radiology_mini")


@pytest.fixture(scope="session")
def audit_data(tmp_path_factory) -> tuple[Path, dict[tuple[str, str], set[str]]]:
    """train/test parquet of distinct real images with five planted problems, and those problems."""
    folder = tmp_path_factory.mktemp("audit") / "planted"
    return folder, write_audit_fixture(folder)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, seed_data_dir) -> Path:
    """One real train.py run on the tiny recipe: adapter in the folder, merged model in merged/."""
    out = tmp_path_factory.mktemp("run") / "out"
    run_cli("train.py", "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
            "--dataset_name", str(seed_data_dir), "--output_dir", str(out))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """One `transformers serve` of the tiny model for every test that needs a served model (tests/servers.py)."""
    from tests.servers import Server

    running = Server(tiny_model_dir, tmp_path_factory.mktemp("serve") / "server.log")
    yield running
    running.stop()


class RunningApp:
    """The demo served in this process on a free port, and what it serves."""

    def __init__(self, served, config, demo, stops):
        self.served, self.config, self.demo, self.stops = served, config, demo, stops
        self.url = f"http://127.0.0.1:{config.port}/"

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def close(self) -> None:
        self.demo.close()


def start_app(cache_dir: Path, baseline: Path | None = None, **options) -> RunningApp:
    """Build and launch the demo on the tiny model, as `python app.py` does without a model (with
    ``baseline``: as `python app.py --baseline FOLDER`; with ``server_url=...`` in ``options``: on a
    served model, as `python app.py --server_url URL`)."""
    import app
    from radiology.serve import StopRegistry, load_for_demo

    config = app.AppConfig(host="127.0.0.1", port=free_port(), **options)
    remote, baseline_remote = app.remote_models(config)
    served = load_for_demo(None, cache_dir=cache_dir, baseline=str(baseline) if baseline else None, remote=remote,
                           baseline_remote=baseline_remote)
    stops = StopRegistry()
    demo = app.build_demo(served, config, stops=stops)
    app.launch(demo, config, prevent_thread_lock=True, quiet=True)
    return RunningApp(served, config, demo, stops)


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """One demo for the tests that only use it (concurrency 1, the default)."""
    running = start_app(tmp_path_factory.mktemp("app-cache"))
    yield running
    running.close()


@pytest.fixture(scope="session")
def baseline_server(tmp_path_factory):
    """A demo that answers with the tiny model and, beside it, a baseline: another tiny model with
    other random weights (seed 1), so that the two answers differ."""
    from radiology.tiny import write_tiny_model

    baseline = write_tiny_model(tmp_path_factory.mktemp("baseline") / "tiny-baseline-seed1", seed=1)
    running = start_app(tmp_path_factory.mktemp("baseline-app-cache"), baseline=baseline)
    yield running
    running.close()


@pytest.fixture
def refuse_loading(monkeypatch):
    """Make loading the data or the model a test failure: for checks that must stop train.py before either."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("the data or the model was loaded before the check that should have stopped it")

    monkeypatch.setattr("radiology.training.load_training_data", must_not_load)
    monkeypatch.setattr("radiology.training.build_trainer", must_not_load)


@pytest.fixture
def prompt_ids(monkeypatch) -> list[list[int]]:
    """The input ids of every prompt stream_text builds, in order (build_inputs is what it calls)."""
    import radiology.generate

    seen: list[list[int]] = []
    build_inputs = radiology.generate.build_inputs

    def spy(processor, image, instruction=None, context=None, prior=None, dialogue=None):
        inputs = build_inputs(processor, image, instruction, context, prior, dialogue=dialogue)
        seen.append(inputs["input_ids"][0].tolist())
        return inputs

    monkeypatch.setattr(radiology.generate, "build_inputs", spy)
    return seen
