"""The collator on questions and conversations: the loss on every answer and its <end_of_turn> only, checked
token for token against TRL's own assistant-only masking on the tiny model; every prompt as generation builds it."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, Image as ImageFeature, List
from transformers import AutoProcessor
from trl.chat_template_utils import gemma3_training_chat_template
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from radiology.collate import IGNORE_INDEX, CaptionCollator, special_ids
from radiology.data import (
    DEFAULT_INSTRUCTION,
    Dialogue,
    decode_image,
    evaluation_items,
    prepare_caption_dataset,
    prompt_dialogue,
)
from radiology.generate import build_inputs
from tests.fixtures import CONVERSATIONS, conversation_messages, distinct_images, encode

# Multi-turn rows with images, as TRL's format holds them: (image names, [(question, answer), ...]).
ROWS = [
    *CONVERSATIONS,  # three answers each, the first row with two images
    (["mr_overlay", "us_flipped", "ct_flipped"], [("Compare the three views.", "All three are normal."),
                                                  ("Any fracture?", "No.")]),
    (["us_palette"], [("Is there a cyst?", "Yes, a simple one.")]),  # a question row: one turn
]


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def pictures():
    """The rows' images as the model gets them (8-bit RGB), so that both collators see the same pixels."""
    return {name: decode_image(image) for name, image in distinct_images().items()}


def prepared_rows(pictures) -> Dataset:
    """ROWS in TRL's format, read by the data stage (validation included) into the canonical columns."""
    raw = Dataset.from_list([
        {"id": str(i), "images": [{"bytes": encode(pictures[name]), "path": None} for name in names],
         "messages": conversation_messages(turns, len(names))}
        for i, (names, turns) in enumerate(ROWS)
    ]).cast_column("images", List(ImageFeature()))
    prepared = prepare_caption_dataset(raw, images_column="images", id_column="id", messages_column="messages")
    assert not prepared.dropped
    return prepared.dataset


def trl_batch(processor, pictures) -> dict[str, torch.Tensor]:
    """TRL's own VLM collator with assistant-only loss and its Gemma 3 training template ({% generation %})."""
    collator = DataCollatorForVisionLanguageModeling(
        processor, assistant_only_loss=True, chat_template=gemma3_training_chat_template
    )
    return collator([{"messages": conversation_messages(turns, len(names)),
                      "images": [pictures[name] for name in names]} for names, turns in ROWS])


def test_labels_agree_with_trls_assistant_only_masking(processor, pictures, capsys):
    """Same ids, masks, token types and pixels as TRL's collator; the labels agree on every position but one per
    answer: the newline after <end_of_turn>, which TRL's training template puts inside {% generation %} and this
    collator leaves out (generation stops at <end_of_turn> and never produces it)."""
    ours = CaptionCollator(processor, DEFAULT_INSTRUCTION)(list(prepared_rows(pictures)))
    theirs = trl_batch(processor, pictures)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    assert ours["token_type_ids"].tolist() == theirs["token_type_ids"].tolist()
    assert torch.allclose(ours["pixel_values"], theirs["pixel_values"])

    ids, labels, trl_labels = ours["input_ids"], ours["labels"], theirs["labels"]
    end_of_turn = special_ids(processor).end_of_turn
    newline = processor.tokenizer.convert_tokens_to_ids("\n")
    after_answer = torch.zeros_like(ids, dtype=torch.bool)
    after_answer[:, 1:] = (ids[:, :-1] == end_of_turn) & (labels[:, :-1] != IGNORE_INDEX) & (ids[:, 1:] == newline)
    differ = labels != trl_labels
    compared, agree = labels.numel(), int((~differ).sum())
    answers = sum(len(turns) for _, turns in ROWS)
    labelled = int((labels != IGNORE_INDEX).sum())
    with capsys.disabled():
        print(f"\nlabels vs TRL's assistant-only masking: {compared} tokens compared in {len(ROWS)} rows, {agree} agree, "
              f"{compared - agree} differ (the newline after each of the {answers} answers' <end_of_turn>); "
              f"{labelled} tokens labelled here, {int((trl_labels != IGNORE_INDEX).sum())} by TRL")
    assert differ.equal(after_answer), "the labels differ only on the newline after an answer's <end_of_turn>"
    assert int(after_answer.sum()) == answers
    assert (trl_labels[after_answer] == newline).all() and (labels[after_answer] == IGNORE_INDEX).all()
    # Every answer's tokens and its <end_of_turn> carry their label; nothing else (headers, questions, images, pad).
    answer_tokens = sum(
        len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1
        for _, turns in ROWS for _, answer in turns
    )
    assert labelled == answer_tokens
    assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()


def test_each_answer_is_trained_on_the_prompt_generation_builds_for_it(processor, pictures):
    """For every answer of a conversation, the tokens before it equal build_inputs' prompt for that question with
    the turns before it (radiology.data.prompt_dialogue, as radiology.evaluate asks it)."""
    rows = prepared_rows(pictures)
    batch = CaptionCollator(processor, DEFAULT_INSTRUCTION)([rows[0]])
    ids = batch["input_ids"][0].tolist()
    items = evaluation_items(rows.select([0]))
    assert len(items) == 3
    names, turns = ROWS[0]
    for item, (question, answer) in zip(items, turns):
        dialogue, reference = prompt_dialogue(item)
        assert (dialogue.asked, reference) == (question, answer)
        prompt = build_inputs(processor, [pictures[n] for n in names], DEFAULT_INSTRUCTION, dialogue=dialogue)
        n = prompt["input_ids"].shape[1]
        assert ids[:n] == prompt["input_ids"][0].tolist()
        assert batch["labels"][0, n - 1] == IGNORE_INDEX and batch["labels"][0, n] != IGNORE_INDEX  # answer starts
        answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert ids[n:n + len(answer_ids)] == answer_ids
    assert torch.allclose(batch["pixel_values"], prompt["pixel_values"])


def test_a_question_row_asks_its_question_instead_of_the_instruction(processor, pictures):
    """--question_column rows: the question (then the clinical context) is the user text; the instruction is not
    in the prompt; the loss is on the answer only."""
    image = pictures["mr"]
    row = {"image": {"bytes": encode(image), "path": None}, "question": "Is the disc herniated?",
           "caption": "Yes, at L4-L5.", "context": "Back pain for 3 weeks.", "image_id": "q"}
    batch = CaptionCollator(processor, DEFAULT_INSTRUCTION)([row])
    prompt = build_inputs(processor, image, DEFAULT_INSTRUCTION, "Back pain for 3 weeks.",
                          dialogue=Dialogue("Is the disc herniated?"))
    assert prompt["input_ids"].tolist() == build_inputs(processor, image, "Is the disc herniated?",
                                                         "Back pain for 3 weeks.")["input_ids"].tolist()
    n = prompt["input_ids"].shape[1]
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids[:n] == prompt["input_ids"][0].tolist()
    text = processor.decode(ids[:n])
    assert "Is the disc herniated?\n\nClinical context: Back pain for 3 weeks." in text
    assert DEFAULT_INSTRUCTION not in text
    answer = processor.tokenizer("Yes, at L4-L5.", add_special_tokens=False)["input_ids"]
    assert [label for label in labels if label != IGNORE_INDEX] == answer + [special_ids(processor).end_of_turn]


def test_truncation_cuts_later_turns_never_the_first_prompt(processor, pictures):
    rows = prepared_rows(pictures)
    full = CaptionCollator(processor, DEFAULT_INSTRUCTION)([rows[1]])
    first_prompt = build_inputs(processor, pictures["mr"], DEFAULT_INSTRUCTION,
                                dialogue=prompt_dialogue(evaluation_items(rows.select([1]))[0])[0])
    n = first_prompt["input_ids"].shape[1]
    cut = CaptionCollator(processor, DEFAULT_INSTRUCTION, max_length=n + 12)([rows[1]])
    assert cut["input_ids"][0].tolist() == full["input_ids"][0, : n + 12].tolist()
    assert cut["labels"][0].tolist() == full["labels"][0, : n + 12].tolist()
    with pytest.raises(ValueError, match=r"shorter than the prompt with its image block"):
        CaptionCollator(processor, DEFAULT_INSTRUCTION, max_length=n - 1)([rows[1]])


def test_max_length_is_checked_against_the_largest_question_prompt_before_training(processor, pictures):
    from radiology.collate import PromptTooLongError

    rows = prepared_rows(pictures)  # the largest row: three images
    collator = CaptionCollator(processor, DEFAULT_INSTRUCTION, max_length=40)
    longest_question = max(rows["question"], key=len)
    needed = collator.prompt_length(images=3, question=longest_question)
    assert needed == build_inputs(processor, [pictures["mr"]] * 3, longest_question)["input_ids"].shape[1]
    with pytest.raises(PromptTooLongError, match=rf"^3 images need {needed}\+ tokens.*the longest answer\)"):
        collator.check_max_length(rows)
    CaptionCollator(processor, DEFAULT_INSTRUCTION, max_length=needed + 1).check_max_length(rows)
