"""Evaluation of questions: closed (yes/no) questions by accuracy with a bootstrap interval and the paired
model - baseline difference, open questions by the caption metrics; conversations scored answer by answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import radiology.evaluate as evaluate_module
from radiology.data import DatasetArguments, Dialogue
from radiology.evaluate import EvalArguments, EvalConfig, run_evaluation, summary_lines
from radiology.generate import GenerationSettings, generate_batch, load_for_generation
from radiology.metrics import METRICS, YES_NO_RULE, corpus_bleu
from tests.fixtures import CONVERSATIONS, VQA_ROWS, distinct_images, write_conversation_dataset, write_vqa_dataset

# The test split holds VQA_ROWS in order: closed questions at rows 0, 1, 2, 5 (yes, yes, no, no), open at 3, 4, 6, 7.
MODEL_ANSWERS = {  # right on three closed questions of four
    VQA_ROWS[0][1]: "Yes, there is.", VQA_ROWS[1][1]: "No.", VQA_ROWS[2][1]: "no", VQA_ROWS[5][1]: "No, it is normal.",
    VQA_ROWS[3][1]: "The right upper lobe.", VQA_ROWS[4][1]: "MRI", VQA_ROWS[6][1]: "Coronal plane",
    VQA_ROWS[7][1]: "The left kidney.",
}
CLOSED, OPEN = [0, 1, 2, 5], [3, 4, 6, 7]


def _read(folder: Path) -> tuple[dict, list[dict], str]:
    metrics = json.loads((folder / "metrics.json").read_text())
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows, (folder / "report.html").read_text()


@pytest.fixture(scope="module")
def vqa_eval(tmp_path_factory, tiny_model_dir):
    """A question dataset scored with answers chosen per question: the model right on 3 closed questions of 4, the
    baseline answering "Yes." to everything (right on 2); every prompt the generation got, recorded."""
    root = tmp_path_factory.mktemp("vqa-eval")
    data = write_vqa_dataset(root / "data")
    baseline = shutil.copytree(tiny_model_dir, root / "baseline")
    asked: list[tuple[str, Dialogue]] = []

    def answer(loaded, images, instruction=None, settings=None, contexts=None, stop=None, priors=None,
               dialogues=None):
        role = "baseline" if loaded.model.name_or_path == str(baseline) else "model"
        asked.extend((role, dialogue) for dialogue in dialogues)
        return ["Yes." if role == "baseline" else MODEL_ANSWERS[d.asked] for d in dialogues]

    patch = pytest.MonkeyPatch()
    patch.setattr(evaluate_module, "generate_batch", answer)
    config = EvalConfig(
        args=EvalArguments(model=str(tiny_model_dir), baseline=str(baseline), output_dir=str(root / "eval"),
                           device="cpu", bootstrap_resamples=300, batch_size=3, examples=2),
        data=DatasetArguments(dataset_name=str(data), question_column="question", answer_column="answer",
                              id_column="qid"),
        settings=GenerationSettings(max_new_tokens=8, seed=0),
    )
    try:
        outcome = run_evaluation(config)
    finally:
        patch.undo()
    return outcome, root / "eval", asked


def test_each_question_replaces_the_instruction_in_its_prompt(vqa_eval):
    _, _, asked = vqa_eval
    questions = [question for _, question, _ in VQA_ROWS]
    for role in ("model", "baseline"):
        assert [d for r, d in asked if r == role] == [Dialogue(q) for q in questions]


def test_closed_questions_are_scored_by_accuracy_with_intervals_and_a_paired_difference(vqa_eval):
    outcome, folder, _ = vqa_eval
    metrics, rows, _ = _read(folder)
    assert metrics == outcome.metrics
    assert metrics["questions"] == {"closed": 4, "closed_yes": 2, "closed_no": 2, "open": 4, "rule": YES_NO_RULE,
                                    "conversations": False}
    assert metrics["generation"]["instruction"] is None and metrics["bootstrap"]["unit"] == "question"
    model, baseline = metrics["models"]["model"], metrics["models"]["baseline"]
    assert model["metrics"]["accuracy"]["value"] == 0.75 and baseline["metrics"]["accuracy"]["value"] == 0.5
    assert model["closed"] == {"correct": 3, "answered_yes_or_no": 4}
    assert baseline["closed"] == {"correct": 2, "answered_yes_or_no": 4}
    difference = metrics["difference"]["accuracy"]
    assert difference["value"] == 0.25 and difference["ci95"][0] <= 0.25 <= difference["ci95"][1]
    for entry in (model["metrics"]["accuracy"], baseline["metrics"]["accuracy"]):
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    assert metrics["metric_info"]["accuracy"]["scored_on"] == "closed questions (4)"
    assert [row["closed"] for row in rows] == ["yes", "yes", "no", None, None, "no", None, None]
    assert [row["model"]["scores"]["correct"] for row in rows if row["closed"]] == [True, False, True, True]
    assert rows[1]["model"]["scores"] == {"answer": "no", "correct": False}
    assert [row["question"] for row in rows] == [question for _, question, _ in VQA_ROWS]


def test_open_questions_are_scored_with_the_caption_metrics(vqa_eval):
    _, folder, _ = vqa_eval
    metrics, rows, _ = _read(folder)
    model = metrics["models"]["model"]["metrics"]
    assert set(model) == {"accuracy", *METRICS} and set(metrics["difference"]) == set(model)
    for name in METRICS:
        assert metrics["metric_info"][name]["scored_on"] == "open questions (4)"
    texts = [MODEL_ANSWERS[VQA_ROWS[i][1]] for i in OPEN]
    assert model["bleu"]["value"] == pytest.approx(corpus_bleu(texts, [VQA_ROWS[i][2] for i in OPEN]), abs=1e-4)
    assert all(set(rows[i]["model"]["scores"]) == {"bleu", "rouge_l", "cider_d", "words"} for i in OPEN)


def test_summary_lines_and_the_report_show_both_groups_with_their_counts(vqa_eval):
    outcome, folder, _ = vqa_eval
    lines = summary_lines(outcome.metrics)
    assert lines[0].startswith("Accuracy (yes/no) on closed questions (4): model 0.750 [")
    assert "; baseline 0.500 [" in lines[0] and "; difference +0.250 [" in lines[0]
    assert lines[1].startswith("BLEU on open questions (4): model ")
    _, _, report = _read(folder)
    assert "on closed questions (4)" in report and "on open questions (4)" in report
    assert "8 answers scored (4 closed yes/no questions, 4 open), from 8 rows" in report
    assert "Prompt: each row's question (the instruction is not used)" in report
    assert "Closed questions the model answered wrongly" in report and "right (reads as yes)" in report
    assert "<dt>Question</dt><dd>Is the disc herniated?</dd>" in report
    assert report.count("<svg ") == 3  # per-question differences of the open questions


def test_a_conversation_is_scored_answer_by_answer_after_its_earlier_turns(tmp_path, tiny_model_dir):
    """Each answer of a 3-turn conversation is generated from the turns before it (the dataset's answers in the
    history), with real generation on the tiny model, and scored in its group."""
    data = write_conversation_dataset(tmp_path / "chat", splits={"test": 3})
    config = EvalConfig(
        args=EvalArguments(model=str(tiny_model_dir), output_dir=str(tmp_path / "eval"), device="cpu",
                           bootstrap_resamples=50, batch_size=4, examples=1),
        data=DatasetArguments(dataset_name=str(data), messages_column="messages", id_column="id"),
        settings=GenerationSettings(max_new_tokens=4, seed=0),
    )
    run_evaluation(config)
    metrics, rows, _ = _read(tmp_path / "eval")
    assert (metrics["dataset"]["rows"], metrics["dataset"]["answers"], metrics["dataset"]["scored"]) == (3, 9, 9)
    assert (metrics["questions"]["closed"], metrics["questions"]["open"]) == (3, 6)  # "Yes.", "Yes, mildly.", "No."
    assert [(row["image_id"], row["turn"]) for row in rows] == [(f"test_{i}", t) for i in range(3) for t in (1, 2, 3)]
    expected = [(q, a) for _, turns in CONVERSATIONS for q, a in turns]
    assert [(row["question"], row["reference"]) for row in rows] == expected
    # The third answer of the second conversation, generated independently from its history.
    names, turns = CONVERSATIONS[1]
    pictures = distinct_images()
    dialogue = Dialogue(turns[0][0], turns[0][1], ((turns[1][0], turns[1][1]), (turns[2][0], None)))
    with load_for_generation(str(tiny_model_dir), device="cpu") as loaded:
        alone = generate_batch(loaded, [[pictures[n] for n in names]], config.instruction, config.settings,
                               dialogues=[dialogue])
    assert rows[5]["model"]["text"] == alone[0]
