"""train.py --evaluate: the merged model scored against its base after training, on the tiny model."""

from __future__ import annotations

import json

import pytest

from radiology.evaluate import OUTPUT_FILES
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def trained_with_eval(tmp_path_factory, tiny_model_dir, seed_data_dir):
    out = tmp_path_factory.mktemp("run_eval") / "out"
    result = run_cli("train.py", "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
                     "--dataset_name", str(seed_data_dir), "--output_dir", str(out), "--max_steps", "2",
                     "--save_strategy", "no", "--evaluate", "--eval_max_samples", "4", "--eval_max_new_tokens", "6")
    return out, result.stdout


def test_train_evaluate_scores_merged_model_against_base(trained_with_eval, tiny_model_dir):
    out, stdout = trained_with_eval
    assert f"evaluation: {out / 'eval' / 'report.html'}" in stdout
    assert all((out / "eval" / name).is_file() for name in OUTPUT_FILES)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    rows = (out / "eval" / "predictions.jsonl").read_text().splitlines()
    assert metrics["models"]["model"]["source"] == str(out / "merged")
    assert metrics["models"]["baseline"]["source"] == str(tiny_model_dir)
    assert metrics["generation"]["settings"]["max_new_tokens"] == 6
    assert len(rows) == metrics["dataset"]["scored"] == 4
    assert metrics["difference"] is not None


def test_train_evaluate_checks_the_split_before_training(tmp_path, tiny_model_dir, seed_data_dir, capsys):
    import train

    out = tmp_path / "out"
    code = train.main(["--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
                       "--dataset_name", str(seed_data_dir), "--output_dir", str(out),
                       "--evaluate", "--eval_split", "validation"])
    assert code == 2
    assert "split 'validation' not found" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir()), "nothing may be trained when the evaluation cannot run"


def _parse(*flags: str):
    from radiology.config import parse_args

    return parse_args(["--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", "base-model",
                       "--output_dir", "runs/r1", "--evaluate", *flags])


def test_evaluation_config_follows_the_run(tmp_path):
    from radiology.training import TrainingOutcome, evaluation_config

    script_args, training_args, model_args = _parse("--eval_max_new_tokens", "32", "--eval_split", "validation")
    merged = TrainingOutcome(adapter_dir=tmp_path, merged_dir=tmp_path / "merged", train_loss=1.0, global_step=4, rows=8)
    config = evaluation_config(script_args, training_args, model_args, merged)
    args = config.args
    assert (args.model, args.adapter, args.baseline) == (str(tmp_path / "merged"), None, "base-model")
    assert (config.split, config.settings.max_new_tokens, config.settings.do_sample) == ("validation", 32, False)
    assert args.output_dir == "runs/r1/eval" and args.load_in_4bit is False
    # Without a merge, the adapter is applied to the base; another baseline can be named.
    script_args, training_args, model_args = _parse("--merge", "false", "--eval_baseline", "other-model")
    unmerged = TrainingOutcome(adapter_dir=tmp_path, merged_dir=None, train_loss=1.0, global_step=4, rows=8)
    config = evaluation_config(script_args, training_args, model_args, unmerged)
    args = config.args
    assert (args.model, args.adapter, args.baseline) == ("base-model", str(tmp_path), "other-model")


def test_evaluation_reads_the_columns_the_model_was_trained_with(tmp_path):
    """The clinical context (and every other column) reaches the evaluation: the model is scored on the
    prompt it was trained on."""
    from radiology.data import DatasetArguments
    from radiology.training import TrainingOutcome, evaluation_config

    script_args, training_args, model_args = _parse("--context_column", "history", "--image_column", "scan",
                                                    "--caption_column", "findings", "--id_column", "study")
    outcome = TrainingOutcome(adapter_dir=tmp_path, merged_dir=tmp_path / "merged", train_loss=1.0, global_step=4,
                              rows=8)
    config = evaluation_config(script_args, training_args, model_args, outcome)
    assert config.data == DatasetArguments(dataset_name="unsloth/Radiology_mini", context_column="history",
                                           image_column="scan", caption_column="findings", id_column="study")


def test_train_evaluate_refuses_a_single_file_before_training(tmp_path, tiny_model_dir, seed_data_dir, capsys,
                                                              refuse_loading):
    """A file holds one split, the training rows: scoring them would say nothing about unseen images."""
    import train

    single = str(seed_data_dir / "train.parquet")
    code = train.main(["--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
                       "--dataset_name", single, "--output_dir", str(tmp_path / "out"), "--evaluate"])
    err = capsys.readouterr().err
    assert code == 2 and "--evaluate needs a dataset with several splits" in err and "single file" in err


@pytest.mark.parametrize("flag", ["--eval_max_samples", "--eval_batch_size", "--eval_max_new_tokens"])
def test_evaluation_flags_must_be_positive(flag):
    with pytest.raises(ValueError, match=f"{flag} must be at least 1"):
        _parse(flag, "0")


def test_train_on_studies_saves_merges_and_evaluates_with_image_strips(tmp_path, tiny_model_dir):
    """train.py end to end on rows of 2-4 real images, priors, and a real DICOM series folder (MR700, 7 slices,
    planted patient data) in the list column: it trains, saves, merges and evaluates; the log counts images per
    row; the report shows each answer's images; no patient data anywhere in the output or the log."""
    import re

    from tests.fixtures import files_with_sentinel, sentinel_hits, write_study_dataset

    data = write_study_dataset(tmp_path / "studies")
    out = tmp_path / "run"
    result = run_cli("train.py", "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
                     "--dataset_name", str(data), "--images_column", "images", "--prior_image_column", "prior",
                     "--id_column", "study", "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no",
                     "--evaluate", "--eval_max_new_tokens", "6", "--eval_batch_size", "2")
    log = result.stderr
    assert ("Images: images per row: 2 (2 rows), 3 (1 row), 4 (2 rows), 7 (1 row); 3 row(s) with a prior study; "
            "1 DICOM series of 7 slices, each sampled to at most 8 images (--max_images)") in log
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    assert f"evaluation: {out / 'eval' / 'report.html'}" in result.stdout
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [(row["images"], row["prior"]) for row in rows] == [(2, True), (7, False), (4, True), (2, False)]
    assert metrics["dataset"]["scored"] == 4 and metrics["models"]["model"]["source"] == str(out / "merged")
    report = (out / "eval" / "report.html").read_text()
    strips = re.findall(r"<div class=strip [^>]*>(.*?)</div>", report)
    assert sorted(s.count("src='data:image/jpeg;base64,") for s in strips) == [2, 3, 5, 7]
    assert not sentinel_hits(result.stdout, result.stderr)
    assert not files_with_sentinel(out)


def test_train_on_questions_merges_and_scores_closed_and_open_questions(tmp_path, tiny_model_dir):
    """train.py end to end on a VQA-style dataset (real images, yes/no and open questions): it trains on the
    answers, merges, and --evaluate writes accuracy for the closed questions and the caption metrics for the open
    ones, each with its count, for the model and the base and their difference."""
    from tests.fixtures import write_vqa_dataset

    data = write_vqa_dataset(tmp_path / "vqa")
    out = tmp_path / "run"
    result = run_cli("train.py", "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
                     "--dataset_name", str(data), "--question_column", "question", "--answer_column", "answer",
                     "--id_column", "qid", "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no",
                     "--evaluate", "--eval_max_new_tokens", "4", "--eval_batch_size", "4")
    assert "Questions: 8 rows, a question and its answer each" in result.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert (metrics["questions"]["closed"], metrics["questions"]["open"]) == (4, 4)
    for role in ("model", "baseline"):
        assert set(metrics["models"][role]["metrics"]) == {"accuracy", "bleu", "rouge_l", "cider_d", "length_ratio"}
    assert set(metrics["difference"]) == {"accuracy", "bleu", "rouge_l", "cider_d", "length_ratio"}
    assert metrics["dataset"]["columns"]["question_column"] == "question"
    report = (out / "eval" / "report.html").read_text()
    assert "on closed questions (4)" in report and "on open questions (4)" in report


def test_train_on_three_turn_conversations_merges_and_scores_every_answer(tmp_path, tiny_model_dir):
    """train.py end to end on conversations in TRL's format (three answers each, one or two real images): it trains
    with the loss on every answer, merges, and --evaluate scores each answer after its earlier turns."""
    from tests.fixtures import write_conversation_dataset

    data = write_conversation_dataset(tmp_path / "chat")
    out = tmp_path / "run"
    result = run_cli("train.py", "--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", str(tiny_model_dir),
                     "--dataset_name", str(data), "--messages_column", "messages", "--id_column", "id",
                     "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no",
                     "--evaluate", "--eval_max_new_tokens", "4", "--eval_batch_size", "4")
    assert "Questions: answers per conversation: 3 (6 rows); 18 answers in all" in result.stderr
    assert "Images: images per row: 1 (4 rows), 2 (2 rows)" in result.stderr
    assert (out / "merged" / "config.json").is_file()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert (metrics["dataset"]["rows"], metrics["dataset"]["answers"], metrics["dataset"]["scored"]) == (3, 9, 9)
    assert (metrics["questions"]["closed"], metrics["questions"]["open"], metrics["questions"]["conversations"]) \
        == (3, 6, True)
    assert "accuracy" in metrics["difference"] and "bleu" in metrics["difference"]
    rows = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["turn"] for row in rows] == [1, 2, 3] * 3
