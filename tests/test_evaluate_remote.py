"""Evaluation through a served model (radiology.evaluate --server_url) against a real OpenAI-compatible
server: `transformers serve` on the tiny Gemma 3 on the CPU (tests/servers.py, one for the session).

The server generates one prompt at a time with plain ``model.generate``; the local reference is therefore
the same model loaded with ``fast=False`` (plain generate, not the decode engine, which can differ from it
at a bf16 near-tie) and ``--batch_size 1``: greedy answers must then be equal text for text."""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

import radiology.evaluate as evaluate_module
from radiology.data import DatasetArguments, decode_image, row_images
from radiology.evaluate import EvalArguments, EvalConfig, main, parse_config, run_evaluation
from radiology.generate import GenerationSettings, generate_text, load_for_generation
from radiology.remote import RemoteModel, ServerArguments
from tests.conftest import free_port
from tests.fixtures import files_with_sentinel, sentinel_hits, write_study_dataset
from tests.servers import Proxy, Server

TEST_ROWS = 6  # the seed fixture's test split
NEW_TOKENS = 12


def _read(folder: Path) -> tuple[dict, list[dict]]:
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows


def _flags(data: Path, out: Path, *more: str) -> list[str]:
    return ["--dataset_name", str(data), "--output_dir", str(out), "--max_new_tokens", str(NEW_TOKENS),
            "--bootstrap_resamples", "50", "--examples", "1", "--device", "cpu", *more]


def _plain_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models loaded by the evaluation generate with plain model.generate, as the server does."""
    monkeypatch.setattr(evaluate_module, "load_for_generation", functools.partial(load_for_generation, fast=False))


@pytest.fixture(scope="module")
def served_and_local(server, tiny_model_dir, seed_data_dir, tmp_path_factory) -> Path:
    """One run: the tiny model served (4 requests in flight) as the model, the same model loaded here as
    the baseline (plain generate, one row per call)."""
    out = tmp_path_factory.mktemp("eval-served") / "eval"
    with pytest.MonkeyPatch.context() as patch:
        _plain_generate(patch)
        assert main(_flags(seed_data_dir, out, "--server_url", server.url, "--model", "tiny (served)",
                           "--concurrency", "4", "--baseline", str(tiny_model_dir), "--batch_size", "1")) == 0
    return out


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return load_for_generation(str(tiny_model_dir), device="cpu", fast=False)


# --------------------------------------------------------------------------- same answers, same files


def test_served_answers_equal_local_generation_row_by_row(served_and_local, server, tiny_model_dir):
    metrics, rows = _read(served_and_local)
    assert len(rows) == metrics["dataset"]["scored"] == TEST_ROWS
    served = [row["model"]["text"] for row in rows]
    assert served == [row["baseline"]["text"] for row in rows]
    assert all(served) and len(set(served)) > 1, "answers that differ by image, so that equality means something"
    model, baseline = metrics["models"]["model"], metrics["models"]["baseline"]
    assert model["metrics"] == baseline["metrics"]
    assert all(entry["value"] == 0 for entry in metrics["difference"].values())
    assert model["errors"] == baseline["errors"] == 0


def test_metrics_record_the_server_and_the_concurrency(served_and_local, server, tiny_model_dir):
    metrics, _ = _read(served_and_local)
    model = metrics["models"]["model"]
    assert model["source"] == f"served by {server.url} (model {tiny_model_dir})"
    assert (model["name"], model["concurrency"], model["server_url"], model["server_model"]) == \
        ("tiny (served)", 4, server.url, str(tiny_model_dir))
    assert model["precision"] == "as served" and model["adapter"] is None
    assert metrics["models"]["baseline"]["source"] == str(tiny_model_dir)  # the local baseline as before
    assert "concurrency" not in metrics["models"]["baseline"]
    assert (served_and_local / "report.html").read_text().count("tiny (served)") >= 1


def test_concurrency_does_not_change_the_answers(served_and_local, server, tiny_model_dir, seed_data_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(_flags(seed_data_dir, out, "--server_url", server.url, "--concurrency", "1")) == 0
    metrics, rows = _read(out)
    _, four = _read(served_and_local)
    assert [row["model"]["text"] for row in rows] == [row["model"]["text"] for row in four]
    assert "baseline" not in metrics["models"]
    # Without --model the results name the served model.
    assert metrics["models"]["model"]["name"] == str(tiny_model_dir)
    assert metrics["models"]["model"]["concurrency"] == 1


# --------------------------------------------------------------------------- studies, priors, patient data


def _chat_requests(proxy: Proxy) -> list[dict]:
    bodies = [json.loads(body) for head, body in proxy.requests() if head.startswith(b"POST /v1/chat/completions")]
    return [body for body in bodies if body["max_tokens"] != 1]  # check_server's one-token probes aside


def _sent_images(request: dict) -> tuple[list[str], list[bytes]]:
    content = request["messages"][0]["content"]
    pixels = [Image.open(io.BytesIO(base64.b64decode(item["image_url"]["url"].split(",", 1)[1]))).tobytes()
              for item in content if item["type"] == "image_url"]
    return [item["type"] for item in content], pixels


def test_studies_with_a_prior_travel_in_prompt_order_and_without_patient_data(server, local, tmp_path, caplog):
    """Rows of 2-4 images, priors, and a real DICOM series whose files carry planted patient data in their
    headers and names: each row's request holds its rendered images in prompt order (the prior first,
    labelled), the answers are those of local generation, and no patient data is sent, logged or written."""
    caplog.set_level(logging.INFO)
    data = write_study_dataset(tmp_path / "studies")
    proxy = Proxy(server.port)
    config = EvalConfig(
        args=EvalArguments(output_dir=str(tmp_path / "eval"), concurrency=4, bootstrap_resamples=20, examples=1),
        data=DatasetArguments(dataset_name=str(data), images_column="images", prior_image_column="prior",
                              id_column="study"),
        settings=GenerationSettings(max_new_tokens=8, seed=0),
        server=ServerArguments(server_url=proxy.url),
    )
    try:
        run_evaluation(config)
    finally:
        proxy.close()
    _, rows = _read(tmp_path / "eval")
    assert [(row["image_id"], row["images"], row["prior"]) for row in rows] == [
        ("study_0", 2, True), ("study_1", 7, False), ("study_2", 4, True), ("study_3", 2, False)]

    prepared = config.data.prepare(config.data.load("test"))
    studies = [row_images(record, prepared.options) for record in prepared.dataset]
    expected = [generate_text(local, s.images, config.instruction, config.settings, prior=s.prior) for s in studies]
    assert [row["model"]["text"] for row in rows] == expected

    sent = [_sent_images(request) for request in _chat_requests(proxy)]  # in the order they finished
    wanted = []
    for study in studies:
        labels = ["text", "image_url", "text"] if study.prior is not None else []
        types = labels + ["image_url"] * len(study.images) + ["text"]
        wanted.append((types, [decode_image(image).tobytes() for image in study.in_prompt_order]))
    assert sorted(sent) == sorted(wanted)
    for request in _chat_requests(proxy):
        content = request["messages"][0]["content"]
        if content[0]["type"] == "text":
            assert content[0]["text"].startswith("Prior") and content[2]["text"].startswith("Current")

    assert not sentinel_hits(proxy.sent), "a DICOM header value or file name was sent"
    assert not sentinel_hits(server.log_text()) and not sentinel_hits(caplog.text)
    assert not files_with_sentinel(tmp_path / "eval")


# --------------------------------------------------------------------------- failures


def test_a_server_that_dies_mid_run_leaves_errors_for_the_rows_left(tiny_model_dir, seed_data_dir, tmp_path,
                                                                     monkeypatch):
    doomed = Server(tiny_model_dir, tmp_path / "doomed.log")
    real_generate = RemoteModel.generate
    answered = []

    def generate_then_die(self, *args, **kwargs):
        text = real_generate(self, *args, **kwargs)
        answered.append(text)
        if len(answered) == 2:
            doomed.kill()  # after the second row's answer: rows 2-5 find no server
        return text

    monkeypatch.setattr(RemoteModel, "generate", generate_then_die)
    out = tmp_path / "eval"
    try:
        code = main(_flags(seed_data_dir, out, "--server_url", doomed.url, "--concurrency", "1"))
    finally:
        doomed.stop()
    assert code == 0
    metrics, rows = _read(out)
    assert [row["scored"] for row in rows] == [True, True, False, False, False, False]
    assert all(row["model"]["text"] for row in rows[:2])
    for row in rows[2:]:
        assert row["model"]["text"] is None
        assert row["model"]["error"].startswith(f"RemoteModelError: cannot connect to {doomed.url}")
    assert metrics["models"]["model"]["errors"] == 4 and metrics["dataset"]["scored"] == 2


def test_an_unreachable_server_stops_the_run_before_anything_is_read(seed_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_module, "load_eval_dataset", lambda *a: pytest.fail("the data was loaded"))
    monkeypatch.setattr(evaluate_module, "load_for_generation", lambda *a, **k: pytest.fail("a model was loaded"))
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    out = tmp_path / "eval"
    assert main(_flags(seed_data_dir, out, "--server_url", nobody)) == 2
    err = capsys.readouterr().err
    assert f"model (--server_url {nobody}): cannot connect to {nobody} (connection refused)" in err
    assert "is the server running?" in err and not out.exists()


def test_a_served_baseline_is_checked_too(server, seed_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_module, "load_eval_dataset", lambda *a: pytest.fail("the data was loaded"))
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    assert main(_flags(seed_data_dir, tmp_path / "eval", "--server_url", server.url,
                       "--baseline_server_url", nobody)) == 2
    assert f"baseline (--baseline_server_url {nobody}): cannot connect" in capsys.readouterr().err
    assert main(_flags(seed_data_dir, tmp_path / "eval", "--server_url", server.url,
                       "--baseline_server_url", server.url, "--baseline_server_model", "base-4b")) == 2
    assert "does not serve model 'base-4b'" in capsys.readouterr().err


# --------------------------------------------------------------------------- arguments


def test_server_flags_parse_and_a_served_model_needs_no_model_flag():
    config = parse_config(["--server_url", "http://gpu:8000/v1/", "--server_model", "merged", "--server_api_key_env",
                           "MY_KEY", "--server_connect_timeout", "2", "--server_read_timeout", "30",
                           "--baseline_server_url", "http://gpu:8001/v1", "--baseline_server_model", "base",
                           "--concurrency", "16", "--dataset_name", "d/x", "--output_dir", "o"])
    assert config.server == ServerArguments("http://gpu:8000/v1", "merged", "MY_KEY", 2.0, 30.0)
    args = config.args
    assert (args.model, args.baseline_server_url, args.baseline_server_model, args.concurrency) == \
        (None, "http://gpu:8001/v1", "base", 16)
    sources = evaluate_module.model_sources(config)
    assert (sources["model"].served.url, sources["model"].served.model) == ("http://gpu:8000/v1", "merged")
    assert (sources["baseline"].served.url, sources["baseline"].served.model) == ("http://gpu:8001/v1", "base")
    assert parse_config(["--model", "m", "--dataset_name", "d/x", "--output_dir", "o"]).args.concurrency == 8


@pytest.mark.parametrize("flags, message", [
    ([], "no model to evaluate: give --model"),
    (["--server_url", "http://gpu:8000/v1", "--adapter", "runs/r1"], "--adapter applies to a model loaded here"),
    (["--model", "m", "--server_model", "merged"], "--server_model names a model on a server"),
    (["--model", "m", "--baseline_server_model", "base"], "give it with --baseline_server_url"),
    (["--server_url", "http://gpu:8000/v1", "--concurrency", "0"], "--concurrency must be at least 1"),
    (["--server_url", "gpu:8000"], "must be http(s)://HOST:PORT/v1, the base of the OpenAI-compatible API"),
    (["--server_url", "gpu:8000/v1"], "fix --server_url"),
    (["--model", "m", "--baseline_server_url", "http://gpu:8001"], "fix --baseline_server_url"),
])
def test_contradictory_server_options_are_refused_with_the_fix(flags, message, tmp_path, capsys):
    assert main([*flags, "--dataset_name", "d/x", "--output_dir", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_rows_built_in_the_worker_keep_their_order_and_their_own_failures(server, local):
    """generate_many with rows given as functions (how the evaluation reads a row's images only when it
    is sent): each answer in its row's place, a row whose images cannot be read gets that error, and
    on_done hears of every row once."""
    from radiology.images import ImageDecodeError
    from radiology.remote import RemoteRequest
    from tests.fixtures import real_images

    pictures = real_images()
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)

    def unreadable() -> RemoteRequest:
        raise ImageDecodeError("the image file is gone")

    rows = [lambda: RemoteRequest(pictures["mr_gray"]), unreadable,
            lambda: RemoteRequest([pictures["mr_gray"], pictures["rgb"]], prior=True)]
    done: list[int] = []
    answers = RemoteModel(server.url).generate_many(rows, settings, concurrency=3,
                                                    on_done=lambda index, answer: done.append(index))
    assert answers[0] == generate_text(local, pictures["mr_gray"], settings=settings)
    assert isinstance(answers[1], ImageDecodeError)
    assert answers[2] == generate_text(local, [pictures["rgb"]], settings=settings, prior=pictures["mr_gray"])
    assert sorted(done) == [0, 1, 2]


def test_conversations_through_the_server_ask_each_question_with_its_earlier_turns(
        server, tiny_model_dir, tmp_path, monkeypatch):
    # A conversation gives one prompt per answer, with the turns before it: the served prompt must be the
    # same as the local one, so the greedy answers agree row by row (and differ between questions).
    from tests.fixtures import write_conversation_dataset

    data = write_conversation_dataset(tmp_path / "conversations")
    _plain_generate(monkeypatch)
    out = tmp_path / "eval"
    assert main(_flags(data, out, "--messages_column", "messages", "--id_column", "id", "--server_url", server.url,
                       "--model", "tiny (served)", "--concurrency", "2", "--baseline", str(tiny_model_dir),
                       "--batch_size", "1")) == 0
    _, rows = _read(out)
    assert len(rows) > 2 and len({row["question"] for row in rows}) > 1
    assert [row["model"]["text"] for row in rows] == [row["baseline"]["text"] for row in rows]
