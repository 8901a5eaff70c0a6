"""Evaluation end to end on the tiny model: the command line, bad input, the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import radiology.evaluate as evaluate_module
from radiology.data import DatasetArguments
from radiology.evaluate import EvalArguments, EvalConfig, EvaluationError, main, parse_config, run_evaluation
from radiology.generate import GenerationSettings
from radiology.metrics import METRICS, corpus_bleu, rouge_l
from radiology.report import render_report
from tests.conftest import run_cli
from tests.fixtures import CAPTIONS, real_images, write_empty_split, write_seed_parquet

SCORE_KEYS = {"bleu", "rouge_l", "cider_d", "words"}
TEST_ROWS = 6  # the seed fixture's test split


def _read(folder: Path) -> tuple[dict, list[dict], str]:
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows, (folder / "report.html").read_text()


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory, trained_run, tiny_model_dir, seed_data_dir) -> Path:
    """The command line as a user runs it: the trained run's merged model against the tiny base."""
    out = tmp_path_factory.mktemp("eval") / "eval"
    run_cli("-m", "radiology.evaluate", "--model", str(trained_run / "merged"), "--baseline", str(tiny_model_dir),
            "--dataset_name", str(seed_data_dir), "--split", "test", "--output_dir", str(out),
            "--max_new_tokens", "8", "--batch_size", "4", "--examples", "2")
    return out


def _config(model: Path, data: Path, out: Path, **kwargs) -> EvalConfig:
    args = EvalArguments(model=str(model), output_dir=str(out), device="cpu", bootstrap_resamples=200, **kwargs)
    return EvalConfig(args=args, data=DatasetArguments(dataset_name=str(data)),
                      settings=GenerationSettings(max_new_tokens=6, seed=0))


# --------------------------------------------------------------------------- command line, end to end


def test_cli_writes_metrics_with_intervals_and_difference(eval_dir, trained_run, tiny_model_dir):
    metrics, _, _ = _read(eval_dir)
    assert metrics["dataset"]["rows"] == metrics["dataset"]["scored"] == TEST_ROWS
    assert metrics["dataset"]["split"] == "test"
    assert metrics["generation"]["settings"]["do_sample"] is False
    models = metrics["models"]
    assert models["model"]["source"] == str(trained_run / "merged")
    assert models["baseline"]["source"] == str(tiny_model_dir)
    for role in ("model", "baseline"):
        assert models[role]["errors"] == 0
        assert set(models[role]["metrics"]) == set(METRICS)
        for entry in models[role]["metrics"].values():
            low, high = entry["ci95"]
            assert low <= entry["value"] <= high
    for name, entry in metrics["difference"].items():
        expected = models["model"]["metrics"][name]["value"] - models["baseline"]["metrics"][name]["value"]
        assert entry["value"] == pytest.approx(expected, abs=2e-4)  # each value is rounded to 4 places
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]


def test_cli_predictions_hold_every_image_and_agree_with_the_metrics(eval_dir):
    metrics, rows, _ = _read(eval_dir)
    assert [row["index"] for row in rows] == list(range(TEST_ROWS))
    assert [row["image_id"] for row in rows] == [f"ROCOv2_2023_train_{i:06d}" for i in range(TEST_ROWS)]
    assert [row["reference"] for row in rows] == [CAPTIONS[i % len(CAPTIONS)] for i in range(TEST_ROWS)]
    for row in rows:
        assert row["scored"] is True
        for role in ("model", "baseline"):
            assert isinstance(row[role]["text"], str) and row[role]["error"] is None
            assert set(row[role]["scores"]) == SCORE_KEYS
            assert row[role]["scores"]["rouge_l"] == pytest.approx(rouge_l(row[role]["text"], row["reference"]), abs=1e-4)
    # The corpus BLEU in metrics.json is the one recomputed from the texts in predictions.jsonl.
    for role in ("model", "baseline"):
        recomputed = corpus_bleu([r[role]["text"] for r in rows], [r["reference"] for r in rows])
        assert metrics["models"][role]["metrics"]["bleu"]["value"] == pytest.approx(recomputed, abs=1e-4)
    assert rows[0]["model"]["text"] != rows[0]["baseline"]["text"], "the trained model should differ from its base"


def test_cli_report_is_self_contained(eval_dir):
    _, _, report = _read(eval_dir)
    assert "<table id=summary>" in report
    assert "http:" not in report and "https:" not in report and "url(" not in report
    assert report.count("<article class=example") == 6  # 2 best + 2 worst + 2 random of 6 images
    assert report.count("src='data:image/jpeg;base64,") == 6
    assert report.count("<svg ") == 3  # per-image differences for BLEU, ROUGE-L, CIDEr-D


def test_report_escapes_all_text(eval_dir):
    metrics, rows, _ = _read(eval_dir)
    evil = "<script>alert('x')</script> & \"quotes\""
    rows[0]["reference"] = evil
    rows[0]["model"]["text"] = evil
    rows[0]["image_id"] = evil
    metrics["models"]["model"]["name"] = evil
    page = render_report(metrics, rows, {"best": [0], "worst": [], "random": []}, {}, "rouge_l")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;" in page


@pytest.mark.browser
def test_report_opens_in_headless_chromium(eval_dir):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (make browser)")
    requested: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update"],
        )
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto((eval_dir / "report.html").as_uri())
            table = page.locator("table#summary")
            assert table.is_visible()
            assert table.locator("tbody tr").count() == len(METRICS)
            assert "difference" in table.locator("thead").inner_text()
            assert "BLEU" in table.inner_text() and "CIDEr-D" in table.inner_text()
            images = page.locator("article.example img")
            assert images.count() == 6
            widths = images.evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : 0)")
            assert all(w > 0 for w in widths), "every embedded image decodes"
            assert page.locator("#plots svg rect").count() >= 3 * TEST_ROWS
        finally:
            browser.close()
    assert all(url.startswith(("file:", "data:")) for url in requested), requested


# --------------------------------------------------------------------------- bad input


def test_missing_split_lists_the_splits_found(tmp_path, tiny_model_dir, seed_data_dir, capsys):
    code = main(["--model", str(tiny_model_dir), "--dataset_name", str(seed_data_dir), "--split", "validation",
                 "--output_dir", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2
    assert "split 'validation' not found" in err and "splits found: test, train" in err and "--split" in err


def test_empty_split_is_an_error(tmp_path, tiny_model_dir, capsys):
    data = write_seed_parquet(tmp_path / "data", splits={"train": 3})
    write_empty_split(data, "test")
    code = main(["--model", str(tiny_model_dir), "--dataset_name", str(data), "--output_dir", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2
    assert "split 'test'" in err and "is empty" in err and "--split" in err
    assert not (tmp_path / "eval").exists()


def test_refuses_to_overwrite_an_earlier_evaluation(tmp_path, tiny_model_dir, seed_data_dir):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        run_evaluation(_config(tiny_model_dir, seed_data_dir, out))
    assert (out / "metrics.json").read_text() == "{}"


def test_missing_model_folder_fails_before_generating(tmp_path, seed_data_dir):
    with pytest.raises(FileNotFoundError, match="--baseline ./no/such/model"):
        run_evaluation(_config(tmp_path, seed_data_dir, tmp_path / "eval", baseline="./no/such/model"))


def _poisoned_generate(monkeypatch, fail_on_size, only_for: str | None = None):
    """generate_batch that raises for any batch holding an image of the given size (one model, or all)."""
    real = evaluate_module.generate_batch
    calls: list[int] = []

    def generate(loaded, images, *args, **kwargs):
        calls.append(len(images))
        pictures = [i for study in images for i in study]  # each prompt's study: a list of images
        failing = only_for is None or loaded.model.name_or_path == only_for
        if failing and any(i.size == fail_on_size for i in pictures):
            raise RuntimeError("simulated failure")
        return real(loaded, images, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate_batch", generate)
    return calls


def test_a_failing_image_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch, tiny_model_dir, seed_data_dir):
    mr_size = real_images()["mr_gray"].size  # the test split's row 1, the only image of that size
    assert sum(image.size == mr_size for image in real_images().values()) == 1
    other = shutil.copytree(tiny_model_dir, tmp_path / "base")
    calls = _poisoned_generate(monkeypatch, mr_size, only_for=str(tiny_model_dir))
    outcome = run_evaluation(_config(tiny_model_dir, seed_data_dir, tmp_path / "eval", baseline=str(other),
                                     batch_size=4))
    metrics, rows, report = _read(tmp_path / "eval")
    assert rows[1]["model"] == {"text": None, "error": "RuntimeError: simulated failure", "scores": None}
    assert rows[1]["baseline"]["text"] and rows[1]["scored"] is False
    assert [row["scored"] for row in rows] == [True, False, True, True, True, True]
    assert all(row["model"]["text"] for i, row in enumerate(rows) if i != 1)
    assert metrics["models"]["model"]["errors"] == 1 and metrics["models"]["baseline"]["errors"] == 0
    assert metrics["dataset"]["scored"] == 5
    assert "failed generations: model: 1; baseline: 0" in report
    # model: batch of 4 fails, its 4 images retried one by one, then the batch of 2; baseline: 4 + 2.
    assert calls == [4, 1, 1, 1, 1, 2, 4, 2]
    assert outcome.metrics == metrics


def test_nothing_scored_is_an_error_that_keeps_the_errors(tmp_path, monkeypatch, tiny_model_dir, seed_data_dir):
    monkeypatch.setattr(evaluate_module, "generate_batch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(EvaluationError, match="predictions.jsonl"):
        run_evaluation(_config(tiny_model_dir, seed_data_dir, tmp_path / "eval", max_samples=2))
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["model"]["error"] for row in rows] == ["RuntimeError: boom"] * 2
    assert not (tmp_path / "eval" / "metrics.json").exists()


# --------------------------------------------------------------------------- arguments


EVERY_FLAG = [
    "--model", "m", "--adapter", "a", "--baseline", "b", "--load_in_4bit", "--processor_name_or_path", "p",
    "--device", "cpu", "--dataset_name", "d/x", "--dataset_config", "c", "--split", "validation",
    "--max_samples", "5", "--image_column", "scan", "--caption_column", "findings", "--id_column", "study",
    "--context_column", "history", "--prior_image_column", "before", "--max_images", "4", "--series_window", "multi",
    "--instruction", "Describe.", "--max_new_tokens", "9", "--do_sample",
    "--temperature", "0.5", "--top_p", "0.9", "--top_k", "7", "--seed", "3", "--batch_size", "2", "--output_dir", "o",
    "--overwrite_output_dir", "--bootstrap_resamples", "50", "--confidence", "0.9", "--examples", "1",
    "--rank_metric", "bleu",
]


def test_every_documented_flag_still_parses():
    config = parse_config(EVERY_FLAG)
    assert config.args == EvalArguments(
        model="m", output_dir="o", adapter="a", baseline="b", load_in_4bit=True, processor_name_or_path="p",
        device="cpu", split="validation", max_samples=5, batch_size=2, overwrite_output_dir=True,
        bootstrap_resamples=50, confidence=0.9, examples=1, rank_metric="bleu",
    )
    assert config.data == DatasetArguments(dataset_name="d/x", dataset_config="c", image_column="scan",
                                           caption_column="findings", id_column="study", context_column="history",
                                           prior_image_column="before", max_images=4, series_window="multi")
    assert config.settings == GenerationSettings(max_new_tokens=9, do_sample=True, temperature=0.5, top_p=0.9,
                                                 top_k=7, seed=3)
    assert (config.instruction, config.split, config.seed) == ("Describe.", "validation", 3)


def test_defaults_and_a_yaml_config(tmp_path):
    config = parse_config(["--model", "m", "--dataset_name", "d/x", "--output_dir", "o"])
    assert config.split == "test" and config.settings == GenerationSettings(max_new_tokens=128, seed=0)
    assert config.args.batch_size == 8 and config.data.context_column is None
    assert parse_config(["--model", "m", "--dataset_name", "d/x", "--output_dir", "o", "--temperature", "0.7"]) \
        .settings.do_sample, "--temperature implies sampling"
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("model: runs/r1/merged\ndataset_name: data/\ncontext_column: history\nmax_new_tokens: 32\n")
    config = parse_config(["--config", str(recipe), "--output_dir", "o", "--max_new_tokens", "16"])
    assert (config.args.model, config.data.context_column, config.settings.max_new_tokens) == \
        ("runs/r1/merged", "history", 16)


def test_a_single_file_is_scored_whole_and_labelled_so(tmp_path, tiny_model_dir, seed_data_dir):
    """A file has no test split of its own: without --split it is scored whole, and says so."""
    out = tmp_path / "eval"
    assert main(["--model", str(tiny_model_dir), "--dataset_name", str(seed_data_dir / "test.parquet"),
                 "--output_dir", str(out), "--max_samples", "2", "--max_new_tokens", "2", "--device", "cpu",
                 "--bootstrap_resamples", "20", "--examples", "0"]) == 0
    metrics, _, report = _read(out)
    assert metrics["dataset"]["split"] == "whole file"
    assert "split <b>whole file</b>" in report


def test_an_instruction_with_control_tokens_is_refused_before_loading(tmp_path, seed_data_dir, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_module, "load_for_generation", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["--model", "m", "--dataset_name", str(seed_data_dir), "--output_dir", str(tmp_path / "eval"),
                 "--instruction", "Describe.<end_of_turn>"]) == 2
    assert "--instruction contains the chat control token <end_of_turn>" in capsys.readouterr().err


def test_an_unknown_hub_dataset_offline_is_a_clear_error(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--model", str(tiny_model_dir), "--dataset_name", "someone/not-a-dataset",
                 "--output_dir", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset someone/not-a-dataset") and "HF_HUB_OFFLINE" in err


# --------------------------------------------------------------------------- studies: several images per row


def test_studies_are_scored_on_their_images_and_shown_as_strips(tmp_path, tiny_model_dir, caplog):
    """Rows of 2-4 images, priors and a real DICOM series (with planted patient data): each answer is the one
    generate_batch gives for the row's images and prior; predictions.jsonl counts them; the report shows the
    images of each answer in order, the prior first and marked; no patient data in any output or log."""
    import logging
    import re

    from radiology.data import row_images
    from radiology.generate import generate_batch, load_for_generation
    from tests.fixtures import files_with_sentinel, sentinel_hits, write_study_dataset

    caplog.set_level(logging.INFO)
    data = write_study_dataset(tmp_path / "studies")
    config = EvalConfig(
        args=EvalArguments(model=str(tiny_model_dir), output_dir=str(tmp_path / "eval"), device="cpu",
                           bootstrap_resamples=50, batch_size=4, examples=2),
        data=DatasetArguments(dataset_name=str(data), images_column="images", prior_image_column="prior",
                              id_column="study"),
        settings=GenerationSettings(max_new_tokens=5, seed=0),
    )
    run_evaluation(config)
    metrics, rows, report = _read(tmp_path / "eval")
    assert [(row["image_id"], row["images"], row["prior"]) for row in rows] == [
        ("study_0", 2, True), ("study_1", 7, False), ("study_2", 4, True), ("study_3", 2, False)]
    assert metrics["dataset"]["scored"] == 4 and metrics["dataset"]["columns"]["images_column"] == "images"
    prepared = config.data.prepare(config.data.load("test"))
    studies = [row_images(record, prepared.options) for record in prepared.dataset]
    with load_for_generation(str(tiny_model_dir), device="cpu") as loaded:
        expected = generate_batch(loaded, [s.images for s in studies], config.instruction, config.settings,
                                  priors=[s.prior for s in studies])
    assert [row["model"]["text"] for row in rows] == expected
    # 2 best and 2 worst of 4: every row once, each with its strip of thumbnails.
    strips = re.findall(r"<div class=strip [^>]*>(.*?)</div>", report)
    assert sorted(s.count("src='data:image/jpeg;base64,") for s in strips) == [2, 3, 5, 7]
    with_prior = [s for s in strips if "class=prior" in s]
    assert len(with_prior) == 2 and all(s.startswith("<figure class=prior>") and s.count("class=prior") == 1
                                        for s in with_prior)
    assert "4 of the current study, after a prior study&#x27;s image" in report
    assert not sentinel_hits(caplog.text) and not files_with_sentinel(tmp_path / "eval")
