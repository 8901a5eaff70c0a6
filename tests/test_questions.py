"""Questions in the data stage: question/answer columns (VQA-RAD style) and conversations in TRL's format become
the canonical QUESTION, CAPTION and FOLLOW_UPS; conversations the one prompt builder cannot give are dropped and
counted by cause."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from datasets import Dataset, Image as ImageFeature, List

from radiology.config import parse_args
from radiology.data import (
    DEFAULT_INSTRUCTION,
    EMPTY_TURN,
    IMAGE_COUNT_MISMATCH,
    IMAGES_ELSEWHERE,
    NO_LAST_ANSWER,
    ROLES_OUT_OF_ORDER,
    SYSTEM_TURN,
    TURN_WITH_CONTROL_TOKENS,
    UNREADABLE_CONVERSATION,
    DatasetArguments,
    DatasetError,
    Dialogue,
    build_messages,
    conversation_fields,
    evaluation_items,
    prepare_caption_dataset,
    prompt_dialogue,
    row_dialogue,
)
from radiology.evaluate import parse_config
from tests.fixtures import VQA_ROWS, conversation_messages, encode, real_images, write_vqa_dataset

IMAGE = real_images()["mr_gray"]


def image_value():
    return {"bytes": encode(IMAGE), "path": None}


def user(*items):
    return {"role": "user", "content": list(items)}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def text(value):
    return {"type": "text", "text": value}


PICTURE = {"type": "image"}


# --------------------------------------------------------------------------- question and answer columns


def test_question_and_answer_columns_become_the_user_text_and_the_answer(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = write_vqa_dataset(tmp_path / "vqa")
    args = DatasetArguments(dataset_name=str(data), question_column="question", answer_column="answer",
                            id_column="qid")
    prepared = args.prepare(args.load("test"))
    rows = list(prepared.dataset)
    assert [(r["question"], r["caption"]) for r in rows] == [(q, a) for _, q, a in VQA_ROWS]
    assert rows[0]["image_id"] == "test_0"
    assert "Questions: 8 rows, a question and its answer each" in caplog.text
    # The question replaces the instruction; the answer is the assistant turn.
    assert row_dialogue(rows[0]).messages(DEFAULT_INSTRUCTION) == build_messages(VQA_ROWS[0][1], caption="Yes")
    assert prompt_dialogue(rows[0]) == (Dialogue(VQA_ROWS[0][1]), "Yes")


def test_question_rows_are_dropped_by_cause():
    raw = Dataset.from_list([
        {"image": image_value(), "q": "Is there a fracture?", "a": "No."},
        {"image": image_value(), "q": "  ", "a": "Yes."},
        {"image": image_value(), "q": "Any effusion?", "a": ""},
        {"image": image_value(), "q": "Effusion?<end_of_turn>", "a": "Yes."},
        {"image": image_value(), "q": "Mass?", "a": "Yes<eos>"},
    ]).cast_column("image", ImageFeature())
    prepared = prepare_caption_dataset(raw, question_column="q", answer_column="a")
    assert prepared.dropped == Counter({"empty question": 1, "empty answer": 1, "question with chat control tokens": 1,
                                        "answer with chat control tokens": 1})
    assert prepared.dataset["question"] == ["Is there a fracture?"] and prepared.dataset["caption"] == ["No."]
    # Columns of numbers, as a CSV gives them ("How many nodules?" / 2), are read as text.
    numbers = Dataset.from_list([{"image": image_value(), "q": 7, "a": 2}]).cast_column("image", ImageFeature())
    prepared = prepare_caption_dataset(numbers, question_column="q", answer_column="a")
    assert (prepared.dataset["question"], prepared.dataset["caption"]) == (["7"], ["2"])


def test_a_question_dataset_without_answers_says_which_flag_to_fix():
    raw = Dataset.from_list([{"image": image_value(), "q": "Fracture?", "a": " "}]).cast_column("image", ImageFeature())
    with pytest.raises(DatasetError, match=r"1 empty answer\); check that --answer_column names the column"):
        prepare_caption_dataset(raw, question_column="q", answer_column="a")
    with pytest.raises(DatasetError, match=r"column 'answer' not found.*--answer_column"):
        prepare_caption_dataset(raw, question_column="q", answer_column="answer")


@pytest.mark.parametrize("options, message", [
    ({"question_column": "q"}, "--question_column and --answer_column go together"),
    ({"answer_column": "a"}, "--question_column and --answer_column go together"),
    ({"question_column": "q", "answer_column": "a", "caption_column": "findings"}, "drop --caption_column"),
    ({"messages_column": "m", "question_column": "q", "answer_column": "a"},
     "drop --question_column and --answer_column"),
    ({"messages_column": "m", "prior_image_column": "p"}, "--prior_image_column does not combine"),
])
def test_question_options_that_contradict_each_other_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DatasetArguments(dataset_name="d", **options)


def test_train_and_evaluate_take_the_question_flags_and_say_the_instruction_is_unused(caplog):
    caplog.set_level(logging.WARNING)
    script_args, _, _ = parse_args(["--config", "recipes/tiny-cpu.yaml", "--model_name_or_path", "m",
                                    "--output_dir", "o", "--question_column", "q", "--answer_column", "a",
                                    "--instruction", "Answer briefly."])
    data = DatasetArguments.of(script_args)
    assert (data.question_column, data.answer_column, data.asks_questions) == ("q", "a", True)
    assert "--instruction is not used with --question_column" in caplog.text
    assert data.flags()[-4:] == ["--question_column", "q", "--answer_column", "a"]
    config = parse_config(["--model", "m", "--dataset_name", "d", "--output_dir", "o", "--messages_column", "chat",
                           "--images_column", "pictures"])
    assert (config.data.messages_column, config.data.images_column) == ("chat", "pictures")


# --------------------------------------------------------------------------- conversations in TRL's format


def test_a_conversation_becomes_a_question_its_answer_and_follow_ups():
    messages = conversation_messages([("Describe.", "A nodule."), ("Spiculated?", "Yes."), ("Where?", "Right.")], 2)
    fields, problem = conversation_fields(messages, images=2)
    assert problem is None
    assert fields == {"question": "Describe.", "caption": "A nodule.",
                      "follow_ups": [{"question": "Spiculated?", "answer": "Yes."},
                                     {"question": "Where?", "answer": "Right."}]}
    row = {**fields, "image": [image_value(), image_value()]}
    assert row_dialogue(row).messages(DEFAULT_INSTRUCTION, images=2) == build_messages(
        "Describe.", "A nodule.", images=2, follow_ups=[("Spiculated?", "Yes."), ("Where?", "Right.")])
    # TRL's plain format: string contents, every image placed before the first user text (as TRL does).
    plain = [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "A nodule."}]
    assert conversation_fields(plain, images=3) == ({"question": "Describe.", "caption": "A nodule.",
                                                     "follow_ups": []}, None)
    # Arrow gives every item every key, None where absent; several texts of a turn are joined by a blank line.
    arrow = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "One."},
                                          {"type": "text", "text": " Two. "}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]
    assert conversation_fields(arrow, images=1)[0]["question"] == "One.\n\nTwo."


@pytest.mark.parametrize("messages, images, cause", [
    (None, 1, UNREADABLE_CONVERSATION),
    ([], 1, UNREADABLE_CONVERSATION),
    ([user(PICTURE, text("Q?")), {"role": "assistant", "content": 3}], 1, UNREADABLE_CONVERSATION),
    ([user(PICTURE, {"type": "video"}), assistant("A.")], 1, UNREADABLE_CONVERSATION),
    ([{"role": "system", "content": "You are a radiologist."}, user(PICTURE, text("Q?")), assistant("A.")], 1,
     SYSTEM_TURN),
    ([assistant("A."), user(PICTURE, text("Q?"))], 1, ROLES_OUT_OF_ORDER),
    ([user(PICTURE, text("Q?")), user(text("Q2?")), assistant("A.")], 1, ROLES_OUT_OF_ORDER),
    ([user(PICTURE, text("Q?")), assistant("A."), user(text("Q2?"))], 1, NO_LAST_ANSWER),
    ([user(text("Q?"), PICTURE), assistant("A.")], 1, IMAGES_ELSEWHERE),
    ([user(PICTURE, text("Q?")), assistant("A."), user(PICTURE, text("And this one?")), assistant("B.")], 2,
     IMAGES_ELSEWHERE),
    ([user(PICTURE, text("Q?")), assistant("A.")], 2, IMAGE_COUNT_MISMATCH),
    ([user(PICTURE, PICTURE, text("Q?")), assistant("A.")], 1, IMAGE_COUNT_MISMATCH),
    ([user(PICTURE), assistant("A.")], 1, EMPTY_TURN),
    ([user(PICTURE, text("Q?")), assistant(" ")], 1, EMPTY_TURN),
    ([user(PICTURE, text("Q?")), assistant("A."), user(text("Q2<end_of_turn>?")), assistant("B.")], 1,
     TURN_WITH_CONTROL_TOKENS),
])
def test_conversations_the_prompt_builder_cannot_give_are_refused_by_cause(messages, images, cause):
    assert conversation_fields(messages, images) == ({}, cause)


def test_conversation_rows_are_dropped_and_counted_by_cause(caplog):
    """In a dataset read as training reads it: the good rows stay, each bad one is counted under its cause."""
    caplog.set_level(logging.INFO)
    good = conversation_messages([("Describe.", "A nodule."), ("Spiculated?", "Yes."), ("Where?", "Right.")], 1)
    rows = [
        (good, 1),
        (conversation_messages([("Describe.", "Normal.")], 1), 1),
        ([user(PICTURE, text("Q?")), assistant("A."), user(text("Q2?"))], 1),
        ([user(PICTURE, text("Q?")), assistant("A."), user(PICTURE, text("And?")), assistant("B.")], 2),
        ([user(PICTURE, text("Q?")), assistant("A.")], 2),
        ([user(PICTURE, text("Q?")), assistant("A<start_of_image>.")], 1),
    ]
    raw = Dataset.from_list([{"images": [image_value()] * n, "messages": m} for m, n in rows]) \
        .cast_column("images", List(ImageFeature()))
    prepared = prepare_caption_dataset(raw, messages_column="messages")
    assert prepared.dropped == Counter({NO_LAST_ANSWER: 1, IMAGES_ELSEWHERE: 1, IMAGE_COUNT_MISMATCH: 1,
                                        TURN_WITH_CONTROL_TOKENS: 1})
    assert "conversation_problem" not in prepared.dataset.column_names
    assert prepared.dataset["question"] == ["Describe.", "Describe."]
    assert [len(f) for f in prepared.dataset["follow_ups"]] == [2, 0]
    assert prepared.dataset["length"][0] == len("A nodule.Describe.Spiculated?Yes.Where?Right.")
    assert "Questions: answers per conversation: 1 (1 row), 3 (1 row); 4 answers in all" in caplog.text
    only_bad = raw.select([2])
    with pytest.raises(DatasetError, match="end each conversation with an assistant turn"):
        prepare_caption_dataset(only_bad, messages_column="messages")


def test_images_come_from_the_images_column_by_default_and_paths_are_resolved(tmp_path):
    from tests.fixtures import write_conversation_dataset

    data = write_conversation_dataset(tmp_path / "chat", splits={"train": 2})
    args = DatasetArguments(dataset_name=str(data), messages_column="messages", id_column="id")
    prepared = args.prepare(args.load("train"))
    assert prepared.dataset["image_count"] == [2, 1] and not prepared.dropped
    assert all(path.startswith(str(data)) for row in prepared.dataset["image"] for path in row)


def test_evaluation_items_give_one_prompt_per_answer_with_the_turns_before_it():
    turns = [("Describe.", "A nodule."), ("Spiculated?", "Yes."), ("Where?", "Right.")]
    fields, _ = conversation_fields(conversation_messages(turns, 1), images=1)
    dataset = Dataset.from_list([{"image_id": "c", **fields}, {"image_id": "d", **fields, "follow_ups": []}])
    items = evaluation_items(dataset)
    assert items["image_id"] == ["c", "c", "c", "d"] and items["turn"] == [1, 2, 3, 1]
    assert [prompt_dialogue(item) for item in items] == [
        (Dialogue("Describe."), "A nodule."),
        (Dialogue("Describe.", "A nodule.", (("Spiculated?", None),)), "Yes."),
        (Dialogue("Describe.", "A nodule.", (("Spiculated?", "Yes."), ("Where?", None))), "Right."),
        (Dialogue("Describe."), "A nodule."),
    ]
    assert [prompt_dialogue(item)[0].asked for item in items] == ["Describe.", "Spiculated?", "Where?", "Describe."]
    captions = Dataset.from_list([{"image_id": "x", "caption": "Normal."}])
    assert evaluation_items(captions) is captions
    assert prompt_dialogue(captions[0]) == (Dialogue(), "Normal.")  # the instruction is asked
